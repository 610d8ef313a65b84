"""Procedural text-to-image data for the reference model: coloured shapes on plain or gradient backgrounds.

Everything is generated from a seed (no downloads). Scenes are sampled on the CPU as small Python objects and
rendered in batches with torch on whatever device the trainer uses, so a GPU trainer gets tens of thousands of
128x128 images per second without DataLoader workers. The same renderer produces the checker's ground truth.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 128

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# centre of each named position, as fractions of the image side (x, y)
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
# base "radius" in pixels per size; every shape is drawn to a comparable visual size around it
SIZE_RADIUS = {"small": 10.0, "large": 22.0}
GRADIENT_MIX = 0.35  # a gradient background goes from the named colour (top) towards mid gray (bottom)
# two shapes are placed at positions at least this far apart (fraction of the side) so they never touch
MIN_PAIR_DISTANCE = 0.49


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str
    # rendering jitter: offset in pixels and scale factor; not part of the caption
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str
    gradient: bool
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        return caption(self)


def _shape_phrase(s: Shape) -> str:
    return f"a {s.size} {s.color} {s.kind} {POSITION_PHRASES[s.position]}"


def caption(scene: Scene, positions: bool = True) -> str:
    """Caption grammar: '<shape phrase>[ and <shape phrase>], <colour> [gradient ]background'.

    `positions=False` withholds the position phrases ('a small red circle, blue background'): the ControlNet's
    captions, so that where a shape goes can only come from the control map.
    """
    bg = f"{scene.background} gradient background" if scene.gradient else f"{scene.background} background"
    phrase = _shape_phrase if positions else (lambda s: f"a {s.size} {s.color} {s.kind}")
    return " and ".join(phrase(s) for s in scene.shapes) + ", " + bg


_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}
_SHAPE_RE = re.compile(
    r"an? (?P<size>%s) (?P<color>%s) (?P<kind>%s) (?P<pos>%s)"
    % ("|".join(SIZES), "|".join(COLORS), "|".join(SHAPES), "|".join(sorted(_PHRASE_TO_POS, key=len, reverse=True)))
)
_BG_RE = re.compile(r",\s*(?P<color>%s) (?P<grad>gradient )?background\s*$" % "|".join(COLORS))


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` (raises ValueError on text outside the grammar), so any grammar caption can be scored."""
    text = text.strip().lower()
    m = _BG_RE.search(text)
    if not m:
        raise ValueError(f"caption has no '<colour> background' clause: {text!r}")
    head = text[: m.start()]
    parts = head.split(" and ")
    shapes = []
    for p in parts:
        sm = _SHAPE_RE.fullmatch(p.strip())
        if not sm:
            raise ValueError(f"cannot parse shape phrase {p!r} in {text!r}")
        shapes.append(Shape(sm["kind"], sm["color"], sm["size"], _PHRASE_TO_POS[sm["pos"]]))
    return Scene(m["color"], bool(m["grad"]), tuple(shapes))


def _pos_distance(a: str, b: str) -> float:
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return math.hypot(ax - bx, ay - by)


POSITION_PAIRS = [
    (a, b) for a in POSITIONS for b in POSITIONS if a != b and _pos_distance(a, b) >= MIN_PAIR_DISTANCE
]


def sample_scene(rng: random.Random, two_shape_prob: float = 0.4, jitter: bool = True) -> Scene:
    """One random scene. Shape colours differ from the background; two shapes sit at well-separated positions."""
    bg = rng.choice(list(COLORS))
    gradient = rng.random() < 0.5
    n = 2 if rng.random() < two_shape_prob else 1
    if n == 1:
        positions = [rng.choice(list(POSITIONS))]
    else:
        positions = list(rng.choice(POSITION_PAIRS))
    shapes = []
    fg_colors = [c for c in COLORS if c != bg]
    for pos in positions:
        shapes.append(
            Shape(
                kind=rng.choice(SHAPES),
                color=rng.choice(fg_colors),
                size=rng.choice(SIZES),
                position=pos,
                dx=rng.uniform(-4, 4) if jitter else 0.0,
                dy=rng.uniform(-4, 4) if jitter else 0.0,
                scale=rng.uniform(0.9, 1.1) if jitter else 1.0,
                angle=rng.uniform(-0.15, 0.15) if jitter else 0.0,
            )
        )
    return Scene(bg, gradient, tuple(shapes))


def heldout_set(n: int = 64, seed: int = 1234) -> list[tuple[str, int]]:
    """The fixed evaluation prompts: (caption, generation seed) pairs; about 60% one shape, 40% two shapes.

    Deterministic for a given (n, seed); captions are unique. The trainer excludes these exact captions.
    """
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    seen = set()
    while len(out) < n:
        scene = sample_scene(rng, two_shape_prob=0.4, jitter=False)
        c = caption(scene)
        if c in seen:
            continue
        seen.add(c)
        out.append((c, 1000 + len(out)))
    return out


def heldout_captions(n: int = 64, seed: int = 1234) -> set[str]:
    return {c for c, _ in heldout_set(n, seed)}


class SceneSampler:
    """Infinite stream of training scenes from a seed, skipping the held-out captions."""

    def __init__(self, seed: int, exclude: set[str] | None = None, two_shape_prob: float = 0.4):
        self.rng = random.Random(seed)
        self.exclude = heldout_captions() if exclude is None else exclude
        self.two_shape_prob = two_shape_prob

    def batch(self, n: int) -> list[Scene]:
        out = []
        while len(out) < n:
            s = sample_scene(self.rng, self.two_shape_prob)
            if caption(s) not in self.exclude:
                out.append(s)
        return out


# ----------------------------------------------------------------------------------------------- rendering

def _scene_arrays(scenes: list[Scene]):
    """Pack scenes into arrays: background rgb, gradient flag, and per slot (2) shape params + presence."""
    b = len(scenes)
    bg = np.zeros((b, 3), np.float32)
    grad = np.zeros((b,), np.float32)
    # slot params: present, kind index, cx, cy, radius, angle, r, g, b
    sp = np.zeros((b, 2, 9), np.float32)
    for i, sc in enumerate(scenes):
        bg[i] = COLORS[sc.background]
        grad[i] = float(sc.gradient)
        for j, s in enumerate(sc.shapes[:2]):
            px, py = POSITIONS[s.position]
            sp[i, j] = (
                1.0,
                SHAPES.index(s.kind),
                px * IMAGE_SIZE + s.dx,
                py * IMAGE_SIZE + s.dy,
                SIZE_RADIUS[s.size] * s.scale,
                s.angle,
                *COLORS[s.color],
            )
    return bg, grad, sp


def _sdf(torch, kind, x, y, r):
    """Signed distance (pixels, negative inside) of each shape kind, in a frame with y pointing up.

    x, y: (B,1,H,W) coordinates relative to the shape centre; r: (B,1,1,1) base radius; kind: (B,1,1,1).
    Each shape is scaled so its visual size is comparable to a circle of radius r.
    """
    # circle
    d_circle = torch.sqrt(x * x + y * y) - r
    # square (axis-aligned in its rotated frame), half side 0.9 r
    d_square = torch.maximum(x.abs(), y.abs()) - 0.9 * r
    # equilateral triangle pointing up: intersection of three half-planes, inradius 0.62 r
    c30, s30 = math.cos(math.pi / 6), 0.5
    inr = 0.62 * r
    d_tri = torch.maximum(torch.maximum(-y, c30 * x + s30 * y), -c30 * x + s30 * y) - inr
    # five-pointed star (Inigo Quilez's exact sdStar5), outer radius 1.25 r, inner ratio 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    rs = 1.25 * r
    px = x.abs()
    py = y
    d = torch.clamp(k1x * px + k1y * py, min=0.0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = torch.clamp(k2x * px + k2y * py, min=0.0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px = px.abs()
    py = py - rs
    rf = 0.45
    bax, bay = rf * (-k1y), rf * k1x - 1.0
    h = torch.clamp((px * bax + py * bay) / (bax * bax + bay * bay), min=0.0)
    h = torch.minimum(h, rs)
    sign = torch.sign(py * bax - px * bay)
    d_star = torch.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2) * sign
    return torch.where(
        kind == 0, d_circle, torch.where(kind == 1, d_square, torch.where(kind == 2, d_tri, d_star))
    )


def _coverages(scenes: list[Scene], device, size: int):
    """Anti-aliased coverage in [0,1] of each of the two shape slots, (B,1,H,W) each; and the pixel coordinates."""
    import torch

    _, _, sp = _scene_arrays(scenes)
    sp = torch.from_numpy(sp).to(device)
    s = size / IMAGE_SIZE
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / s
    yy = coords.view(1, 1, size, 1)
    xx = coords.view(1, 1, 1, size)
    covs = []
    for j in range(2):
        p = sp[:, j]
        present = p[:, 0].view(-1, 1, 1, 1)
        kind = p[:, 1].view(-1, 1, 1, 1)
        cx, cy, r, ang = (p[:, k].view(-1, 1, 1, 1) for k in (2, 3, 4, 5))
        dx, dy = xx - cx, -(yy - cy)  # y up
        ca, sa = torch.cos(ang), torch.sin(ang)
        rx, ry = ca * dx + sa * dy, -sa * dx + ca * dy
        d = _sdf(torch, kind, rx, ry, r) * s
        covs.append(torch.clamp(0.5 - d, 0.0, 1.0) * present)
    return covs, sp, coords


def render(scenes: list[Scene], device="cpu", size: int = IMAGE_SIZE):
    """Render scenes to a float tensor (B,3,H,W) in [0,1], anti-aliased. Works on CPU and GPU."""
    import torch

    bg, grad, _ = _scene_arrays(scenes)
    bg = torch.from_numpy(bg).to(device)[:, :, None, None] / 255.0
    grad = torch.from_numpy(grad).to(device)[:, None, None, None]
    covs, sp, coords = _coverages(scenes, device, size)
    # background: vertical gradient from the colour (top) towards mid gray (bottom) when gradient is set
    t = (coords.view(1, 1, size, 1) / IMAGE_SIZE) * GRADIENT_MIX * grad
    img = bg * (1 - t) + 0.5 * t
    img = img.expand(-1, 3, size, size).clone()
    for j, cov in enumerate(covs):
        color = sp[:, j, 6:9].view(-1, 3, 1, 1) / 255.0
        img = img * (1 - cov) + color * cov
    return img.clamp(0, 1)


def render_silhouette(scenes: list[Scene], device="cpu", size: int = IMAGE_SIZE):
    """The scenes' shape silhouettes (B,3,H,W) in [0,1]: white shapes on black, the same anti-aliased outlines as
    `render`; the reference ControlNet's condition (3 equal channels, as diffusers' control image processor
    gives)."""
    import torch

    covs, _, _ = _coverages(scenes, device, size)
    return torch.maximum(covs[0], covs[1]).expand(-1, 3, size, size).contiguous()


def render_numpy(scenes: list[Scene], silhouette: bool = False) -> np.ndarray:
    """Render on CPU to uint8 (B,H,W,3): the images, or with `silhouette` the control maps."""
    x = (render_silhouette if silhouette else render)(scenes, "cpu")
    return (x.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ControlCase:
    """One held-out ControlNet case: the prompt given to the pipeline, its seed, the full caption the checker scores
    against, and the control map (uint8 HxWx3 silhouette of the same scene)."""

    prompt: str
    seed: int
    caption: str
    control: np.ndarray = field(repr=False, compare=False)


def control_heldout_set(n: int = 64, positions: bool = False) -> list[ControlCase]:
    """The held-out scenes as ControlNet cases. With `positions=False` (the default protocol) the prompt withholds
    the position phrases, so a shape that lands where the caption says can only have been placed by the map."""
    pairs = heldout_set(n)
    scenes = [parse_caption(c) for c, _ in pairs]
    maps = render_numpy(scenes, silhouette=True)
    return [ControlCase(caption(s, positions=positions), seed, c, m) for (c, seed), s, m in zip(pairs, scenes, maps)]
