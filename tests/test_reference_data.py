"""The procedural shapes data: deterministic, grammar round-trips, renders what the caption says."""

import random

import numpy as np
import pytest

from paradiff.reference import data


def test_heldout_set_is_fixed_unique_and_mixed():
    a, b = data.heldout_set(), data.heldout_set()
    assert a == b and len(a) == 64
    caps = [c for c, _ in a]
    assert len(set(caps)) == 64
    assert [s for _, s in a] == list(range(1000, 1064))
    two = sum(" and a " in c for c in caps)
    assert 10 <= two <= 40, two  # a mix of one- and two-shape prompts


def test_caption_grammar_round_trip():
    rng = random.Random(0)
    for _ in range(500):
        scene = data.sample_scene(rng)
        cap = data.caption(scene)
        back = data.parse_caption(cap)
        assert data.caption(back) == cap
        assert back.background == scene.background and back.gradient == scene.gradient
        assert [(s.kind, s.color, s.size, s.position) for s in back.shapes] == [
            (s.kind, s.color, s.size, s.position) for s in scene.shapes]
        assert all(s.color != scene.background for s in scene.shapes)


def test_grammar_vocabulary_and_example():
    assert {"red", "green", "blue", "yellow", "white", "black", "orange", "purple"} <= set(data.COLORS)
    assert set(data.SHAPES) == {"circle", "square", "triangle", "star"}
    assert {"left", "right", "top", "bottom", "center", "top left", "top right", "bottom left",
            "bottom right"} == set(data.POSITIONS)
    s = data.parse_caption("a red circle on the left and a blue square on the right, white background".replace(
        "a red", "a small red").replace("a blue", "a large blue"))
    assert [x.position for x in s.shapes] == ["left", "right"] and s.background == "white"


@pytest.mark.parametrize("bad", ["a red circle", "a huge red circle on the left, blue background",
                                 "a small red circle on the left, teal background"])
def test_parse_rejects_text_outside_grammar(bad):
    with pytest.raises(ValueError):
        data.parse_caption(bad)


def test_sampler_is_seeded_and_skips_heldout():
    held = data.heldout_captions()
    a = [data.caption(s) for s in data.SceneSampler(3).batch(300)]
    b = [data.caption(s) for s in data.SceneSampler(3).batch(300)]
    assert a == b
    assert not held & set(a)
    c = [data.caption(s) for s in data.SceneSampler(4).batch(300)]
    assert a != c


def test_render_puts_colours_where_the_caption_says():
    scene = data.parse_caption("a large red square in the top left corner, blue background")
    img = data.render_numpy([scene])[0]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    x, y = (int(v * 128) for v in data.POSITIONS["top left"])
    assert tuple(img[y, x]) == data.COLORS["red"]
    assert tuple(img[120, 120]) == data.COLORS["blue"]  # plain background: exact colour everywhere
    grad = data.render_numpy([data.parse_caption("a small red square at the top, blue gradient background")])[0]
    assert np.abs(grad[2, 2].astype(int) - data.COLORS["blue"]).max() <= 3
    assert np.abs(grad[125, 2].astype(int) - data.COLORS["blue"]).max() > 30  # darker towards mid-gray at the bottom
