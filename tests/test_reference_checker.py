"""The adherence checker reads scenes back from pixels: perfect on clean renders, rejects wrong captions."""

import random

import numpy as np
from PIL import Image

from paradiff.reference import checker, data


def _scenes():
    rng = random.Random(11)
    held = [data.parse_caption(c) for c, _ in data.heldout_set()]
    jittered = [data.sample_scene(rng) for _ in range(150)]
    return held, jittered


def test_perfect_on_clean_heldout_renders():
    held, _ = _scenes()
    imgs = data.render_numpy(held)
    results = [checker.check(im, s.caption) for im, s in zip(imgs, held)]
    failed = [r.caption for r in results if not r.matched]
    assert not failed, failed
    assert all(r.details["gradient"] for r in results)


def test_perfect_on_jittered_training_renders():
    _, jit = _scenes()
    imgs = data.render_numpy(jit)
    failed = [s.caption for im, s in zip(imgs, jit) if not checker.check(im, s.caption).matched]
    assert not failed, failed


def test_shuffled_captions_rarely_match():
    held, _ = _scenes()
    imgs = data.render_numpy(held)
    caps = [s.caption for s in held]
    caps = caps[1:] + caps[:1]  # every image gets another prompt's caption
    acc = np.mean([checker.check(im, c).matched for im, c in zip(imgs, caps)])
    assert acc < 0.1


def test_single_attribute_changes_are_caught_and_reported():
    scene = data.parse_caption("a small red circle on the left, blue background")
    img = data.render_numpy([scene])[0]
    assert checker.check(img, scene.caption).matched
    for wrong, attr in [("a small green circle on the left, blue background", "color"),
                        ("a large red circle on the left, blue background", "size"),
                        ("a small red star on the left, blue background", "kind"),
                        ("a small red circle on the right, blue background", "position")]:
        r = checker.check(img, wrong)
        assert not r.matched
        assert r.details["shapes"][0][attr] is False
        assert sum(not ok for ok in r.details["shapes"][0].values()) == 1
    r = checker.check(img, "a small red circle on the left, white background")
    assert not r.matched and r.details["background"] is False
    r = checker.check(img, "a small red circle on the left and a large red square on the right, blue background")
    assert not r.matched and r.details["count"] is False


def test_accepts_pil_float_and_other_sizes():
    scene = data.parse_caption("a large yellow triangle in the bottom right corner, black gradient background")
    img = data.render_numpy([scene])[0]
    assert checker.check(Image.fromarray(img), scene.caption).matched
    assert checker.check(img.astype(np.float32) / 255.0, scene.caption).matched
    big = np.asarray(Image.fromarray(img).resize((256, 256), Image.BICUBIC))
    assert checker.check(big, scene.caption).matched


def test_blank_image_has_no_shapes():
    blank = np.full((128, 128, 3), data.COLORS["green"], np.uint8)
    a = checker.analyze(blank)
    assert a.background == "green" and not a.shapes and not a.gradient
