"""Deterministic prompt-adherence checker for the shapes grammar: reads a scene back from pixels alone.

Pipeline (numpy only, ~10 ms per 128x128 image):
1. background: median colour of the image frame, then a per-row robust fit of a vertical linear gradient on the
   pixels that are far from any shape; its top colour names the background, its top-bottom change says gradient;
2. foreground = pixels far (in RGB) from the fitted background; 4-connected components of >= MIN_AREA pixels;
3. per component: colour = median of its interior, nearest named colour; position = centroid, nearest of the 9
   anchors; size from the largest centroid-to-pixel distance (shape independent by construction of the renderer);
   class from rotation-invariant features: solidity (area / convex hull) separates the star, and the "radial
   fill" area / (pi * rmax^2) separates circle (~1), square (~0.64) and triangle (~0.41).
A caption matches when the shape count, the background colour and every shape's kind, colour, size and position
agree (best assignment of detected to described shapes). Gradient vs plain is reported but not required.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .data import COLORS, IMAGE_SIZE, POSITIONS, Scene, parse_caption

MIN_AREA = 40            # smaller components are noise (the smallest shape has > 150 pixels)
FG_THRESHOLD = 50.0      # RGB distance from the fitted background that counts as foreground
ROUGH_THRESHOLD = 80.0   # first pass, before the gradient fit
GRADIENT_THRESHOLD = 25.0
SIZE_RMAX_THRESHOLD = 17.0  # small shapes reach <= ~14.5 px from their centre, large ones >= ~19.5 px
SOLIDITY_STAR = 0.8
RADIAL_CIRCLE = 0.78
RADIAL_SQUARE = 0.52

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], np.float32)
_ANCHORS = {k: (x * IMAGE_SIZE, y * IMAGE_SIZE) for k, (x, y) in POSITIONS.items()}


def nearest_color(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, np.float32)[None]) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


@dataclass
class DetectedShape:
    kind: str
    color: str
    size: str
    position: str
    area: int
    centroid: tuple[float, float]
    rmax: float
    solidity: float
    radial_fill: float
    rgb: tuple[int, int, int]


@dataclass
class Analysis:
    background: str
    gradient: bool
    background_rgb: tuple[int, int, int]
    shapes: list[DetectedShape] = field(default_factory=list)
    # foreground pixels (HxW bool) of the kept components: what map_adherence compares with a control map
    foreground: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class CheckResult:
    matched: bool
    caption: str
    details: dict
    analysis: Analysis


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by iterated min-propagation; fine for 128x128 masks."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m = np.where(mask, m, big)
        # pointer jumping: follow labels to their own label, halves the number of rounds
        flat = m.ravel()
        idx = np.where(flat < big, flat - 1, 0)
        jumped = np.where(flat < big, np.minimum(flat, flat[idx]), big).reshape(h, w)
        if np.array_equal(jumped, lab):
            break
        lab = jumped
    out = np.where(mask, lab, 0)
    _, inv = np.unique(out, return_inverse=True)
    return inv.reshape(h, w)


def _hull_area_perimeter(pts: np.ndarray) -> tuple[float, float]:
    """Convex hull (Andrew's monotone chain) of integer points: area and perimeter."""
    pts = np.unique(pts, axis=0)
    if len(pts) < 3:
        return 0.0, 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(points):
        h: list = []
        for p in points:
            while len(h) >= 2 and (h[-1][0] - h[-2][0]) * (p[1] - h[-2][1]) - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0]) <= 0:
                h.pop()
            h.append(p)
        return h

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1], np.float64)
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    per = np.sqrt(((hull - np.roll(hull, -1, axis=0)) ** 2).sum(1)).sum()
    return float(area), float(per)


def _to_uint8_128(image) -> np.ndarray:
    """Accept PIL images, uint8 arrays (HxWx3) or float arrays in [0,1]; resize to 128x128 if needed."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        a = np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return a[..., :3]


def analyze(image) -> Analysis:
    """Read background and shapes from an image (PIL, uint8 HxWx3, or float [0,1] HxWx3)."""
    img = _to_uint8_128(image).astype(np.float32)
    h, w, _ = img.shape
    frame = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                            img[:, -2:].reshape(-1, 3)])
    c0 = np.median(frame, axis=0)
    rough = np.sqrt(((img - c0) ** 2).sum(-1)) > ROUGH_THRESHOLD
    # robust vertical gradient fit: per-row median of background pixels, then least squares in y
    ys, rows = [], []
    for y in range(h):
        bgpix = img[y][~rough[y]]
        if len(bgpix) >= 8:
            ys.append(y)
            rows.append(np.median(bgpix, axis=0))
    if len(ys) >= 2:
        ys_a = np.asarray(ys, np.float32)
        rows_a = np.asarray(rows, np.float32)
        A = np.stack([np.ones_like(ys_a), ys_a], 1)
        coef, *_ = np.linalg.lstsq(A, rows_a, rcond=None)
    else:
        coef = np.stack([c0, np.zeros(3, np.float32)])
    yy = np.arange(h, dtype=np.float32)
    bg = coef[0][None] + yy[:, None] * coef[1][None]  # (H,3)
    dist = np.sqrt(((img - bg[:, None, :]) ** 2).sum(-1))
    mask = dist > FG_THRESHOLD
    top, bottom = bg[0], bg[-1]
    analysis = Analysis(
        background=nearest_color(top),
        gradient=bool(np.sqrt(((top - bottom) ** 2).sum()) > GRADIENT_THRESHOLD),
        background_rgb=tuple(int(round(v)) for v in np.clip(top, 0, 255)),
    )
    labels = _label(mask)
    analysis.foreground = np.zeros((h, w), bool)
    for k in range(1, labels.max() + 1):
        comp = labels == k
        area = int(comp.sum())
        if area < MIN_AREA:
            continue
        analysis.foreground |= comp
        py, px = np.nonzero(comp)
        cx, cy = px.mean() + 0.5, py.mean() + 0.5
        rmax = float(np.sqrt((px + 0.5 - cx) ** 2 + (py + 0.5 - cy) ** 2).max()) + 0.5
        interior = comp.copy()
        interior[1:] &= comp[:-1]
        interior[:-1] &= comp[1:]
        interior[:, 1:] &= comp[:, :-1]
        interior[:, :-1] &= comp[:, 1:]
        pix = img[interior] if interior.sum() >= 10 else img[comp]
        rgb = np.median(pix, axis=0)
        harea, hper = _hull_area_perimeter(np.stack([px, py], 1))
        solidity = area / max(1.0, harea + hper / 2 + 1)
        radial = area / (math.pi * rmax * rmax)
        if solidity < SOLIDITY_STAR:
            kind = "star"
        elif radial > RADIAL_CIRCLE:
            kind = "circle"
        elif radial > RADIAL_SQUARE:
            kind = "square"
        else:
            kind = "triangle"
        pos = min(_ANCHORS, key=lambda n: (_ANCHORS[n][0] - cx) ** 2 + (_ANCHORS[n][1] - cy) ** 2)
        analysis.shapes.append(DetectedShape(
            kind=kind, color=nearest_color(rgb), size="large" if rmax > SIZE_RMAX_THRESHOLD else "small",
            position=pos, area=area, centroid=(round(float(cx), 2), round(float(cy), 2)), rmax=round(rmax, 2),
            solidity=round(float(solidity), 3), radial_fill=round(float(radial), 3),
            rgb=tuple(int(v) for v in rgb)))
    return analysis


ATTRS = ("kind", "color", "size", "position")


def compare(expected: Scene, analysis: Analysis) -> tuple[bool, dict]:
    """Match a described scene against an analysis; returns (matched, per-attribute details)."""
    details: dict = {
        "count": len(analysis.shapes) == len(expected.shapes),
        "background": analysis.background == expected.background,
        "gradient": analysis.gradient == expected.gradient,
        "shapes": [],
    }
    best, best_score = None, -1
    det = analysis.shapes
    n = len(expected.shapes)
    # assign each described shape a distinct detected shape (or none), maximising agreeing attributes
    options = list(itertools.permutations(range(len(det)), min(n, len(det))))
    for perm in options or [()]:
        rows, score = [], 0
        for i, s in enumerate(expected.shapes):
            if i < len(perm):
                d = det[perm[i]]
                row = {a: getattr(d, a) == getattr(s, a) for a in ATTRS}
            else:
                row = {a: False for a in ATTRS}
            score += sum(row.values())
            rows.append(row)
        if score > best_score:
            best, best_score = rows, score
    details["shapes"] = best
    matched = details["count"] and details["background"] and all(all(r.values()) for r in best)
    return bool(matched), details


def check(image, caption: str) -> CheckResult:
    """Does the image show what the caption says? Deterministic, from pixels alone."""
    expected = parse_caption(caption)
    analysis = analyze(image)
    matched, details = compare(expected, analysis)
    return CheckResult(matched=matched, caption=caption, details=details, analysis=analysis)


def attribute_accuracy(results: list[CheckResult]) -> dict:
    """Fraction correct per attribute over a list of check results (for the evaluator's detail table)."""
    tot: dict = {"count": 0, "background": 0, "gradient": 0, **{a: 0 for a in ATTRS}}
    nshape = 0
    for r in results:
        for k in ("count", "background", "gradient"):
            tot[k] += bool(r.details[k])
        for row in r.details["shapes"]:
            nshape += 1
            for a in ATTRS:
                tot[a] += bool(row[a])
    n = max(1, len(results))
    out = {k: round(tot[k] / n, 4) for k in ("count", "background", "gradient")}
    out.update({a: round(tot[a] / max(1, nshape), 4) for a in ATTRS})
    return out


# ------------------------------------------------------------------------------------------------ control maps

MAP_THRESHOLD = 127       # a control map pixel (0-255) above this is inside a shape
MAP_IOU_MIN = 0.5         # a map match needs this IoU of generated foreground vs silhouette ...
MAP_CENTROID_MAX = 6.0    # ... and every map shape's nearest detected centroid within this many pixels


@dataclass
class MapResult:
    matched: bool
    iou: float
    centroid_errors: list[float]   # per map shape (inf when nothing was detected), best assignment
    count: bool                    # as many shapes detected as the map holds
    analysis: Analysis


def _map_components(control) -> list[tuple[float, float]]:
    """Centroids of the silhouette's shapes (shapes never touch in the grammar's scenes)."""
    a = _to_uint8_128(control).max(-1) > MAP_THRESHOLD
    labels = _label(a)
    out = []
    for k in range(1, labels.max() + 1):
        py, px = np.nonzero(labels == k)
        if len(px) >= MIN_AREA:
            out.append((float(px.mean()) + 0.5, float(py.mean()) + 0.5))
    return out


def map_adherence(image, control) -> MapResult:
    """Does the image follow the control map (position and shape)? IoU of the checker's foreground with the map's
    silhouette, plus each map shape's distance to the nearest detected shape; from pixels alone, like `check`.

    `control`: the silhouette the ControlNet was given (white shapes on black; uint8 or float, any channels equal).
    """
    analysis = analyze(image)
    sil = _to_uint8_128(control).max(-1) > MAP_THRESHOLD
    fg = analysis.foreground
    union = int((fg | sil).sum())
    iou = 1.0 if union == 0 else float((fg & sil).sum()) / union
    want = _map_components(control)
    got = [d.centroid for d in analysis.shapes]
    errors = [math.inf] * len(want)
    best = math.inf
    for perm in itertools.permutations(range(len(got)), min(len(want), len(got))):
        errs = [math.hypot(want[i][0] - got[j][0], want[i][1] - got[j][1]) for i, j in enumerate(perm)]
        errs += [math.inf] * (len(want) - len(errs))
        if sum(min(e, 1e6) for e in errs) < best:
            best, errors = sum(min(e, 1e6) for e in errs), errs
    count = len(got) == len(want)
    matched = count and iou >= MAP_IOU_MIN and all(e <= MAP_CENTROID_MAX for e in errors)
    return MapResult(matched=bool(matched), iou=round(iou, 4), centroid_errors=[round(e, 2) for e in errors],
                     count=count, analysis=analysis)
