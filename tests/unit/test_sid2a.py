"""SiD2a: the fake network's pooled final-norm features as a parameter-free discriminator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from senseflow.config import OptimizerConfig, TrainConfig
from senseflow.discriminators.dit_pool import (PooledFeatureDiscriminator, bce_generator, bce_real_fake,
                                               pool_tokens)
from senseflow.generator import FewStepGenerator
from senseflow.methods import DistillationModels, SiD, SiDConfig
from senseflow.methods.base import Batch, per_sample_sum
from senseflow.rng import RandomStreams
from senseflow.schedules import anchors
from senseflow.teachers.base import Denoiser, Guidance, SenseflowError, capture_outputs, freeze
from senseflow.train.trainer import Trainer
from tests.helpers.models import PROMPTS, linear_models, tiny_models
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)


def _clone(rng: RandomStreams) -> RandomStreams:
    other = RandomStreams(0)
    other.load_state_dict(rng.state_dict())
    return other


def _batch(models, latents=True, seed=0):
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1 if latents else None
    return Batch(list(PROMPTS), models.teacher.adapter.encode_prompts(PROMPTS), latents=real)


def _sid2a(models, **kw):
    kw.setdefault("adversarial", True)
    kw.setdefault("adversarial_freeze_images", 16)
    kw.setdefault("adversarial_warmup_images", 32)
    return SiD(models, SiDConfig(**kw), images_per_iteration=8)


def _hook(module):
    store = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    return store, handle


def _n_params(models):
    return sum(p.numel() for net in (models.teacher, models.generator, models.fake_score) for p in net.parameters())


# -------------------------------------------------------------------------------------------------
# pooling
# -------------------------------------------------------------------------------------------------
def test_pooling_reads_the_final_norm_with_zero_parameters():
    models = tiny_models()
    before = _n_params(models)
    method = _sid2a(models)
    assert _n_params(models) == before and set(method.networks()) == {"generator", "fake_score"}
    disc = method.pooled
    assert isinstance(disc, PooledFeatureDiscriminator) and not isinstance(disc, torch.nn.Module)
    assert disc.layer == "norm_out"
    norm = models.fake_score.backbone.norm_out
    x = torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    cond = models.teacher.adapter.encode_prompts(PROMPTS)
    manual, handle = _hook(norm)
    with disc.capture() as calls, torch.no_grad():
        models.fake_score(x, t, cond, Guidance(cfg=3.0))   # CFG: one forward over [cond; uncond]
    handle.remove()
    assert len(calls) == 1 and calls[0].shape == (8, 32, 8, 8)
    logits = disc.logits(calls, 4)
    assert logits.shape == (4, 32)
    assert torch.equal(logits, manual[0][:4].mean(dim=(2, 3)))        # conditional rows, spatial mean
    with capture_outputs(models.fake_score.backbone, ["norm_out"]) as feats, torch.no_grad():
        models.fake_score(x, t, cond)                                  # conditional only
    assert torch.allclose(logits, feats["norm_out"].mean(dim=(2, 3)), atol=1e-6)
    assert not norm._forward_hooks                                     # hooks are removed
    assert pool_tokens(torch.ones(2, 5, 7)).shape == (2, 7) and pool_tokens(torch.ones(2, 7)).shape == (2, 7)


def test_sid2a_on_the_sd3_adapter(tmp_path):
    from senseflow.teachers.sd3 import SD3Adapter
    from tests.helpers.tiny_models import make_tiny_sd3_folder

    folder = make_tiny_sd3_folder(tmp_path / "toy", "sd3", num_clip=1, with_t5=False, with_vae=False,
                                  word_level_tokenizer=True, write_index=False).path
    adapter, transformer = SD3Adapter.from_pretrained(folder, resolution=16, max_sequence_length=0)
    teacher = Denoiser(freeze(transformer), adapter)
    gen = FewStepGenerator(Denoiser(adapter.make_student(transformer).requires_grad_(True).train(), adapter),
                           anchors(adapter.schedule, (1.0, 0.5)))
    fake = Denoiser(adapter.make_fake_score(transformer).requires_grad_(True).train(), adapter)
    models = DistillationModels(teacher=teacher, generator=gen, fake_score=fake)
    method = _sid2a(models, adversarial_freeze_images=0, adversarial_warmup_images=0)
    assert method.pooled.layer == "norm_out"
    prompts = ["red circle", "a big green square"]
    cond = adapter.encode_prompts(prompts)
    x = torch.randn(2, *adapter.latent_shape())
    t = torch.full((2,), 0.5, dtype=torch.float64)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    manual, handle = _hook(fake.backbone.norm_out)
    with method.pooled.capture() as calls, torch.no_grad():
        fake(x, t, cond, Guidance(cfg=2.0))
    handle.remove()
    logits = method.pooled.logits(calls, 2)
    assert logits.shape == (2, inner)
    assert torch.equal(logits, manual[0][:2].mean(dim=1))              # tokens [B, N, D] -> mean over N
    batch = Batch(prompts, cond, latents=torch.randn(2, *adapter.latent_shape()))
    assert method.phases(0) == ["fake_score", "generator"]
    for phase, net in (("fake_score", fake), ("generator", gen)):
        out = method.loss(phase, batch, RandomStreams(0))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert "loss_d" in method.loss("fake_score", batch, RandomStreams(1)).logs
    assert "loss_adv_g" in method.loss("generator", batch, RandomStreams(1)).logs


# -------------------------------------------------------------------------------------------------
# loss signs and values
# -------------------------------------------------------------------------------------------------
def test_bce_signs():
    big = torch.full((2, 3), 20.0)
    assert bce_real_fake(big, -big).max() < 1e-4          # real -> 1, fake -> 0: already right
    assert bce_real_fake(-big, big).min() > 9.0           # wrong way round: large (logits clamped to 10)
    assert bce_generator(big).max() < 1e-4 and bce_generator(-big).min() > 9.0
    real = torch.zeros(2, 3, requires_grad=True)
    fake = torch.zeros(2, 3, requires_grad=True)
    bce_real_fake(real, fake).sum().backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()   # descent raises D(real), lowers D(fake)
    g = torch.zeros(2, 3, requires_grad=True)
    bce_generator(g).sum().backward()
    assert (g.grad < 0).all()                                 # G's descent raises D(fake)
    assert torch.allclose(bce_real_fake(torch.zeros(1, 4), torch.zeros(1, 4)), torch.tensor([0.6931472]))


def test_fake_step_adds_bce_on_noised_real_latents():
    models = tiny_models()
    method = _sid2a(models, discriminator_weight=0.7)
    batch = _batch(models)
    rng = RandomStreams(11)
    replay = _clone(rng)
    out = method.loss("fake_score", batch, rng)
    # replay the same draws by hand
    with torch.no_grad():
        x_g, _ = method.rollout(batch, replay, grad=False)
    x_g = x_g.float()
    t = method.time.sample(4, method.schedule, replay.local, replay.device)
    eps = replay.randn_like(x_g)
    norm = models.fake_score.backbone.norm_out
    store, handle = _hook(norm)
    with torch.no_grad():
        pred = models.fake_score.native(method.schedule.add_noise(x_g, eps, t), t, batch.cond,
                                        method.config.fake_train_guidance.sample(replay))
        models.fake_score.native(method.schedule.add_noise(batch.latents, eps, t), t, batch.cond)
    handle.remove()
    fake_logits, real_logits = store[0][:4].mean(dim=(2, 3)), store[1].mean(dim=(2, 3))
    numel = x_g[0].numel()
    bce_r = F.binary_cross_entropy_with_logits(real_logits.clamp(-10, 10), torch.ones_like(real_logits),
                                               reduction="none").mean(1)
    bce_f = F.binary_cross_entropy_with_logits(fake_logits.clamp(-10, 10), torch.zeros_like(fake_logits),
                                               reduction="none").mean(1)
    want_d = 0.7 * (0.5 * (bce_r + bce_f) * numel).sum() / 4
    want_fake = per_sample_sum((pred - method.schedule.target(x_g, eps, t)) ** 2).sum() / 4
    assert torch.allclose(out.logs["loss_d"], want_d, rtol=1e-5)
    assert torch.allclose(out.logs["loss_fake"], want_fake, rtol=1e-5)
    assert torch.allclose(out.loss, want_d + want_fake, rtol=1e-5)
    assert torch.allclose(out.logs["d_real"], real_logits.mean())
    assert torch.allclose(out.logs["d_fake"], fake_logits.mean())


def test_generator_loss_is_half_sid_half_adversarial_once_warmed_up():
    models = tiny_models()
    method = _sid2a(models)
    batch = _batch(models)
    assert method.phases(4) == ["fake_score", "generator"] and method.adversarial_active()
    rng = RandomStreams(5)
    replay = _clone(rng)
    out = method.loss("generator", batch, rng)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.generator.parameters())
    # replay: L_adv = sum_b w_t * numel * BCE(D(x_t) -> 1) / B from the SiD fake forward
    with torch.no_grad():
        x_g, _ = method.rollout(batch, replay, grad=False)
        x_g = x_g.float()
        t = method.time.sample(4, method.schedule, replay.local, replay.device)
        x_t = method.schedule.add_noise(x_g, replay.randn_like(x_g), t)
        models.teacher(x_t, t, batch.cond, method.config.teacher_guidance.sample(replay))
        store, handle = _hook(models.fake_score.backbone.norm_out)
        models.fake_score(x_t, t, batch.cond, method.config.fake_guidance.sample(replay))
        handle.remove()
    logits = store[0][:4].mean(dim=(2, 3))
    w_t = (1 - t).float()
    bce = F.binary_cross_entropy_with_logits(logits.clamp(-10, 10), torch.ones_like(logits), reduction="none").mean(1)
    want_adv = (bce * w_t * x_g[0].numel()).sum() / 4
    assert torch.allclose(out.logs["loss_adv_g"], want_adv, rtol=1e-5)
    assert torch.allclose(out.loss, 0.5 * out.logs["loss_sid"] + 0.5 * out.logs["loss_adv_g"], rtol=1e-6)
    assert torch.allclose(out.logs["loss_g"], out.loss.detach())


# -------------------------------------------------------------------------------------------------
# schedule and "disabled = unchanged"
# -------------------------------------------------------------------------------------------------
def _reference_sid_losses(method, batch, rng):
    """The SiD losses exactly as they were computed before SiD2a existed (same ops, same order)."""
    cfg, schedule = method.config, method.schedule
    m = method.models
    x_g, _ = method.rollout(batch, rng, grad=True)
    x_g = x_g.float()
    t = method.time.sample(x_g.shape[0], schedule, rng.local, rng.device).to(x_g.device)
    eps = rng.randn_like(x_g)
    x_t = schedule.add_noise(x_g, eps, t)
    f_r = m.teacher(x_t, t, batch.cond, cfg.teacher_guidance.sample(rng)).float()
    f_f = m.fake_score(x_t, t, batch.cond, cfg.fake_guidance.sample(rng)).float()
    diff = f_r - f_f
    per = per_sample_sum(diff * ((f_r - x_g) - cfg.alpha * diff)) * method.weight(t, x_g, f_r)
    g_loss, _ = method.reduce(per, cfg.lambda_sid)
    with torch.no_grad():
        x_g, _ = method.rollout(batch, rng, grad=False)
    x_g = x_g.float()
    t = method.time.sample(x_g.shape[0], schedule, rng.local, rng.device).to(x_g.device)
    eps = rng.randn_like(x_g)
    x_t = schedule.add_noise(x_g, eps, t)
    pred = m.fake_score.native(x_t, t, batch.cond, cfg.fake_train_guidance.sample(rng))
    f_loss, _ = method.reduce(per_sample_sum((pred.float() - schedule.target(x_g, eps, t).float()) ** 2), 1.0)
    return g_loss, f_loss


@pytest.mark.parametrize("kw", [{}, {"weighting": "legacy"}])
def test_disabled_sid_is_bit_for_bit_unchanged(kw):
    models = tiny_models()
    method = SiD(models, SiDConfig(**kw))
    assert method.pooled is None and method.phases(0) == method.phases(10 ** 6) == ["fake_score", "generator"]
    batch = _batch(models)
    rng = RandomStreams(3)
    ref_g, ref_f = _reference_sid_losses(method, batch, _clone(rng))
    g = method.loss("generator", batch, rng)
    f = method.loss("fake_score", batch, rng)
    assert torch.equal(g.loss, ref_g) and torch.equal(f.loss, ref_f)
    assert set(g.logs) == {"loss_sid", "sid_dropped"} and set(f.logs) == {"loss_fake", "fake_dropped"}
    assert not models.fake_score.backbone.norm_out._forward_hooks


def test_warmup_schedule_in_images():
    models = tiny_models()
    method = _sid2a(models)   # 8 images / iteration, G frozen < 16 images, L_adv from 32 images
    stages = []
    for it in range(6):
        phases = method.phases(it)
        stages.append((method.images_seen(), phases, method.adversarial_active()))
    assert stages == [(0, ["fake_score"], False), (8, ["fake_score"], False),
                      (16, ["fake_score", "generator"], False), (24, ["fake_score", "generator"], False),
                      (32, ["fake_score", "generator"], True), (40, ["fake_score", "generator"], True)]
    # between freeze and warm-up, G's loss is plain SiD, bit for bit
    batch = _batch(models)
    method.phases(2)
    plain = SiD(models, SiDConfig())
    a = method.loss("generator", batch, RandomStreams(9))
    b = plain.loss("generator", batch, RandomStreams(9))
    assert torch.equal(a.loss, b.loss) and "loss_adv_g" not in a.logs


def test_trainer_phases_keep_networks_apart(tmp_path):
    models = tiny_models()
    method = _sid2a(models)
    opt = OptimizerConfig(name="adam", lr=1e-3, betas=(0.0, 0.999))
    trainer = Trainer(method, None, TrainConfig(batch_size=4, progress=False, tensorboard=False),
                      {"generator": opt, "fake_score": opt}, tmp_path, RandomStreams(0), torch.device("cpu"))
    batch = _batch(models)
    teacher = [p.clone() for p in models.teacher.parameters()]
    gen = [p.clone() for p in models.generator.parameters()]
    assert method.phases(0) == ["fake_score"]
    logs = trainer.run_phase("fake_score", batch)
    assert logs["loss_d"] > 0 and all(torch.equal(a, b) for a, b in zip(gen, models.generator.parameters()))
    assert method.phases(4) == ["fake_score", "generator"]
    fake = [p.clone() for p in models.fake_score.parameters()]
    # the trainer frees a network's gradients right after its step ...
    assert all(p.grad is None for p in models.fake_score.parameters())
    logs = trainer.run_phase("generator", batch)
    assert "loss_adv_g" in logs
    assert all(torch.equal(a, b) for a, b in zip(fake, models.fake_score.parameters()))
    # ... so any gradient on the fake score now would have leaked from G's (SiD2a) loss: there is none
    assert all(p.grad is None for p in models.fake_score.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(gen, models.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher, models.teacher.parameters()))


def test_errors_are_one_line():
    def one_line(excinfo):
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    models = tiny_models()
    with pytest.raises(SenseflowError) as e:
        method = _sid2a(models)
        method.loss("fake_score", _batch(models, latents=False), RandomStreams(0))
    assert "real latents" in one_line(e)
    with pytest.raises(SenseflowError) as e:
        SiD(linear_models(0.5, 0.5), SiDConfig(adversarial=True, adversarial_freeze_images=0,
                                               adversarial_warmup_images=0))
    assert "final norm" in one_line(e)
    with pytest.raises(SenseflowError) as e:
        SiD(models, SiDConfig(adversarial=True))
    assert "images_per_iteration" in one_line(e)
    SiD(models, SiDConfig(adversarial=True, adversarial_freeze_images=0, adversarial_warmup_images=0))
    with pytest.raises(Exception):
        SiDConfig(adversarial_weight=1.5)
