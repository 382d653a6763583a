"""DMD2's GAN head on several blocks (``method.gan_head.depths``), as NVIDIA FastGen's ``feature_indices``.

Reference: FastGen ``configs/experiments/QwenImage/config_dmd2.py`` (``discriminator.feature_indices``, e.g.
``[30, 45]`` of Qwen-Image's 60 blocks) and its discriminator module (one head per feature index, their
logits concatenated before the loss).  Block indices and losses below are worked out by hand / with ``math``.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from senseflow.discriminators.dmd2_head import GANHeadConfig, MultiGANHead, attach_gan_head, depth_blocks
from senseflow.methods import DMD2, DMD2Config
from senseflow.methods.base import Batch
from senseflow.rng import RandomStreams
from senseflow.teachers.base import SenseflowError
from tests.helpers.models import PROMPTS, tiny_models
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)

TAP = {"feature_channels": 32, "feature_size": (8, 8)}   # TinyConditionalNet at 8 px: blocks.0..2, [B, 32, 8, 8]
DEPTHS = [0.5, 0.75, 0.99]


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def _method(**kw):
    models = tiny_models()
    return models, DMD2(models, DMD2Config(ttur=1, gan_head=GANHeadConfig(enabled=True, depths=DEPTHS, **TAP, **kw)))


def test_depths_pick_blocks_by_floor_and_drop_repeats():
    four = [f"b{i}" for i in range(4)]
    # 0.5 * 4 = 2, 0.75 * 4 = 3, 0.99 * 4 = 3.96 -> 3 (a repeat, dropped)
    assert depth_blocks(four, DEPTHS) == ["b2", "b3"]
    assert depth_blocks(four, [1.0]) == ["b3"]          # 4 -> clipped to the last block
    assert depth_blocks(four, [0.01, 0.25]) == ["b0", "b1"]
    sixty = [f"transformer_blocks.{i}" for i in range(60)]   # Qwen-Image: 30, 45, floor(59.4) = 59
    assert depth_blocks(sixty, DEPTHS) == ["transformer_blocks.30", "transformer_blocks.45", "transformer_blocks.59"]
    eight = [f"d{i}" for i in range(8)]                  # FLUX.2-dev's 8 double blocks: 4, 6, floor(7.92) = 7
    assert depth_blocks(eight, DEPTHS) == ["d4", "d6", "d7"]


@pytest.mark.parametrize("bad", [[], [0.0], [-0.5], [1.5], [0.5, 1.01]])
def test_bad_depths_are_refused(bad):
    with pytest.raises(ValidationError, match="depths must be a non-empty list of fractions in"):
        GANHeadConfig(enabled=True, depths=bad)


def test_one_head_per_tapped_block():
    models, method = _method()
    head = models.fake_score.gan_head
    assert isinstance(head, MultiGANHead)
    assert [h.tap.name for h in head.heads] == ["blocks.1", "blocks.2"]   # 3 blocks: floor(1.5), floor(2.25), 2
    # different init per head (seed + k), so the heads are not copies of one another
    assert not torch.equal(next(head.heads[0].parameters()), next(head.heads[1].parameters()))


def _manual(models, x_t, t, cond):
    """Each head applied to its block's output, read with hand-made hooks."""
    store = {}
    net = models.fake_score.backbone
    hs = [net.blocks[i].register_forward_hook(lambda _m, _i, out, i=i: store.__setitem__(i, out)) for i in (1, 2)]
    models.fake_score.native(x_t, t, cond, None)
    for h in hs:
        h.remove()
    heads = models.fake_score.gan_head.heads
    return [heads[0].head(store[1]).float().tolist(), heads[1].head(store[2]).float().tolist()]


def test_combined_losses_are_the_mean_of_the_per_head_losses():
    models, method = _method()
    cond = models.teacher.adapter.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(3)
    x_real, x_fake = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    head = models.fake_score.gan_head
    from senseflow.discriminators.dmd2_head import gan_classifier_loss, gan_generator_loss
    real_logits, fake_logits = head.logits(models.fake_score, x_real, t, cond), head.logits(models.fake_score, x_fake,
                                                                                            t, cond)
    real, fake = _manual(models, x_real, t, cond), _manual(models, x_fake, t, cond)
    assert real_logits.shape == (8,)
    assert real_logits.tolist() == pytest.approx(real[0] + real[1], rel=1e-5)   # head-major concatenation
    per_head_cls = [sum(_softplus(v) for v in fake[k]) / 4 + sum(_softplus(-v) for v in real[k]) / 4 for k in (0, 1)]
    per_head_gen = [sum(_softplus(-v) for v in fake[k]) / 4 for k in (0, 1)]
    assert gan_classifier_loss(real_logits, fake_logits).item() == pytest.approx(sum(per_head_cls) / 2, rel=1e-5)
    assert gan_generator_loss(fake_logits).item() == pytest.approx(sum(per_head_gen) / 2, rel=1e-5)


def test_the_classifier_phase_reaches_every_head():
    models, method = _method()
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = Batch(list(PROMPTS), models.teacher.adapter.encode_prompts(PROMPTS), latents=real)
    out = method.fake_score_loss(batch, RandomStreams(0))
    out.loss.backward()
    for head in models.fake_score.gan_head.heads:
        grads = [p.grad for p in head.parameters()]
        assert all(gr is not None for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_errors_are_one_line():
    models = tiny_models()   # its adapter names no feature tap (as Z-Image): depths need feature_*
    with pytest.raises(SenseflowError, match="names no block features to tap"):
        attach_gan_head(models.fake_score, GANHeadConfig(enabled=True, depths=DEPTHS))
    with pytest.raises(SenseflowError, match="layer or depths, not both"):
        attach_gan_head(models.fake_score, GANHeadConfig(enabled=True, depths=DEPTHS, layer="blocks.1", **TAP))


# -------------------------------------------------------------------------------------------------
# the Qwen-Image recipe and FLUX.2's tappable blocks, on tiny folders
# -------------------------------------------------------------------------------------------------
def test_qwenimage_recipe_reads_three_depths(tmp_path):
    from senseflow.build import build_models
    from senseflow.config import load_config
    from tests.helpers.tiny_qwenimage import make_tiny_qwenimage_folder

    folder = make_tiny_qwenimage_folder(tmp_path / "q")
    folder = getattr(folder, "path", folder)
    cfg = load_config("configs/qwenimage/dmd2.yaml", [f"paths.teacher={folder}", "teacher.resolution=32"],
                      check_paths=False)
    assert cfg.method.gan_head.depths == DEPTHS
    models = build_models(cfg, torch.device("cpu"))
    blocks = models.fake_score.adapter.block_names(models.fake_score.backbone)
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    head = models.fake_score.gan_head
    # 2 blocks: floor(1.0), floor(1.5), floor(1.98) are all block 1 -> one head (60 blocks: 30, 45, 59)
    assert [h.tap.name for h in head.heads] == ["transformer_blocks.1"]
    assert all(h.tap.index == 1 for h in head.heads)   # the image stream of (text, image)


def test_flux2_depths_pick_among_double_stream_blocks(tmp_path):
    from tests.helpers import tiny_flux2
    from senseflow.teachers.flux2 import Flux2Adapter

    folder = tiny_flux2.make_tiny_flux2_dev_folder(tmp_path / "f")
    adapter, backbone = Flux2Adapter.from_pretrained(getattr(folder, "path", folder), resolution=32)
    double = [n for n in adapter.block_names(backbone) if n.startswith("transformer_blocks.")]
    assert adapter.feature_blocks(backbone) == double and len(double) < len(adapter.block_names(backbone))
    # 2 double + 2 single blocks: depths among the 2 double ones, floor(0.5) = 0, floor(1.98) = 1
    from senseflow.teachers.base import Denoiser

    fake = Denoiser(backbone, adapter)
    head = attach_gan_head(fake, GANHeadConfig(enabled=True, depths=[0.25, 0.99]))
    assert [(h.tap.name, h.tap.index) for h in head.heads] == [("transformer_blocks.0", 1), ("transformer_blocks.1", 1)]
    x = torch.randn(2, *adapter.latent_shape())
    t = adapter.schedule.from_unit(torch.tensor([0.7, 0.4], dtype=torch.float64))
    with torch.no_grad():
        assert head.logits(fake, x, t, adapter.encode_prompts(["a red cat", "a dog"])).shape == (4,)


def test_bad_depths_in_a_config_are_one_line():
    from senseflow.config import validate

    base = {"paths": {"teacher": "builtin:toy", "prompts": "builtin:toy-world-open", "output": "/tmp/x"},
            "teacher": {"family": "toy", "resolution": 32},
            "method": {"name": "dmd2", "gan_head": {"enabled": True, "depths": [0.5, 0.0]}}}
    with pytest.raises(SenseflowError) as err:
        validate(base)
    assert "depths" in str(err.value) and "\n" not in str(err.value).strip()


def test_heads_are_checkpointed_and_resumed(tmp_path):
    from senseflow.train.checkpoint import load_checkpoint, save_checkpoint

    models, method = _method()
    with torch.no_grad():
        for p in models.fake_score.gan_head.parameters():
            p.add_(0.25)
    path = save_checkpoint(tmp_path, 3, method.networks(), {"step": 3})
    other, method2 = _method()
    load_checkpoint(path, method2.networks())
    pairs = list(zip(other.fake_score.gan_head.parameters(), models.fake_score.gan_head.parameters()))
    assert len(pairs) > 0 and all(torch.equal(a, b) for a, b in pairs)
