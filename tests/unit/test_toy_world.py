"""The toy world: determinism, captions that match the pixels, and the text stack."""

from __future__ import annotations

import random

import pytest
import torch

from senseflow.toy.text import (EOS_TOKEN, MAX_LENGTH, build_text_encoder, build_tokenizer, check_prompt,
                                encode_prompts, load_tokenizer)
from senseflow.toy.world import (BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, VOCABULARY, Scene, ShapeSpec,
                                 ToyWorld, evaluation_prompts, parse_caption, render, render_batch,
                                 sample_scene)


def _rgb(name: str) -> torch.Tensor:
    table = {**COLORS, **BACKGROUNDS}
    return torch.tensor(table[name]) * 2 - 1


def _cell_box(cell: int, margin: int = 0) -> tuple[slice, slice]:
    """Pixel rows/cols strictly inside a 32-px grid cell (cells are 10.67 px)."""
    row, col = divmod(cell, 3)
    lo = lambda k: int(k * 32 / 3) + 1 + margin  # noqa: E731
    hi = lambda k: int((k + 1) * 32 / 3) - margin  # noqa: E731
    return slice(lo(row), hi(row)), slice(lo(col), hi(col))


# -- determinism ---------------------------------------------------------------------------------
def test_batches_are_deterministic_per_seed_and_index():
    a = ToyWorld(seed=3).batch(16, index=5)
    b = ToyWorld(seed=3).batch(16, index=5)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    other_index = ToyWorld(seed=3).batch(16, index=6)
    other_seed = ToyWorld(seed=4).batch(16, index=5)
    assert not torch.equal(a[0], other_index[0]) and a[1] != other_index[1]
    assert not torch.equal(a[0], other_seed[0]) and a[1] != other_seed[1]


def test_batch_prefix_does_not_depend_on_batch_size_and_prompts_match():
    world = ToyWorld(seed=11)
    big, small = world.batch(12, 2), world.batch(5, 2)
    assert torch.equal(big[0][:5], small[0]) and big[1][:5] == small[1]
    assert world.prompts(12, 2) == big[1]


def test_images_have_the_documented_shape_and_range():
    images, captions, scenes = ToyWorld(seed=0).batch(32, 0)
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert len(captions) == len(scenes) == 32
    assert {len(s.shapes) for s in scenes} == {1, 2}
    assert ToyWorld(seed=0, resolution=64).batch(4, 0)[0].shape == (4, 3, 64, 64)


# -- captions ------------------------------------------------------------------------------------
def test_caption_round_trip_and_vocabulary():
    rng = random.Random(0)
    for k in range(300):
        scene = sample_scene(rng if k % 2 else torch.Generator().manual_seed(k))
        caption = scene.caption()
        assert parse_caption(caption) == scene
        assert set(caption.split()) <= set(VOCABULARY)
        assert len(caption.split()) + 2 <= MAX_LENGTH
        assert [s.cell for s in scene.shapes] == sorted({s.cell for s in scene.shapes})


def test_caption_examples():
    one = Scene((ShapeSpec("circle", "red", "small", "top left"),), "white")
    assert one.caption() == "a small red circle in the top left on a white background"
    two = Scene((ShapeSpec("square", "blue", "large", "center"),
                 ShapeSpec("triangle", "green", "small", "bottom right")), "black")
    assert two.caption() == ("a large blue square in the center and a small green triangle "
                             "in the bottom right on a black background")
    assert parse_caption(two.caption().upper()) == two


@pytest.mark.parametrize("caption, needle", [
    ("a small red dog in the top left on a white background", "dog"),
    ("a small red circle in the top left on a white background please", "please"),
    ("a small red circle at the left on a white background", "found 'at'"),
    ("a red small circle in the top left on a white background", "size"),
    ("a small red circle in the top left", "early"),
    ("a small red circle in the top left on a white background background", "after"),
])
def test_parse_caption_rejects_bad_captions(caption, needle):
    with pytest.raises(ValueError, match=needle):
        parse_caption(caption)


def test_scene_validation():
    with pytest.raises(ValueError, match="share"):
        Scene((ShapeSpec("circle", "red", "small", "top"), ShapeSpec("cross", "blue", "large", "top")), "white")
    with pytest.raises(ValueError, match="color"):
        ShapeSpec("circle", "pink", "small", "top")
    with pytest.raises(ValueError, match="background"):
        Scene((ShapeSpec("circle", "red", "small", "top"),), "red")


def test_canonical_render_pixels_match_the_caption():
    """Cell centre pixel = the named colour, corners = background, for every attribute value."""
    for k, (shape, color, size, position, bg) in enumerate(zip(
            SHAPES * 2, [*COLORS] * 2, SIZES * 5, POSITIONS + POSITIONS[:1], [*BACKGROUNDS] * 4)):
        scene = Scene((ShapeSpec(shape, color, size, position),), bg)
        image = render(scene)
        row, col = divmod(scene.shapes[0].cell, 3)
        cy, cx = int((row + 0.5) * 32 / 3), int((col + 0.5) * 32 / 3)
        assert torch.allclose(image[:, cy, cx], _rgb(color), atol=1e-5), (k, scene.caption())
        for y, x in ((0, 0), (0, 31), (31, 0), (31, 31)):
            assert torch.allclose(image[:, y, x], _rgb(bg), atol=1e-5), (k, scene.caption(), y, x)
        assert torch.equal(image, render_batch([scene])[0])


def test_random_placements_keep_colours_and_cells():
    """Jittered images: each named cell shows its colour; every other cell is pure background."""
    images, _, scenes = ToyWorld(seed=7).batch(64, 0)
    for image, scene in zip(images, scenes):
        bg = _rgb(scene.background)
        named = {s.cell: s for s in scene.shapes}
        for cell in range(9):
            rows, cols = _cell_box(cell, margin=0)
            patch = image[:, rows, cols].flatten(1)
            differs = (patch - bg[:, None]).abs().amax(0) > 0.05
            if cell not in named:
                assert not differs.any(), scene.caption()
                continue
            fg = patch[:, (patch - _rgb(named[cell].color)[:, None]).abs().amax(0) < 0.1]
            assert fg.shape[1] >= 4, scene.caption()  # at least a few pure-colour pixels
            assert differs.sum() >= fg.shape[1]
            # the pixel farthest from the background (fully covered) is nearest to the named colour
            palette = torch.stack([_rgb(c) for c in COLORS])
            core = patch[:, int(((patch - bg[:, None]) ** 2).sum(0).argmax())]
            nearest = list(COLORS)[int(((palette - core) ** 2).sum(1).argmin())]
            assert nearest == named[cell].color, scene.caption()


def test_large_shapes_cover_more_pixels_than_small_ones():
    small = render(Scene((ShapeSpec("square", "red", "small", "center"),), "white"))
    large = render(Scene((ShapeSpec("square", "red", "large", "center"),), "white"))
    cover = lambda im: ((im - _rgb("white")[:, None, None]).abs().amax(0) > 0.05).sum()  # noqa: E731
    assert cover(large) > 1.5 * cover(small)


def test_evaluation_prompts_are_fixed_and_cover_every_value():
    prompts = evaluation_prompts()
    assert prompts == evaluation_prompts() and len(prompts) == 64
    assert prompts != evaluation_prompts(seed=99)
    scenes = [parse_caption(p) for p in prompts]
    firsts = [s for scene in scenes for s in scene.shapes]
    assert {s.shape for s in firsts} == set(SHAPES)
    assert {s.color for s in firsts} == set(COLORS)
    assert {s.size for s in firsts} == set(SIZES)
    assert {s.position for s in firsts} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.shapes) for s in scenes} == {1, 2}
    assert len(evaluation_prompts(10)) == 10


# -- text stack ----------------------------------------------------------------------------------
def test_tokenizer_round_trip_offline(tmp_path):
    build_tokenizer(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path / "tokenizer")
    prompt = "a large blue square in the center and a small green triangle in the bottom right on a black background"
    ids = encode_prompts(tok, [prompt, "a small red circle at the top on a gray background"])
    assert ids.shape == (2, MAX_LENGTH)
    assert tok.decode(ids[0], skip_special_tokens=True) == prompt
    assert ids[0, 0] == tok.bos_token_id and (ids[0] == tok.convert_tokens_to_ids(EOS_TOKEN)).sum() == 1
    assert (ids[1, 13:] == tok.pad_token_id).all() and ids[1, 12] != tok.pad_token_id
    assert tok.unk_token_id not in ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_unknown_words_are_named():
    with pytest.raises(ValueError, match="'dog'"):
        check_prompt("a small red dog at the top on a white background")
    with pytest.raises(ValueError, match="'dog'"):
        encode_prompts(build_tokenizer(), ["a red dog"])
    with pytest.raises(ValueError, match="words"):
        check_prompt(" ".join(["a"] * MAX_LENGTH))
    assert check_prompt("A Small red circle") == ["a", "small", "red", "circle"]


def test_text_encoder_is_seeded_and_saves_and_loads(tmp_path):
    from transformers import CLIPTextModelWithProjection

    state = torch.get_rng_state()
    enc = build_text_encoder(seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    ids = encode_prompts(build_tokenizer(), evaluation_prompts(4))
    enc.save_pretrained(tmp_path / "text_encoder")
    loaded = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval()
    with torch.no_grad():
        a, b = enc(ids, output_hidden_states=True), loaded(ids, output_hidden_states=True)
        c = build_text_encoder(seed=0)(ids)
        d = build_text_encoder(seed=1)(ids)
    assert torch.equal(a.text_embeds, b.text_embeds) and torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.text_embeds, c.text_embeds) and not torch.allclose(a.text_embeds, d.text_embeds)
    assert a.last_hidden_state.shape == (4, MAX_LENGTH, 64) and a.text_embeds.shape == (4, 64)
    assert not any(p.requires_grad for p in enc.parameters())
    # the pooled embedding is read at EOS, so different prompts give different embeddings
    assert torch.cdist(a.text_embeds, a.text_embeds).triu(1)[0, 1:].min() > 1e-3


def test_open_captions_leave_positions_out_and_round_trip():
    scene = Scene((ShapeSpec("circle", "red", "small", "top left"), ShapeSpec("square", "blue", "large", "center")),
                  "white")
    opened = scene.without_positions()
    assert opened.caption() == "a small red circle and a large blue square on a white background"
    assert parse_caption(opened.caption()) == opened
    assert all(s.position is None for s in opened.shapes)
    with pytest.raises(ValueError, match="open position"):
        opened.shapes[0].cell


def _cell_of(mask: torch.Tensor) -> int:
    """Grid cell (0..8, reading order) of the centroid of a 32x32 boolean mask."""
    row, col = (mask.nonzero().float().mean(0) // (32 / 3)).long().tolist()
    return 3 * row + col


def test_open_scenes_render_in_distinct_random_cells():
    opened = parse_caption("a large red circle and a large blue square on a white background")
    rng = random.Random(0)
    layouts = set()
    for _ in range(12):
        image = render_batch([opened], generator=rng)[0]
        red = (image[0] > 0.4) & (image[2] < -0.4)  # red pixels on white
        blue = (image[2] > 0.4) & (image[0] < -0.4)
        assert red.sum() > 20 and blue.sum() > 20
        assert _cell_of(red) != _cell_of(blue)
        layouts.add((_cell_of(red), _cell_of(blue)))
    assert len(layouts) >= 4  # one prompt, many layouts
    assert torch.equal(render_batch([opened])[0], render_batch([opened])[0])  # canonical stays deterministic


def test_world_opens_the_requested_fraction_of_captions_and_keeps_the_default_stream():
    default, zero = ToyWorld(5).batch(16, 3), ToyWorld(5, open_positions=0.0).batch(16, 3)
    assert torch.equal(default[0], zero[0]) and default[1] == zero[1]
    images, captions, scenes = ToyWorld(5, open_positions=1.0).batch(16, 3)
    assert torch.equal(images[:1], default[0][:1])  # item 0 is drawn before its caption's coin
    for caption, scene in zip(captions, scenes):
        assert parse_caption(caption) == scene.without_positions()
    half = ToyWorld(5, open_positions=0.5).prompts(200, 0)
    n_open = sum(all(s.position is None for s in parse_caption(c).shapes) for c in half)
    assert 70 <= n_open <= 130
    with pytest.raises(ValueError, match="probability"):
        ToyWorld(5, open_positions=1.5)


def test_open_evaluation_prompts_are_the_fixed_set_without_positions():
    closed, opened = evaluation_prompts(32), evaluation_prompts(32, open_positions=True)
    assert opened == [parse_caption(c).without_positions().caption() for c in closed]
