"""Run a method's training iterations on a preset and measure throughput, FLOPs, MFU, memory, overhead.

The iterations go through the real training path -- :meth:`senseflow.train.trainer.Trainer.run_phase`
for every phase :meth:`Method.phases` names, exactly as ``Trainer.fit`` calls it -- on models with
random weights and a synthetic prompt batch (random conditioning tensors of the right shapes; no
text encoder, no VAE, no data loading: those costs are not part of the numbers).

Measurements (keys of :func:`run_benchmark`'s result, see :data:`RESULT_KEYS`):

* **time**: ``warmup`` iterations are run first and excluded (they create the optimiser state and
  warm the allocator); then ``iterations`` timed iterations, wall clock per iteration
  (``time.perf_counter``; on CUDA synchronised at iteration boundaries).  With DMD2/SenseFlow's
  TTUR the generator steps once every ``ttur`` iterations, so pick ``iterations`` as a multiple of
  ``ttur`` (default 5) for a representative mean.  ``images_per_s = batch x world / step time``;
  ``s_per_1k_images = 1000 / images_per_s``;
* **framework overhead**: ``1 - (model forward + backward + optimiser) / step time``, where model
  forward = time inside the backbones' ``forward`` (forward hooks on the teacher, generator and fake
  score backbones; outermost call only), backward = time inside ``torch.autograd.backward``, and
  optimiser = ``optimizer.step`` (step hooks) + ``clip_grad_norm_``.  Everything else -- adapter
  glue (packing, CFG concatenation, dtype casts), the method's noise/time sampling and loss
  arithmetic, IDA, ``zero_grad``, ``requires_grad`` switching, logging conversions -- is overhead.
  On CPU this is measured in the timed pass itself (the hooks cost microseconds); on CUDA a second
  pass is run with a ``synchronize`` at every region boundary, so that the throughput pass stays
  asynchronous;
* **FLOPs / MFU**: the timed iterations are REPLAYED (same random streams, same phases, so the same
  work) under ``torch.utils.flop_counter.FlopCounterMode``, which counts matmul, convolution and
  attention FLOPs of every forward and backward (no-grad teacher/rollout forwards included;
  recomputation under activation checkpointing included, i.e. hardware FLOPs).  CPU attention
  (``_scaled_dot_product_flash_attention_for_cpu``) is counted with PyTorch's own SDPA formulas.
  ``mfu = FLOPs per iteration / step time / peak FLOP/s`` with the dense peak of :data:`PEAK_TFLOPS`
  for the detected GPU and precision (``n/a`` on CPU or an unknown GPU; ``peak_tflops`` overrides);
* **memory**: CUDA -- ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) over
  warm-up + timed iterations, reset after the models are built (so weights are included).  CPU --
  there is no allocator peak counter: ``peak_memory_bytes`` is the peak process RSS over warm-up
  and timed iterations (``ru_maxrss`` when it rose during the run, and an RSS sampler reading
  ``/proc/self/statm`` every 5 ms during warm-up) minus the RSS before the models were built; it
  includes allocator caching, lazily loaded kernels and Python-heap growth (comparable to
  ``nvidia-smi``, not to ``max_memory_allocated``).  In
  addition ``peak_allocated_bytes`` is the CPU allocator's peak during a replay of the timed
  iterations, from the profiler's memory events, on top of the resident weights/gradients/optimiser
  state (comparable to ``max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import OptimizerConfig, TrainConfig
from ..generator import FewStepGenerator
from ..methods import Batch, DistillationModels, build_method
from ..rng import RandomStreams
from ..schedules import anchors as unit_to_native
from ..teachers.base import Denoiser, SenseflowError, freeze
from ..train.compiled import compile_models
from ..train.distributed import DistContext, ParallelConfig, init_distributed, parallelize
from ..train.trainer import Trainer
from .memory import SavedTensorCounter, dtypes
from .passes import count_passes, format_passes
from .presets import Preset, _cast, get_preset, method_config

#: dense (no sparsity) peak TFLOP/s per GPU, from NVIDIA's data sheets
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

RESULT_KEYS: tuple[str, ...] = (
    "preset", "family", "method", "precision", "device", "device_name", "world_size", "resolution", "batch_size",
    "activation_checkpointing", "warmup", "iterations", "params", "phases_per_iteration",
    "step_time_s", "step_time_min_s", "step_time_max_s", "images_per_s", "s_per_1k_images", "phase_time_s",
    "time_breakdown_s", "framework_overhead", "overhead_split_s", "flops_per_iteration", "achieved_tflops",
    "peak_tflops", "mfu",
    "peak_memory_bytes", "memory_method", "peak_allocated_bytes", "resident_bytes",
)


@dataclass
class BenchSettings:
    """What to run (see ``senseflow bench --help``)."""

    preset: str = "tiny"
    method: str = "senseflow"
    resolution: int | None = None         # default: the preset's
    batch_size: int = 2                    # per process
    iterations: int = 10
    warmup: int = 2
    precision: str = "fp32"
    device: str = "auto"
    activation_checkpointing: bool = False
    method_overrides: dict[str, Any] = field(default_factory=dict)
    anchors: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    count_flops: bool = True
    peak_tflops: float | None = None
    measure_saved: bool = False            # also measure saved-for-backward bytes per phase (estimate check)
    allow_cpu: bool = False                # run a real-shape preset on a CPU anyway
    count_passes: bool = True              # replay the timed iterations counting network passes
    compile: bool = False                  # train.compile: torch.compile each transformer block
    seed: int = 0
    lora_rank: int | None = None           # LoRA generator + fake score (family's auto targets)
    shared_base: bool = True               # with lora_rank: lora.shared_base (single process)


# -------------------------------------------------------------------------------------------------
# models and data
# -------------------------------------------------------------------------------------------------
class SyntheticBatches:
    """The same random prompt batch every iteration (what a prompt cache + data-free training feeds)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def next_batch(self) -> Batch:
        return self.batch

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def build_models(preset: Preset, resolution: int, precision: str, device: torch.device,
                 anchors: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25), seed: int = 0,
                 lora_rank: int | None = None, shared_base: bool = True) -> DistillationModels:
    """Teacher (frozen), generator and fake score from one randomly initialised backbone, as ``build.build_models``.

    Teacher in bf16 for ``amp_bf16`` / ``bf16``, fp32 for ``fp32``; the trainable copies in fp32
    (``fp32``, ``amp_bf16``: master weights) or bf16 (``bf16``).
    """
    teacher_dtype, train_dtype, _ = dtypes(precision)
    adapter = preset.make_adapter(resolution, device, teacher_dtype)
    backbone = preset.build_backbone(device, teacher_dtype, seed)
    teacher = Denoiser(freeze(backbone), adapter)

    def trainable(module: nn.Module) -> nn.Module:
        if next(module.parameters()).dtype != train_dtype:
            module = _cast(module, train_dtype)
        return module.requires_grad_(True).train()

    if lora_rank:   # as build.build_models: adapters in the master dtype, the base stored like the teacher's
        from ..lora import LoRAConfig
        from ..shared_base import lora_network
        from ..train.precision import cast_trainable
        cfg = LoRAConfig(rank=lora_rank, shared_base=shared_base)
        student, fake = (cast_trainable(lora_network(make, backbone, cfg, shared_base), train_dtype)
                         for make in (adapter.make_student, adapter.make_fake_score))
    else:
        student = trainable(adapter.make_student(backbone))
        fake = trainable(adapter.make_fake_score(backbone))
    generator = FewStepGenerator(Denoiser(student, adapter), unit_to_native(adapter.schedule, list(anchors)))
    return DistillationModels(teacher=teacher, generator=generator, fake_score=Denoiser(fake, adapter))


def backbones(models: DistillationModels) -> dict[str, nn.Module]:
    return {"teacher": models.teacher.backbone, "generator": models.generator.denoiser.backbone,
            "fake_score": models.fake_score.backbone}


# -------------------------------------------------------------------------------------------------
# timing regions
# -------------------------------------------------------------------------------------------------
class RegionTimer:
    """Wall time inside model forward / backward / optimiser regions (outermost region only)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = False
        self._depth = 0
        self._kind = ""
        self._t0 = 0.0

    def enter(self, kind: str) -> None:
        if not self.enabled:
            return
        if self._depth == 0:
            self.sync()
            self._kind, self._t0 = kind, time.perf_counter()
        self._depth += 1

    def exit(self) -> None:
        if not self.enabled or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self.sync()
            self.totals[self._kind] += time.perf_counter() - self._t0

    @contextlib.contextmanager
    def region(self, kind: str) -> Iterator[None]:
        self.enter(kind)
        try:
            yield
        finally:
            self.exit()

    @contextlib.contextmanager
    def installed(self, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                  method: Any = None) -> Iterator[None]:
        """Hooks on backbone forwards and optimiser steps; ``torch.autograd.backward`` and
        ``torch.nn.utils.clip_grad_norm_`` wrapped (restored on exit).  With ``method``, the time
        inside ``method.loss`` is accumulated separately as ``loss_total`` (it contains the forwards)."""
        handles = []
        if method is not None:
            orig_loss = method.loss

            def loss(*args, **kwargs):
                if not self.enabled:
                    return orig_loss(*args, **kwargs)
                self.sync()
                t0 = time.perf_counter()
                try:
                    return orig_loss(*args, **kwargs)
                finally:
                    self.sync()
                    self.totals["loss_total"] += time.perf_counter() - t0
            method.loss = loss
        for net in nets.values():
            handles.append(net.register_forward_pre_hook(lambda *_: self.enter("forward")))
            handles.append(net.register_forward_hook(lambda *_: self.exit(), always_call=True))
        for opt in optimizers.values():
            handles.append(opt.register_step_pre_hook(lambda *_: self.enter("optimizer")))
            handles.append(opt.register_step_post_hook(lambda *_: self.exit()))
        orig_backward = torch.autograd.backward
        orig_clip = torch.nn.utils.clip_grad_norm_

        def backward(*args, **kwargs):
            with self.region("backward"):
                return orig_backward(*args, **kwargs)

        def clip(*args, **kwargs):
            with self.region("grad_clip"):
                return orig_clip(*args, **kwargs)

        torch.autograd.backward = backward
        torch.nn.utils.clip_grad_norm_ = clip
        try:
            yield
        finally:
            torch.autograd.backward = orig_backward
            torch.nn.utils.clip_grad_norm_ = orig_clip
            if method is not None:
                del method.loss
            for h in handles:
                h.remove()


# -------------------------------------------------------------------------------------------------
# memory on CPU
# -------------------------------------------------------------------------------------------------
def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return max_rss()


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


class RSSSampler:
    """Peak RSS seen by a background thread (run only around untimed passes)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = current_rss()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.peak = max(self.peak, current_rss())
                stop.wait(self.interval)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, current_rss())


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (a DTensor counts its local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if hasattr(t, "to_local"):
                t = t.to_local()
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _storage_key(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()._cdata


def resident_bytes(trainer: Trainer, nets: dict[str, nn.Module]) -> dict[str, int]:
    """Bytes of the tensors that live through the run: weights, gradients, optimiser state.

    A tensor two networks share (a LoRA run's shared base) counts for the first network only (the teacher).
    """
    out: dict[str, int] = {}
    counted: set[int] = set()
    for name, net in nets.items():
        tensors = [t for t in (*net.parameters(), *net.buffers()) if _storage_key(t) not in counted]
        counted.update(_storage_key(t) for t in tensors)
        out[f"weights/{name}"] = _storage_bytes(tensors)
    for name, params in trainer.params.items():
        out[f"grads/{name}"] = _storage_bytes(p.grad for p in params if p.grad is not None)
        opt = trainer.optimizers[name]
        out[f"optimizer/{name}"] = _storage_bytes(v for state in opt.state.values() for v in state.values())
    return out


def profiled_peak(fn: Callable[[], None]) -> int:
    """Largest increase of CPU-allocator bytes while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# -------------------------------------------------------------------------------------------------
# FLOPs
# -------------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """``FlopCounterMode`` that also counts CPU flash attention (not in PyTorch's registry)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def gpu_kind(name: str) -> str | None:
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100 NVL" if "NVL" in n else "H100 PCIe" if "PCIE" in n else "H100 SXM"
    if "A100" in n:
        return "A100"
    return None


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where the number comes from); ``None`` on CPU / unknown GPUs."""
    if override_tflops is not None:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    kind = gpu_kind(name)
    if kind is None:
        return None, f"n/a (unknown GPU {name!r}: pass --peak-tflops)"
    if precision == "fp32":
        key = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    else:
        key = "bf16"
    return PEAK_TFLOPS[kind][key] * 1e12, f"{kind} dense {key}"


# -------------------------------------------------------------------------------------------------
# the benchmark
# -------------------------------------------------------------------------------------------------
def _iteration(trainer: Trainer, batch: Batch, phase_times: dict[str, list[float]] | None = None,
               sync: Callable[[], None] | None = None) -> None:
    """One training iteration exactly as ``Trainer.fit`` runs it (without logging / checkpoints)."""
    for phase in trainer.method.phases(trainer.step):
        t0 = time.perf_counter()
        trainer.run_phase(phase, batch)
        if phase_times is not None:
            if sync is not None:
                sync()
            phase_times[phase].append(time.perf_counter() - t0)
    trainer.step += 1


def _rng_snapshot(rng: RandomStreams) -> dict[str, Any]:
    return {k: v.clone() for k, v in rng.state_dict().items()}


def setup(settings: BenchSettings, ctx: DistContext | None = None) -> tuple[Trainer, Batch, Preset, DistContext]:
    """Models, method, trainer and the synthetic batch for ``settings`` (nothing run yet)."""
    preset = get_preset(settings.preset)
    resolution = int(settings.resolution or preset.default_resolution)
    preset.check_resolution(resolution)
    if settings.precision not in ("fp32", "amp_bf16", "bf16"):
        raise SenseflowError(f"unknown precision {settings.precision!r}; use fp32, amp_bf16 or bf16")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SenseflowError("--device cuda but no CUDA device is available")
    ctx = ctx or init_distributed(settings.device)
    device = ctx.device
    if preset.real and device.type == "cpu" and not settings.allow_cpu:
        raise SenseflowError(f"preset {preset.name} has real shapes: on a CPU one step takes minutes and tens of GB. "
                             f"Use a tiny preset, --estimate-memory, or --allow-cpu to run it anyway")
    if settings.lora_rank and ctx.distributed:
        raise SenseflowError("--lora-rank runs one process (the shared LoRA base is single-process)")
    models = build_models(preset, resolution, settings.precision, device, settings.anchors, settings.seed,
                          settings.lora_rank, settings.shared_base)
    parallelize(models, ParallelConfig(activation_checkpointing=settings.activation_checkpointing),
                settings.precision, ctx)
    compile_models(models, settings.compile)
    cfg = method_config(settings.method, preset.family, settings.method_overrides)
    method = build_method(models, cfg, images_per_iteration=settings.batch_size * ctx.world_size)
    teacher_dtype = dtypes(settings.precision)[0]
    batch = Batch([""] * settings.batch_size,
                  preset.conditioning(settings.batch_size, device, teacher_dtype, seed=settings.seed + ctx.rank))
    train = TrainConfig(steps=settings.warmup + settings.iterations, batch_size=settings.batch_size,
                        precision=settings.precision, device="cuda" if device.type == "cuda" else "cpu",
                        progress=False, tensorboard=False, seed=settings.seed)
    optim = {name: OptimizerConfig() for name in ("generator", "fake_score", "discriminator")}
    run_dir = tempfile.mkdtemp(prefix="senseflow-bench-")  # the trainer is given one; nothing is written
    rng = RandomStreams(settings.seed, rank=ctx.rank, device=device)
    trainer = Trainer(method, SyntheticBatches(batch), train, optim, run_dir, rng, device, ctx=ctx)
    return trainer, batch, preset, ctx


def run_benchmark(settings: BenchSettings, ctx: DistContext | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``settings``; returns a dict with :data:`RESULT_KEYS` (+ ``saved_bytes``)."""
    if settings.iterations < 1 or settings.warmup < 0 or settings.batch_size < 1:
        raise SenseflowError("iterations and batch_size must be >= 1, warmup >= 0")
    rss_before = current_rss()
    maxrss_before = max_rss()
    trainer, batch, preset, ctx = setup(settings, ctx)
    try:
        return _run(settings, trainer, batch, preset, ctx, rss_before, maxrss_before)
    finally:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)


def _run(settings: BenchSettings, trainer: Trainer, batch: Batch, preset: Preset, ctx: DistContext,
         rss_before: int, maxrss_before: int) -> dict[str, Any]:
    device = ctx.device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    nets = backbones(trainer.method.models)
    sampler = RSSSampler()

    # -- warm-up ---------------------------------------------------------------------------------
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with (sampler.running() if not cuda else contextlib.nullcontext()):
        for _ in range(settings.warmup):
            _iteration(trainer, batch)
    sync()

    # -- timed pass (CPU: with the region hooks; CUDA: without) -----------------------------------
    start_step, start_rng = trainer.step, _rng_snapshot(trainer.rng)
    timer = RegionTimer(sync if cuda else None)
    step_times: list[float] = []
    phase_times: dict[str, list[float]] = defaultdict(list)
    phases_seen: list[int] = []
    with timer.installed(nets, trainer.optimizers, trainer.method):
        timer.enabled = not cuda
        for _ in range(settings.iterations):
            phases_seen.append(len(trainer.method.phases(trainer.step)))
            t0 = time.perf_counter()
            _iteration(trainer, batch, None if cuda else phase_times)
            sync()
            step_times.append(time.perf_counter() - t0)
        breakdown_steps = step_times
        if cuda:  # breakdown pass: synchronise at region boundaries (slower, so timed separately)
            trainer.step = start_step
            trainer.rng.load_state_dict(copy.deepcopy(start_rng))
            timer.enabled = True
            breakdown_steps = []
            for _ in range(settings.iterations):
                t0 = time.perf_counter()
                _iteration(trainer, batch, phase_times, sync)
                sync()
                breakdown_steps.append(time.perf_counter() - t0)
            timer.enabled = False
    peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None
    reserved_cuda = torch.cuda.max_memory_reserved(device) if cuda else None
    # CPU: read the RSS peak now -- the profiler used below allocates a lot of host memory itself
    grew = max_rss() > maxrss_before
    peak_rss = max(sampler.peak, max_rss() if grew else 0)

    # -- FLOP replay (same random streams and phases as the timed pass) ---------------------------
    flops = None
    peak_allocated = None
    resident = resident_bytes(trainer, nets)
    def replay() -> None:
        trainer.step = start_step
        trainer.rng.load_state_dict(copy.deepcopy(start_rng))
        for _ in range(settings.iterations):
            _iteration(trainer, batch)

    if not cuda:  # allocator peak (a replay of its own: FlopCounterMode's module tracking holds tensors)
        resident = resident_bytes(trainer, nets)
        peak_allocated = sum(resident.values()) + _storage_bytes(batch.cond.tensors.values()) + profiled_peak(replay)
    if settings.count_flops:
        counter = flop_counter()
        with counter:
            replay()
        flops = counter.get_total_flops() / settings.iterations

    passes = None
    if settings.count_passes:  # a replay of its own, with hooks on every network
        trainer.step = start_step
        trainer.rng.load_state_dict(copy.deepcopy(start_rng))
        passes = count_passes(trainer, batch, settings.iterations)

    saved = measure_saved_bytes(trainer, batch) if settings.measure_saved else None

    # -- results -----------------------------------------------------------------------------------
    step = statistics.fmean(step_times)
    world = ctx.world_size
    images_per_s = settings.batch_size * world / step
    n = settings.iterations
    totals = dict(timer.totals)
    breakdown = {k: totals.get(k, 0.0) / n for k in ("forward", "backward", "optimizer", "grad_clip")}
    ref_step = statistics.fmean(breakdown_steps)
    breakdown["other"] = max(0.0, ref_step - sum(breakdown.values()))
    overhead = breakdown["other"] / ref_step
    # where the overhead is: method/adapter code around the forwards, and the trainer's own work
    glue = max(0.0, totals.get("loss_total", 0.0) / n - breakdown["forward"])
    overhead_split = {"method_and_adapter": glue, "trainer_and_harness": max(0.0, breakdown["other"] - glue)}
    peak, peak_source = peak_flops(device, settings.precision, settings.peak_tflops)
    achieved = None if flops is None else flops / step
    mfu: float | str = "n/a" if (peak is None or achieved is None) else achieved / peak
    if cuda:
        peak_mem = peak_cuda
        mem_method = "torch.cuda.max_memory_allocated (warm-up + timed iterations)"
    else:
        peak_mem = max(0, peak_rss - rss_before)
        mem_method = ("cpu: peak RSS over warm-up + timed iterations (ru_maxrss" +
                      (" and " if grew else " did not rise; ") +
                      "/proc/self/statm sampled during warm-up) minus RSS before the models were built")
    result: dict[str, Any] = {
        "preset": preset.name, "family": preset.family, "method": settings.method, "precision": settings.precision,
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": world, "resolution": int(settings.resolution or preset.default_resolution),
        "batch_size": settings.batch_size, "activation_checkpointing": settings.activation_checkpointing,
        "compile": settings.compile, "warmup": settings.warmup, "iterations": n,
        "lora_rank": settings.lora_rank, "shared_base": bool(settings.lora_rank) and settings.shared_base,
        "params": {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()},
        "phases_per_iteration": statistics.fmean(phases_seen),
        "step_time_s": step, "step_time_min_s": min(step_times), "step_time_max_s": max(step_times),
        "images_per_s": images_per_s, "s_per_1k_images": 1000.0 / images_per_s,
        "phase_time_s": {k: statistics.fmean(v) for k, v in phase_times.items()},
        "time_breakdown_s": breakdown, "framework_overhead": overhead, "overhead_split_s": overhead_split,
        "flops_per_iteration": flops, "achieved_tflops": None if achieved is None else achieved / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12, "peak_tflops_source": peak_source, "mfu": mfu,
        "peak_memory_bytes": peak_mem, "memory_method": mem_method,
        "peak_memory_reserved_bytes": reserved_cuda,
        "peak_allocated_bytes": peak_cuda if cuda else peak_allocated,
        "resident_bytes": resident,
    }
    if passes is not None:
        result["passes"] = passes
    if saved is not None:
        result["saved_bytes"] = saved
    return result


def measure_saved_bytes(trainer: Trainer, batch: Batch) -> dict[str, int]:
    """Bytes autograd saves for backward in each phase's loss (real tensors; parameters excluded).

    Runs each phase's forward only (no backward, no step); under AMP the cached bf16 weight casts
    are included (they are saved for backward).  Used to check the memory estimate.
    """
    nets = backbones(trainer.method.models)
    exclude = [t for net in nets.values() for t in list(net.parameters()) + list(net.buffers())]
    out: dict[str, int] = {}
    for phase in trainer.method.networks():
        trainer.set_phase(phase)
        counter = SavedTensorCounter(exclude=exclude)
        with trainer._autocast(), counter():
            loss = trainer.method.loss(phase, batch, trainer.rng)
        out[phase] = counter.total
        del loss, counter
        trainer.set_phase(None)
    return out


def format_result(r: dict[str, Any]) -> str:
    """A human-readable summary of :func:`run_benchmark`'s result."""
    def mb(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 2**20:.1f} MiB"

    b = r["time_breakdown_s"]
    step = sum(b.values())
    lines = [
        f"senseflow bench: {r['preset']} x {r['method']} x {r['precision']} on {r['device_name']} "
        f"(x{r['world_size']}), {r['resolution']}px, batch {r['batch_size']}, "
        f"{r['iterations']} iterations after {r['warmup']} warm-up",
        f"  step time          {r['step_time_s'] * 1e3:9.2f} ms  (min {r['step_time_min_s'] * 1e3:.2f}, "
        f"max {r['step_time_max_s'] * 1e3:.2f}; {r['phases_per_iteration']:.2f} phases/iteration)",
        f"  throughput         {r['images_per_s']:9.2f} images/s   = {r['s_per_1k_images']:.2f} s per 1k images",
        "  per phase          " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["phase_time_s"].items()),
        "  time breakdown     " + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / step:.1%})" for k, v in b.items()),
        f"  framework overhead {r['framework_overhead']:9.1%}  (share of step time outside backbone "
        f"forward/backward, clip_grad_norm_ and optimizer.step)",
        "  overhead split     " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["overhead_split_s"].items()),
    ]
    if r["flops_per_iteration"] is not None:
        mfu = r["mfu"] if isinstance(r["mfu"], str) else f"{r['mfu']:.1%}"
        peak = "n/a" if r["peak_tflops"] is None else f"{r['peak_tflops']:.1f}"
        lines.append(f"  model FLOPs        {r['flops_per_iteration'] / 1e9:9.3f} GFLOP/iteration, "
                     f"{r['achieved_tflops'] * 1e3:.2f} GFLOP/s achieved; peak {peak} TFLOP/s "
                     f"({r['peak_tflops_source']}); MFU {mfu}")
    lines.append(f"  peak memory        {mb(r['peak_memory_bytes'])}  [{r['memory_method']}]")
    if r.get("passes"):
        lines.append(format_passes(r["method"], r["passes"]))
    if r["device"] == "cpu":
        lines.append(f"  peak allocated     {mb(r['peak_allocated_bytes'])}  [CPU allocator: resident tensors + "
                     f"profiler memory events, replayed iterations]")
    return "\n".join(lines)


__all__ = ["BenchSettings", "PEAK_TFLOPS", "RESULT_KEYS", "RegionTimer", "SyntheticBatches", "build_models",
           "flop_counter", "format_result", "measure_saved_bytes", "peak_flops", "run_benchmark", "setup"]
