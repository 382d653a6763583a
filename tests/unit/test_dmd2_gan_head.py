"""DMD2's own GAN term: the classifier head on the fake score's bottleneck features.

Reference: tianweiy/DMD2 ``main/sd_guidance.py`` (``cls_pred_branch``, ``compute_cls_logits``,
``compute_guidance_clean_cls_loss``, ``compute_generator_clean_cls_loss``) and ``main/train_sd.py``
(the head sits in ``optimizer_guidance``; SDXL recipe weights 5e-3 / 1e-2).  Loss values below are
written out with ``math`` from the released formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from senseflow.config import OptimizerConfig, TrainConfig, load_config, validate
from senseflow.discriminators.dmd2_head import (ClassifierHead, GANHeadConfig, as_map, attach_gan_head,
                                                check_gan_data, gan_classifier_loss, gan_generator_loss)
from senseflow.methods import DMD2, DMD2Config, SenseFlow, SenseFlowConfig
from senseflow.methods.base import Batch
from senseflow.rng import RandomStreams
from senseflow.teachers.base import FeatureTap, SenseflowError
from senseflow.train.checkpoint import load_checkpoint, save_checkpoint
from senseflow.train.trainer import Trainer
from tests.helpers.models import PROMPTS, tiny_models
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)

TAP = {"layer": "blocks.1", "feature_channels": 32, "feature_size": (8, 8)}  # TinyConditionalNet at 8 px


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def _clone(rng: RandomStreams) -> RandomStreams:
    other = RandomStreams(0)
    other.load_state_dict(rng.state_dict())
    return other


def _batch(models, latents=True):
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1 if latents else None
    return Batch(list(PROMPTS), models.teacher.adapter.encode_prompts(PROMPTS), latents=real)


def _method(cls=DMD2, cfg_cls=DMD2Config, **kw):
    models = tiny_models()
    kw.setdefault("ttur", 1)
    kw.setdefault("gan_head", GANHeadConfig(enabled=True, **TAP))
    return models, cls(models, cfg_cls(**kw))


def _trainer(method, run_dir, lr: float) -> Trainer:
    """A single-process trainer over ``method`` with one optimiser setting for both networks, no data source."""
    opt = OptimizerConfig(lr=lr)
    return Trainer(method, None, TrainConfig(batch_size=4, progress=False, tensorboard=False),
                   {"generator": opt, "fake_score": opt}, run_dir, RandomStreams(0), torch.device("cpu"))


def _manual_logits(models, x_t, t, cond):
    """The head applied to the tapped block's output, read with a hand-made hook."""
    store = []
    handle = models.fake_score.backbone.blocks[1].register_forward_hook(lambda _m, _i, out: store.append(out))
    models.fake_score.native(x_t, t, cond, None)
    handle.remove()
    return models.fake_score.gan_head.head(store[0]).float()


# -------------------------------------------------------------------------------------------------
# losses and head, as released
# -------------------------------------------------------------------------------------------------
def test_released_losses_on_given_logits():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    cls = (_softplus(0.5) + _softplus(-3.0)) / 2 + (_softplus(-2.0) + _softplus(1.0)) / 2
    gen = (_softplus(-0.5) + _softplus(3.0)) / 2
    assert gan_classifier_loss(real, fake).item() == pytest.approx(cls, rel=1e-6)
    assert gan_generator_loss(fake).item() == pytest.approx(gen, rel=1e-6)
    # a perfect classifier: loss -> 0; the generator's loss is large exactly then
    assert gan_classifier_loss(torch.tensor([30.0]), torch.tensor([-30.0])).item() < 1e-12
    assert gan_generator_loss(torch.tensor([-30.0])).item() == pytest.approx(30.0, rel=1e-6)


def _convs(head):
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            for m in head.net if isinstance(m, nn.Conv2d)]


def test_head_is_the_released_sdxl_and_sd15_branch():
    with torch.device("meta"):
        sdxl = ClassifierHead(1280, (32, 32), 1280)   # SDXL 1024 px: mid-block 32 x 32
        sd15 = ClassifierHead(1280, (8, 8), 1280)     # SD1.5 512 px: mid-block 8 x 8
    s2 = (1280, 1280, (4, 4), (2, 2), (1, 1))
    assert _convs(sdxl) == [s2, s2, s2, (1280, 1280, (4, 4), (4, 4), (0, 0)), (1280, 1, (1, 1), (1, 1), (0, 0))]
    assert _convs(sd15) == [s2, (1280, 1280, (4, 4), (4, 4), (0, 0)), (1280, 1, (1, 1), (1, 1), (0, 0))]
    norms = [m for m in sdxl.net if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 32 for m in norms)
    # 4 k4 convs (1280*1280*16 + 1280), 4 GroupNorms (2*1280), the 1x1 conv (1280 + 1)
    assert sum(p.numel() for p in sdxl.parameters()) == 4 * (1280 * 1280 * 16 + 1280) + 4 * 2560 + 1281


def test_narrow_heads_keep_informative_groups():
    """A 1 x 1 GroupNorm with one channel per group outputs a constant: narrow heads use fewer groups."""
    head = ClassifierHead(32, (8, 8), 32)
    assert [m.num_groups for m in head.net if isinstance(m, nn.GroupNorm)] == [4, 4]     # 8 channels each
    assert [m.num_groups for m in ClassifierHead(128, (8, 8), 128).net if isinstance(m, nn.GroupNorm)] == [16, 16]
    x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    logits = head(x)
    assert abs(logits[0].item() - logits[1].item()) > 1e-4   # the logit depends on the input


def test_tokens_are_laid_out_on_their_grid():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)   # [B, h*w, D], h=2, w=3
    grid = as_map(tokens, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    assert grid[1, 2, 1, 0].item() == tokens[1, 3, 2].item()   # row 1, column 0 = token 3
    with pytest.raises(SenseflowError, match="feature_size"):
        as_map(tokens, (2, 2))


# -------------------------------------------------------------------------------------------------
# the term in DMD2 / SenseFlow
# -------------------------------------------------------------------------------------------------
def test_generator_term_is_softplus_of_minus_the_noised_logits():
    models, method = _method()
    batch = _batch(models)
    x = torch.randn(4, 3, 8, 8)
    rng = RandomStreams(0)
    replay = _clone(rng)
    got = method.gan_generator_term(x, batch, rng)
    t = method.gan_time.sample(4, method.schedule, replay.local, replay.device)
    eps = replay.randn_like(x)
    x_t = (1 - t.float()).view(-1, 1, 1, 1) * x + t.float().view(-1, 1, 1, 1) * eps   # rectified flow
    logits = _manual_logits(models, x_t, t, batch.cond)
    want = sum(_softplus(-v) for v in logits.tolist()) / 4
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_classifier_term_uses_real_and_fake_each_freshly_noised():
    models, method = _method()
    batch = _batch(models)
    x = torch.randn(4, 3, 8, 8)
    rng = RandomStreams(0)
    replay = _clone(rng)
    got, logs = method.gan_classifier_term(x, batch, rng)
    logits = []
    for x0 in (batch.latents, x):   # real first, then fake; own time and noise each
        t = method.gan_time.sample(4, method.schedule, replay.local, replay.device)
        eps = replay.randn_like(x0)
        x_t = (1 - t.float()).view(-1, 1, 1, 1) * x0 + t.float().view(-1, 1, 1, 1) * eps
        logits.append(_manual_logits(models, x_t, t, batch.cond).tolist())
    want = sum(_softplus(v) for v in logits[1]) / 4 + sum(_softplus(-v) for v in logits[0]) / 4
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert logs["loss_gan_d"].item() == pytest.approx(want, rel=1e-5)


def test_weights_enter_the_two_losses():
    models, method = _method()
    batch = _batch(models)
    out_g = method.generator_loss(batch, RandomStreams(0))
    assert out_g.loss.item() == pytest.approx(out_g.logs["loss_dmd"].item() + 5e-3 * out_g.logs["loss_gan_g"].item(),
                                              rel=1e-6)
    out_f = method.fake_score_loss(batch, RandomStreams(0))
    assert out_f.loss.item() == pytest.approx(out_f.logs["loss_fake"].item() + 1e-2 * out_f.logs["loss_gan_d"].item(),
                                              rel=1e-6)
    assert DMD2Config().gan_head.enabled is False
    assert (DMD2Config().gan_head.generator_weight, DMD2Config().gan_head.classifier_weight) == (5e-3, 1e-2)


@pytest.mark.parametrize("cls, cfg_cls, extra", [(DMD2, DMD2Config, {}),
                                                 (SenseFlow, SenseFlowConfig, {"isg_weight": 0.0, "ida": False})])
def test_classifier_gets_gradients_only_in_its_own_phase(tmp_path, cls, cfg_cls, extra):
    models, method = _method(cls, cfg_cls, **extra)
    head = models.fake_score.gan_head
    assert set(method.networks()) == {"generator", "fake_score"}   # no extra optimiser: as released
    trainer = _trainer(method, tmp_path, 1e-2)
    owned = {id(p) for p in trainer.optimizers["fake_score"].param_groups[0]["params"]}
    assert all(id(p) in owned for p in head.parameters())
    batch = _batch(models)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    fake_before = {k: v.clone() for k, v in models.fake_score.backbone.state_dict().items()}
    g_before = [p.clone() for p in models.generator.parameters()]
    logs = trainer.run_phase("generator", batch)
    assert "loss_gan_g" in logs
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    assert all(torch.equal(v, fake_before[k]) for k, v in models.fake_score.backbone.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(models.generator.parameters(), g_before))
    logs = trainer.run_phase("fake_score", batch)
    assert "loss_gan_d" in logs
    assert any(not torch.equal(v, head_before[k]) for k, v in head.state_dict().items())


def test_head_lr_puts_the_head_in_its_own_group_with_its_own_rate(tmp_path):
    """``gan_head.lr``: one optimiser still (the released layout), the head's parameters in a second group."""
    models, method = _method(gan_head=GANHeadConfig(enabled=True, lr=3e-3, **TAP))
    trainer = _trainer(method, tmp_path, 1e-4)
    body, head = trainer.optimizers["fake_score"].param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in models.fake_score.gan_head.parameters()}
    assert head["lr"] == 3e-3 and body["lr"] == 1e-4
    assert len(body["params"]) + len(head["params"]) == len(trainer.params["fake_score"])
    assert len(trainer.optimizers["generator"].param_groups) == 1
    # the default: one group, the released layout
    models, method = _method()
    trainer = _trainer(method, tmp_path, 1e-4)
    assert len(trainer.optimizers["fake_score"].param_groups) == 1


def test_head_is_checkpointed_and_resumed_with_the_fake_score(tmp_path):
    models, method = _method()
    with torch.no_grad():
        for p in models.fake_score.gan_head.parameters():
            p.add_(0.25)
    path = save_checkpoint(tmp_path, 3, method.networks(), {"step": 3})
    other, method2 = _method()
    assert not torch.equal(next(other.fake_score.gan_head.parameters()), next(models.fake_score.gan_head.parameters()))
    load_checkpoint(path, method2.networks())
    for a, b in zip(other.fake_score.gan_head.parameters(), models.fake_score.gan_head.parameters()):
        assert torch.equal(a, b)


def test_errors_are_one_line():
    models = tiny_models()
    with pytest.raises(SenseflowError, match="names no bottleneck"):
        DMD2(models, DMD2Config(gan_head=GANHeadConfig(enabled=True)))
    with pytest.raises(SenseflowError, match="together"):
        attach_gan_head(models.fake_score, GANHeadConfig(enabled=True, feature_channels=32))
    models, method = _method()
    with pytest.raises(SenseflowError, match="needs real latents"):
        method.fake_score_loss(_batch(models, latents=False), RandomStreams(0))
    base = {"paths": {"teacher": "builtin:toy", "prompts": "data/prompts.txt", "output": "/tmp/x"},
            "teacher": {"family": "toy", "resolution": 32}, "method": {"name": "dmd2", "gan_head": {"enabled": True}}}
    with pytest.raises(SenseflowError, match="prompts only"):
        check_gan_data(validate(base))
    check_gan_data(validate({**base, "paths": {**base["paths"], "prompts": "builtin:toy-world-open"}}))


def test_custom_adapter_feature_tap_argument():
    """A custom model names its bottleneck once, in its factory: ``CallableAdapter(feature_tap=...)``."""
    models = tiny_models()
    models.teacher.adapter._feature_tap = FeatureTap("blocks.2", 32, (8, 8))
    method = DMD2(models, DMD2Config(gan_head=GANHeadConfig(enabled=True)))
    assert method.gan.tap.name == "blocks.2"
    logits = method.gan.logits(models.fake_score, torch.randn(4, 3, 8, 8), torch.full((4,), 0.5, dtype=torch.float64),
                               models.teacher.adapter.encode_prompts(PROMPTS))
    assert logits.shape == (4,)


# -------------------------------------------------------------------------------------------------
# recipes: the toy world and the DMD2 SDXL recipe
# -------------------------------------------------------------------------------------------------
def test_toy_world_switch_builds_a_head_on_the_middle_joint_block():
    from senseflow.build import build_models

    cfg = load_config("configs/toy/dmd2.yaml", ["method.gan_head.enabled=true"], check_paths=False)
    models = build_models(cfg, torch.device("cpu"))
    head = models.fake_score.gan_head
    assert head.tap == FeatureTap("transformer_blocks.3", 128, (8, 8), 1)   # 6 blocks, width 128, 32 px / patch 4
    assert [type(m).__name__ for m in head.head.net] == ["Conv2d", "GroupNorm", "SiLU"] * 2 + ["Conv2d"]   # 8->4->1
    method = DMD2(models, cfg.method)
    batch = Batch(["a red circle"] * 2, models.teacher.adapter.encode_prompts(["a red circle"] * 2),
                  latents=torch.zeros(2, 3, 32, 32))
    out = method.fake_score_loss(batch, RandomStreams(0))
    assert torch.isfinite(out.loss) and "loss_gan_d" in out.logs


def test_sdxl_dmd2_recipe_uses_the_released_gan_term():
    cfg = load_config("configs/sdxl/dmd2.yaml", check_paths=False)
    gan = cfg.method.gan_head
    assert gan.enabled and gan.generator_weight == 5e-3 and gan.classifier_weight == 1e-2
    assert gan.time.kind == "teacher"   # U{0..999}: --diffusion_gan_max_timestep 1000
    assert cfg.paths.prompts is None    # it needs real latents
    for other in ("configs/sdxl/senseflow.yaml", "configs/toy/dmd2.yaml", "configs/flux/dmd2.yaml"):
        assert not load_config(other, check_paths=False).method.gan_head.enabled


# -------------------------------------------------------------------------------------------------
# every family's adapter names a tap that matches what its real diffusers backbone outputs
# -------------------------------------------------------------------------------------------------
def _family(name, root):
    from tests.helpers import tiny_models as tm
    if name == "sdxl":
        from senseflow.teachers.sdxl import SDXLAdapter
        return SDXLAdapter.from_pretrained(tm.make_tiny_sdxl_folder(root / name).path, resolution=32)
    if name == "flux":
        from senseflow.teachers.flux import FluxAdapter
        return FluxAdapter.from_pretrained(tm.make_tiny_flux_folder(root / name).path, resolution=32,
                                           max_sequence_length=8)
    if name == "sana":
        from senseflow.teachers.sana import SanaAdapter
        return SanaAdapter.from_pretrained(tm.make_tiny_sana_folder(root / name).path, resolution=32,
                                           max_sequence_length=16)
    from senseflow.teachers.sd3 import SD3Adapter
    return SD3Adapter.from_pretrained(tm.make_tiny_sd3_folder(root / name).path, resolution=32)


@pytest.mark.parametrize("family, name, index", [("sdxl", "mid_block", 0), ("flux", "transformer_blocks.1", 1),
                                                 ("sana", "transformer_blocks.1", 0), ("sd3", "transformer_blocks.1", 1)])
def test_family_taps_match_the_backbone_outputs(tmp_path, family, name, index):
    from senseflow.discriminators.dmd2_head import GANHead, record_feature
    from senseflow.teachers.base import Denoiser

    adapter, backbone = _family(family, tmp_path)
    tap = adapter.feature_tap(backbone)
    assert (tap.name, tap.index) == (name, index)
    x = torch.randn(2, *adapter.latent_shape())
    t = adapter.schedule.from_unit(torch.tensor([0.7, 0.4], dtype=torch.float64))
    cond = adapter.encode_prompts(["a red cat", "a dog"])
    with record_feature(backbone, tap) as calls, torch.no_grad():
        adapter.predict(backbone, x, t, cond)
    feat = calls[0]
    assert feat.shape[0] == 2
    assert as_map(feat, tap.size).shape == (2, tap.channels, *tap.size)   # the right stream, width and grid
    head = GANHead(tap)
    with torch.no_grad():
        assert head.logits(Denoiser(backbone, adapter), x, t, cond).shape == (2,)



class _FixedBatches:
    """A data source with real latents (the trainer's BatchSource protocol), for the resume test."""

    def __init__(self, models):
        self.batch, self.served = _batch(models), 0

    def next_batch(self):
        self.served += 1
        return self.batch

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = int(state["served"])


def test_training_with_the_head_resumes_bit_identically(tmp_path):
    def trainer(run, steps):
        run.mkdir(exist_ok=True)
        models, method = _method(ttur=2)
        opt = OptimizerConfig(lr=1e-3)
        cfg = TrainConfig(steps=steps, batch_size=4, progress=False, tensorboard=False, log_every=2)
        return Trainer(method, _FixedBatches(models), cfg, {"generator": opt, "fake_score": opt}, run,
                       RandomStreams(0), torch.device("cpu"))

    straight = trainer(tmp_path / "a", 4)
    logs = straight.fit()
    assert "loss_gan_d" in logs and "loss_gan_g" in logs
    trainer(tmp_path / "b", 2).fit()
    resumed = trainer(tmp_path / "b", 4)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    heads = [t.method.models.fake_score.gan_head.state_dict() for t in (straight, resumed)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    sa, sb = (t.optimizers["fake_score"].state_dict()["state"] for t in (straight, resumed))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
