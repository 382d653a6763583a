"""One frozen base for LoRA runs (issue #16 item 1): a shared-base run equals today's three-copy run, step for step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from senseflow import api
from senseflow.config import apply_overrides, validate
from senseflow.shared_base import has_shared_base, is_shared, weight_bytes
from senseflow.train.checkpoint import latest_checkpoint
from senseflow.train.trainer import TrainerHooks
from tests.helpers.threads import single_thread  # noqa: F401 -- tiny convs: one intra-op thread

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())
LORA = "{rank: 2, alpha: 4, target_modules: all-linear, shared_base: %s}"
METHODS = {
    "senseflow": ["method={name: senseflow, ttur: 2, ida_lambda: 0.9, isg_weight: 0.5, isg_guidance: {cfg: 2.0}}"],
    "dmd2": ["method={name: dmd2, ttur: 2, real_guidance: {cfg: 3.0}}"],
    "sid": ["method={name: sid, teacher_guidance: {cfg: 2.0}, fake_guidance: {cfg: 2.0}, fake_train_guidance: {cfg: 2.0}}",
            "optim.generator.betas=[0.0, 0.999]", "optim.fake_score.betas=[0.0, 0.999]"],
}
STEPS = 4
# fp32: the three-copy run's IDA rounds lam*w + (1-lam)*w on its own copy of the frozen base (ulps per G step),
# the shared one leaves the teacher's weights untouched; nothing else differs
RTOL, ATOL = 1e-5, 1e-6


def _config(out: Path, shared: bool, method: str, *extra: str):
    flag = "true" if shared else "false"
    data = apply_overrides(BASE, [f"paths.output={out}", f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}",
                                  "train.progress=false", "train.tensorboard=false", "teacher.resolution=8",
                                  "train.num_samples=0", "train.log_every=1", f"train.steps={STEPS}",
                                  "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3",
                                  f"generator.lora={LORA % flag}", f"fake_score.lora={LORA % flag}",
                                  *METHODS[method], *extra])
    return validate(data)


def _adapters(trainer) -> dict[str, torch.Tensor]:
    return {f"{net}/{n}": p.detach().clone() for net in ("generator", "fake_score")
            for n, p in trainer.networks[net].named_parameters() if "lora_" in n}


def _record(config):
    """Build and train; the logged losses and every adapter after each step."""
    losses: list[dict[str, float]] = []
    adapters: list[dict[str, torch.Tensor]] = []
    hooks = TrainerHooks(on_log=[lambda tr, _s: losses.append(dict(tr.last_logs))],
                         on_step=[lambda tr, _s: adapters.append(_adapters(tr))])
    trainer = api.build_trainer(config, hooks=hooks)
    teacher = {k: v.clone() for k, v in trainer.method.models.teacher.state_dict().items()}
    trainer.fit()
    return trainer, losses, adapters, teacher


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shared_base_run_equals_three_copy_run_step_for_step(method, tmp_path):
    three, l3, a3, _ = _record(_config(tmp_path / "three", False, method))
    shared, ls, as_, teacher0 = _record(_config(tmp_path / "shared", True, method))
    models3, models = three.method.models, shared.method.models
    assert not has_shared_base(models3.generator) and not has_shared_base(models3.fake_score)
    # ONE base: every frozen generator / fake-score tensor is the teacher's own object
    teacher_ids = {id(p) for p in models.teacher.parameters()}
    for net in (models.generator, models.fake_score):
        frozen = [p for n, p in net.named_parameters() if "lora_" not in n]
        assert frozen and all(id(p) in teacher_ids and is_shared(p) for p in frozen)
        assert all(not p.requires_grad for p in frozen)
    assert len(ls) == len(l3) == STEPS and len(as_) == len(a3) == STEPS
    for step, (x, y) in enumerate(zip(l3, ls)):
        losses = [k for k in x if k.startswith("loss_")]
        assert losses and x.keys() == y.keys(), (step, x.keys(), y.keys())
        for k in losses + [k for k in x if k.startswith("grad_norm/")]:
            assert y[k] == pytest.approx(x[k], rel=RTOL, abs=ATOL), (step, k, x[k], y[k])
    for step, (x, y) in enumerate(zip(a3, as_)):
        assert x.keys() == y.keys() and len(x) > 0
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=RTOL, atol=ATOL, msg=f"step {step} {k}")
    moved = [k for k in a3[-1] if not torch.equal(a3[-1][k], a3[0][k])]
    assert moved, "the adapters must train for the comparison to mean anything"
    # the teacher (= the shared base) is bit-for-bit what it was: no IDA, optimiser or cast touched it
    after = models.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher0.items())
    # weight memory: one base + two adapters instead of three bases (+ adapters)
    w3 = weight_bytes(models3.teacher, models3.generator, models3.fake_score)
    ws = weight_bytes(models.teacher, models.generator, models.fake_score)
    adapters = sum(p.numel() * p.element_size() for net in (models.generator, models.fake_score)
                   for n, p in net.named_parameters() if "lora_" in n)
    base = weight_bytes(models.teacher)
    assert ws == base + adapters
    assert w3 == 3 * base + adapters
    assert ws < 0.5 * w3


def test_shared_base_checkpoint_holds_adapters_only_and_resumes_bit_exactly(tmp_path):
    straight, _, _, _ = _record(_config(tmp_path / "straight", True, "senseflow", "generator.ema={decay: 0.5}"))
    first = api.train(_config(tmp_path / "split", True, "senseflow", "generator.ema={decay: 0.5}",
                              "train.steps=2"))
    from safetensors.torch import load_file
    ckpt = latest_checkpoint(first.run_dir)
    for net in ("generator", "fake_score"):
        keys = list(load_file(str(ckpt / f"{net}.safetensors")))
        assert keys and all("lora_" in k for k in keys), keys[:4]
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
    del first
    resumed = api.train(_config(tmp_path / "split", True, "senseflow", "generator.ema={decay: 0.5}"), resume="auto")
    assert resumed.step == STEPS
    a, b = _adapters(straight), _adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema.tensors(), resumed.ema.tensors()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # the student export is complete (base + adapter) and loads back as a LoRA student
    from senseflow.student import load_student
    student = load_student(tmp_path / "split", weights="raw")
    state = student.backbone.state_dict()
    gen = resumed.networks["generator"].denoiser.backbone.state_dict()
    assert any("base_layer" in k for k in state) and all(torch.equal(state[k], gen[k]) for k in state
                                                        if "lora_" in k)


def test_shared_base_in_bf16_keeps_the_base_in_teacher_dtype(tmp_path):
    trainer = api.build_trainer(_config(tmp_path / "run", True, "dmd2", "train.precision=bf16"))
    models = trainer.method.models
    teacher_dtypes = {p.dtype for p in models.teacher.parameters()}
    assert teacher_dtypes == {torch.float32}    # teacher.dtype of the tiny config: not cast by the student's bf16
    lora = [p for n, p in models.generator.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_a_run_resumes_across_the_shared_base_switch(first, then, tmp_path):
    """Copies -> shared base and back: the checkpoint resumes (the base is the teacher's either way), same adapters."""
    straight, _, _, _ = _record(_config(tmp_path / "straight", then, "senseflow"))
    api.train(_config(tmp_path / "split", first, "senseflow", "train.steps=2"))
    meta = json.loads((latest_checkpoint(tmp_path / "split") / "meta.json").read_text())
    assert meta.get("shared_base", []) == (["fake_score", "generator"] if first else [])
    resumed = api.train(_config(tmp_path / "split", then, "senseflow"), resume="auto")
    assert resumed.step == STEPS
    assert has_shared_base(resumed.method.models.generator) is then
    a, b = _adapters(straight), _adapters(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)
