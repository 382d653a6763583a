"""``senseflow bench``: runner keys and values, memory estimate vs real tensors, FLOP counting.

No timing thresholds here: performance targets live in benchmarks/ (docs/performance.md).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from senseflow.bench.memory import (SavedTensorCounter, compare_with_run, estimate_memory, phase_plan)
from senseflow.bench.presets import PRESETS, count_parameters, get_preset, method_config
from senseflow.bench.runner import RESULT_KEYS, BenchSettings, build_models, flop_counter, run_benchmark
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)


@pytest.fixture(scope="module")
def tiny_run():
    settings = BenchSettings(preset="tiny", method="sid", iterations=2, warmup=1, batch_size=2, measure_saved=True)
    return run_benchmark(settings)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_runner_reports_documented_keys_with_finite_positive_values(tiny_run):
    r = tiny_run
    assert set(RESULT_KEYS) <= set(r)
    for key in ("step_time_s", "step_time_min_s", "step_time_max_s", "images_per_s", "s_per_1k_images",
                "flops_per_iteration", "achieved_tflops", "peak_allocated_bytes"):
        assert _positive_finite(r[key]), (key, r[key])
    assert r["s_per_1k_images"] == pytest.approx(1000.0 / r["images_per_s"])
    assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_time_s"])
    assert r["iterations"] == 2 and r["device"] == "cpu"
    assert r["mfu"] == "n/a" and r["peak_tflops"] is None          # no peak table for a CPU
    assert 0.0 <= r["framework_overhead"] < 1.0
    assert set(r["time_breakdown_s"]) == {"forward", "backward", "optimizer", "grad_clip", "other"}
    assert r["time_breakdown_s"]["forward"] > 0 and r["time_breakdown_s"]["backward"] > 0
    assert r["time_breakdown_s"]["optimizer"] > 0
    assert set(r["phase_time_s"]) == {"fake_score", "generator"}   # SiD: both networks every iteration
    assert r["peak_memory_bytes"] >= 0 and "RSS" in r["memory_method"]
    assert all(v > 0 for v in r["params"].values())
    json.dumps(r)  # JSON-serialisable as --json writes it


def test_estimate_matches_the_tensors_of_a_real_run(tiny_run):
    """Weights, gradients and Adam state are exact; saved activations within a few percent."""
    est = estimate_memory("tiny", "sid", "fp32", gpus=1, batch_size=2)
    rows = {name: (e, m) for name, e, m in compare_with_run(est, tiny_run)}
    for name in ("teacher weights (+ buffers)", "generator weights (+ buffers)", "fake_score weights (+ buffers)",
                 "generator gradients (resident after a step)", "fake_score gradients (resident after a step)",
                 "generator optimiser state",
                 "fake_score optimiser state"):
        e, m = rows[name]
        assert e == m, name
    for phase in ("generator", "fake_score"):
        e, m = rows[f"saved for backward, phase {phase}"]
        assert m > 0 and abs(e - m) / m < 0.05, (phase, e, m)
    e, m = rows["peak allocated"]
    assert abs(e - m) / m < 0.25, (e, m)


@pytest.mark.parametrize("precision, nbytes", [("fp32", 4), ("bf16", 2)])
def test_estimate_weights_equal_a_real_tiny_model(precision, nbytes):
    preset = get_preset("tiny")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    real = preset.build_backbone("cpu", dtype)
    exact = sum(p.numel() * p.element_size() for p in real.parameters())
    buffers = sum(b.numel() * b.element_size() for b in real.buffers())
    est = estimate_memory("tiny", "dmd2", precision, gpus=1, batch_size=1)
    static = {r.component: r.bytes for r in est.static}
    assert est.params["teacher"] == sum(p.numel() for p in real.parameters())
    assert static["teacher weights"] == exact + buffers
    assert static["generator weights"] == exact + buffers  # bf16: pure bf16 student; fp32: fp32 student
    assert _grads(est, "generator") == exact  # held only during the generator's own phase
    n_tensors = sum(1 for _ in real.parameters())
    assert static["generator optimiser state (Adam m, v, step)"] == 2 * exact + 4 * n_tensors
    assert nbytes == real.dtype.itemsize


def _grads(est, net: str) -> int:
    """Gradient bytes of ``net``: a row of its own phase (the trainer frees them after the step)."""
    rows = {r.component: r.bytes for r in est.phases[net]}
    assert not any(r.component.endswith("gradients") for r in est.static)
    return rows[f"{net} gradients"]


def test_fsdp_divides_sharded_parts_by_the_gpu_count():
    preset = get_preset("tiny")
    real = preset.build_backbone("cpu", torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in real.buffers())  # never sharded
    one = estimate_memory("tiny", "sid", "bf16", gpus=1, batch_size=2)
    s1 = {r.component: r.bytes for r in one.static}
    for n in (2, 8):
        many = estimate_memory("tiny", "sid", "bf16", gpus=n, batch_size=2)
        sn = {r.component: r.bytes for r in many.static}
        for net in ("generator", "fake_score"):
            assert _grads(many, net) == _grads(one, net) // n
            assert sn[f"{net} weights"] - buffers == (s1[f"{net} weights"] - buffers) // n
        assert sn["teacher weights"] - buffers == (s1["teacher weights"] - buffers) // n
        assert "FSDP unsharded block buffers" in sn
        # activations do not shard (the per-GPU batch is the same)
        act = lambda e: sum(r.bytes for r in e.phases["generator"] if r.component.startswith("activations"))  # noqa
        assert act(many) == act(one)
    replicated = estimate_memory("tiny", "sid", "bf16", gpus=8, batch_size=2, shard_teacher=False)
    assert {r.component: r.bytes for r in replicated.static}["teacher weights"] == s1["teacher weights"]
    ddp = estimate_memory("tiny", "sid", "bf16", gpus=8, batch_size=2, strategy="ddp")
    assert _grads(ddp, "generator") == _grads(one, "generator")


def test_flop_counter_counts_2mnk_for_a_linear_only_model():
    m, k, n, j = 16, 24, 40, 8
    model = nn.Sequential(nn.Linear(k, n), nn.Linear(n, j, bias=False))
    x = torch.randn(m, k)
    counter = flop_counter()
    with counter:
        model(x)
    assert counter.get_total_flops() == 2 * m * n * k + 2 * m * j * n


def test_flop_counter_counts_cpu_attention():
    b, h, s, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    counter = flop_counter()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * b * h * s * s * d


@pytest.mark.parametrize("method", ["senseflow", "sid"])
def test_phase_plan_matches_the_forwards_the_method_records(method):
    """The estimate's list of grad-recording forwards equals what the real method runs."""
    from senseflow.bench.runner import setup

    trainer, batch, preset, _ = setup(BenchSettings(preset="tiny", method=method, batch_size=2))
    nets = {"teacher": trainer.method.models.teacher.backbone,
            "generator": trainer.method.models.generator.denoiser.backbone,
            "fake_score": trainer.method.models.fake_score.backbone}
    calls: list[tuple[str, int, str]] = []
    for name, net in nets.items():
        def hook(module, args, kwargs, name=name):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if not torch.is_grad_enabled():
                mode = "none"
            elif any(p.requires_grad for p in module.parameters()):
                mode = "params"
            else:
                mode = "input" if x.requires_grad else "none"
            calls.append((name, x.shape[0], mode))
        net.register_forward_pre_hook(hook, with_kwargs=True)
    plan = phase_plan(method_config(method, preset.family), frozenset({"cfg"}))
    for phase in trainer.method.networks():
        calls.clear()
        trainer.set_phase(phase)
        trainer.method.loss(phase, batch, trainer.rng)
        trainer.set_phase(None)
        recorded = sorted((n, b, m) for n, b, m in calls if m != "none")
        expected = sorted((f.network, 2 * f.batch_mult, f.grad) for f in plan[phase] if f.grad != "none")
        assert recorded == expected, phase


def test_saved_tensor_counter_counts_storages_once_and_skips_parameters():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    counter = SavedTensorCounter(exclude=list(lin.parameters()))
    with counter():
        y = lin(x)
        (y * y).sum()
    # saved: x (for the weight gradient... weight excluded) and y (for y*y, saved twice: counted once)
    assert counter.total == x.numel() * 4 + y.numel() * 4


@pytest.mark.parametrize("name, billions", [("sd35-medium", 2.24), ("sd35-large", 8.06), ("flux-dev", 11.90),
                                            ("sdxl", 2.57), ("flux2-dev", 32.22), ("flux2-klein-4b", 3.88),
                                            ("flux2-klein-9b", 9.08)])
def test_real_presets_have_the_published_sizes(name, billions):
    model = PRESETS[name].build_backbone("meta")
    assert count_parameters(model) / 1e9 == pytest.approx(billions, abs=0.01)


def test_build_models_precisions():
    preset = get_preset("tiny")
    for precision, teacher, student in (("fp32", torch.float32, torch.float32),
                                        ("amp_bf16", torch.bfloat16, torch.float32),
                                        ("bf16", torch.bfloat16, torch.bfloat16)):
        models = build_models(preset, 64, precision, torch.device("cpu"))
        assert next(models.teacher.parameters()).dtype == teacher
        assert next(models.generator.parameters()).dtype == student
        assert next(models.fake_score.parameters()).dtype == student
        assert not any(p.requires_grad for p in models.teacher.parameters())


def test_cli_estimate_memory_prints_a_table_and_writes_json(tmp_path, capsys):
    from senseflow.cli import main

    out = tmp_path / "est.json"
    assert main(["bench", "--preset", "tiny", "--method", "sid", "--precision", "bf16", "--batch-size", "4",
                 "--estimate-memory", "--gpus", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PEAK per device" in text and "teacher weights" in text
    data = json.loads(out.read_text())
    assert data["mode"] == "estimate" and data["gpus"] == 2 and data["total_bytes"] > 0


def test_cli_rejects_a_bad_method_setting(capsys):
    from senseflow.cli import main

    assert main(["bench", "--preset", "tiny", "--estimate-memory", "--set", "ttur=0"]) == 2
    assert "ttur" in capsys.readouterr().err
