"""End-to-end training of each method on a tiny velocity model, and exact resume."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from senseflow import api
from senseflow.cli import main
from senseflow.config import apply_overrides, validate
from senseflow.train.checkpoint import latest_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())

METHODS = {
    "dmd2": ["method={name: dmd2, ttur: 2, real_guidance: {cfg: 3.0}}"],
    "senseflow": ["method={name: senseflow, ttur: 2, ida_lambda: 0.9, isg_weight: 0.5, isg_guidance: {cfg: 2.0}}"],
    "sid": ["method={name: sid, teacher_guidance: {cfg: 2.0}, fake_guidance: {cfg: 2.0}, fake_train_guidance: {cfg: 2.0}}",
            "optim.generator.betas=[0.0, 0.999]", "optim.fake_score.betas=[0.0, 0.999]"],
}


def _config(tmp_path, *overrides):
    data = apply_overrides(BASE, [f"paths.output={tmp_path / 'run'}",
                                  f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}",
                                  "train.progress=false", "train.tensorboard=false", "teacher.resolution=8",
                                  *overrides])
    return validate(data)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_the_right_networks(method, tmp_path):
    trainer = api.build_trainer(_config(tmp_path, "train.steps=4", *METHODS[method]))
    models = trainer.method.models
    before = {name: _snapshot(getattr(models, name)) for name in ("teacher", "generator", "fake_score")}
    logs = trainer.fit()
    assert logs and all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert any(k.startswith("loss_") for k in logs)
    assert not _changed(before["teacher"], models.teacher), "the teacher must stay frozen"
    assert _changed(before["generator"], models.generator)
    assert _changed(before["fake_score"], models.fake_score)
    assert all(not p.requires_grad for p in models.teacher.parameters())


def test_ttur_steps_generator_only_every_ttur_iterations(tmp_path):
    trainer = api.build_trainer(_config(tmp_path, "train.steps=6", "method.ttur=3"))
    calls = []
    original = trainer.run_phase
    trainer.run_phase = lambda phase, batch: calls.append(phase) or original(phase, batch)
    trainer.fit()
    assert calls.count("generator") == 2 and calls.count("fake_score") == 6
    assert calls[:2] == ["generator", "fake_score"]  # G first, then IDA, then the fake score


class _QuadraticMethod:
    """A deterministic method: loss = mean over the batch of ||W c||^2, c the prompt conditioning."""

    name = "quadratic"

    def __init__(self):
        self.net = torch.nn.Linear(32, 4, bias=False)
        self.models = None

    def networks(self):
        return {"generator": self.net}

    def phases(self, iteration):
        return ["generator"]

    def loss(self, phase, batch, rng):
        from senseflow.methods.base import LossOutput
        out = self.net(batch.cond.tensors["text"]).pow(2).sum(1).mean()
        return LossOutput(out, {"loss_q": out.detach()})

    def after_step(self, phase):
        return {}


def test_gradient_accumulation_equals_full_batch_gradient(tmp_path):
    from senseflow.methods.base import Batch
    from senseflow.rng import RandomStreams
    from senseflow.teachers.custom import HashedWordEncoder
    from senseflow.train.trainer import Trainer
    prompts = ["a b", "c d", "e f", "g h"]
    batch = Batch(prompts, __import__("senseflow.teachers.base", fromlist=["Conditioning"]).Conditioning(
        HashedWordEncoder()(prompts)))
    grads = []
    for accum in (1, 2, 4):
        cfg = _config(tmp_path, "train.batch_size=4", f"train.grad_accum={accum}", "train.grad_clip=null")
        method = _QuadraticMethod()
        torch.manual_seed(0)
        method.net.reset_parameters()
        trainer = Trainer(method, None, cfg.train, {"generator": cfg.optim.generator}, tmp_path, RandomStreams(0),
                          torch.device("cpu"))
        trainer.optimizers["generator"].step = lambda: None  # keep the gradient for inspection
        trainer.optimizers["generator"].zero_grad = lambda set_to_none=True: None
        trainer.run_phase("generator", batch)
        grads.append(method.net.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def _state(trainer):
    nets = {k: _snapshot(v) for k, v in trainer.networks.items()}
    opt = {k: o.state_dict() for k, o in trainer.optimizers.items()}
    return nets, opt


def _assert_identical(a, b):
    nets_a, opt_a = a
    nets_b, opt_b = b
    for name in nets_a:
        for k in nets_a[name]:
            assert torch.equal(nets_a[name][k], nets_b[name][k]), f"{name}.{k}"
    for name in opt_a:
        for pid, st in opt_a[name]["state"].items():
            for key, val in st.items():
                assert torch.equal(val, opt_b[name]["state"][pid][key]), f"{name}.{pid}.{key}"


@pytest.mark.parametrize("method", ["senseflow", "sid"])
def test_resume_is_bit_identical(method, tmp_path):
    steps = ["train.steps=6", *METHODS[method]]
    straight = api.build_trainer(_config(tmp_path / "straight", *steps))
    straight.fit()
    first = api.build_trainer(_config(tmp_path / "split", "train.steps=3", *METHODS[method]))
    first.fit()
    del first  # the process state is gone; only the checkpoint remains
    resumed = api.build_trainer(_config(tmp_path / "split", *steps), resume="auto")
    assert resumed.step == 3
    resumed.fit()
    _assert_identical(_state(straight), _state(resumed))


def test_cli_kill_and_resume_matches_straight_run(tmp_path):
    """Through the CLI: 4 steps, then the same command with steps=8, equals one 8-step run."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    common = ["--set", f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}", "--set", "train.progress=false",
              "--set", "train.tensorboard=false", "--set", "teacher.resolution=8"]
    assert main(["train", str(cfg), "--set", f"paths.output={tmp_path / 'a'}", "--set", "train.steps=8", *common]) == 0
    assert main(["train", str(cfg), "--set", f"paths.output={tmp_path / 'b'}", "--set", "train.steps=4", *common]) == 0
    assert main(["train", str(cfg), "--set", f"paths.output={tmp_path / 'b'}", "--set", "train.steps=8", *common]) == 0
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a/student/student.safetensors"))
    b = load_file(str(tmp_path / "b/student/student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --resume never refuses to mix runs
    assert main(["train", str(cfg), "--set", f"paths.output={tmp_path / 'b'}", "--resume", "never", *common]) == 2


def test_crash_during_checkpoint_keeps_previous_one(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, {"generator": net}, {"step": 1})
    import senseflow.train.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(run, 2, {"generator": net}, {"step": 2})
    assert latest_checkpoint(run) == first
    assert not (run / "checkpoints/step_00000002").exists()


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path, 1, {"generator": net}, {"step": 1})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"step": 1, "x": Evil()}, path / "trainer_state.pt")
    from senseflow.teachers.base import SenseflowError
    from senseflow.train.checkpoint import load_checkpoint
    with pytest.raises(SenseflowError, match="safely"):
        load_checkpoint(path, {"generator": net})


def test_lora_students_from_config_train_only_adapters(tmp_path):
    trainer = api.build_trainer(_config(tmp_path, "train.steps=2", *METHODS["senseflow"],
                                        "generator.lora={rank: 4, target_modules: all-linear}",
                                        "fake_score.lora={rank: 4, target_modules: all-linear}"))
    for name in ("generator", "fake_score"):
        params = [n for n, p in trainer.networks[name].named_parameters() if p in set(trainer.params[name])]
        assert params and all("lora_" in n for n in params), params
    before = _snapshot(trainer.method.models.generator)
    trainer.fit()
    after = trainer.method.models.generator.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k for k in changed), changed


def test_ida_with_mismatched_lora_is_a_config_error(tmp_path):
    from senseflow.teachers.base import SenseflowError
    with pytest.raises(SenseflowError, match="fake_score.lora"):
        _config(tmp_path, *METHODS["senseflow"], "generator.lora={rank: 4}")


@pytest.mark.slow
def test_resume_with_ema_is_bit_identical(tmp_path):
    """generator.ema (half-life with ramp-up, EMA-served sample grids): split + resume == straight, EMA included."""
    from safetensors.torch import load_file
    ema = ["generator.ema={halflife_kimg: 0.02, rampup_ratio: 0.5}", "train.sample_every=2", "method.ttur=1"]
    steps = ["train.steps=4", *METHODS["senseflow"], *ema]
    straight = api.train(_config(tmp_path / "straight", *steps))
    first = api.train(_config(tmp_path / "split", "train.steps=2", *METHODS["senseflow"], *ema))
    assert "generator_ema" in json.loads((latest_checkpoint(first.run_dir) / "meta.json").read_text())["extra"]
    del first
    probe = api.build_trainer(_config(tmp_path / "split", *steps), resume="auto")
    assert probe.step == 2 and probe.ema.images_seen == 2 * 4
    del probe
    resumed = api.train(_config(tmp_path / "split", *steps), resume="auto")
    _assert_identical(_state(straight), _state(resumed))
    a, b = straight.ema.tensors(), resumed.ema.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.ema.images_seen == resumed.ema.images_seen == 4 * 4
    raw = straight.networks["generator"].state_dict()
    assert max((a[k] - raw[k]).abs().max().item() for k in a) > 1e-6, "the EMA must differ from the raw weights"
    for name in ("student.safetensors", "student_raw.safetensors"):
        x = load_file(str(tmp_path / "straight/run/student" / name))
        y = load_file(str(tmp_path / "split/run/student" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    served = load_file(str(tmp_path / "straight/run/student/student.safetensors"))
    for k, v in a.items():     # student.safetensors holds the EMA (the default), student_raw.safetensors the raw
        assert torch.equal(served[k.removeprefix("denoiser.backbone.")], v), k


def test_enabling_ema_on_a_run_without_one_starts_it_from_the_weights(tmp_path):
    first = api.build_trainer(_config(tmp_path, "train.steps=2", *METHODS["senseflow"]))
    first.fit()
    resumed = api.build_trainer(_config(tmp_path, "train.steps=3", *METHODS["senseflow"], "generator.ema={decay: 0.9}"))
    assert resumed.step == 2 and resumed.ema.images_seen == 0
    raw = resumed.networks["generator"].state_dict()
    assert all(torch.equal(v, raw[k]) for k, v in resumed.ema.tensors().items())


def test_lora_student_with_ema_averages_only_the_adapters(tmp_path):
    from senseflow.student import load_student
    trainer = api.train(_config(tmp_path, "train.steps=2", *METHODS["senseflow"], "method.ttur=1",
                                "generator.lora={rank: 4, target_modules: all-linear}",
                                "fake_score.lora={rank: 4, target_modules: all-linear}", "generator.ema={decay: 0.5}"))
    ema = trainer.ema.tensors()
    assert ema and all("lora_" in n for n in ema), list(ema)[:3]
    for kind in ("ema", "raw"):       # both sets load back as LoRA students; each holds its own adapters
        state = load_student(tmp_path / "run", weights=kind).backbone.state_dict()
        want = ema if kind == "ema" else {n: p.detach() for n, p in trainer.networks["generator"].named_parameters()
                                          if n in ema}
        assert all(torch.equal(state[n.removeprefix("denoiser.backbone.")], v) for n, v in want.items()), kind
    assert any(not torch.equal(ema[n], p.detach()) for n, p in trainer.networks["generator"].named_parameters()
               if n in ema)
