"""Per-device memory estimate for a model x method x precision x GPU count, before launching a job.

What is counted (``senseflow bench --estimate-memory`` prints every row):

* **weights** -- parameters per network (counted exactly on a ``meta``-device build of the preset)
  x bytes per element, plus buffers (e.g. SD3's positional-embedding table; never sharded): the
  frozen teacher in bf16 (``amp_bf16`` / ``bf16``) or fp32 (``fp32``); the
  generator and fake score in fp32 (``fp32``; ``amp_bf16`` keeps fp32 master weights) or bf16
  (``bf16``).  FLUX's student and fake score lack the guidance embedder, as the adapter builds them.
  With ``lora_rank`` only the adapters are trainable (counted on the family's ``auto`` targets); the
  frozen base is stored like the teacher's and, with ``shared_base`` on one GPU, IS the teacher's
  (``lora.shared_base``: 0 extra bytes);
* **gradients** -- one per trainable parameter, in the parameter dtype, and only during the
  network's own phase: ``Trainer.run_phase`` frees them right after the optimiser step
  (``zero_grad(set_to_none=True)``), so at most one network holds gradients at a time;
* **optimiser state** -- Adam/AdamW: ``exp_avg`` + ``exp_avg_sq`` in the parameter dtype
  (2 x weights) plus a 4-byte ``step`` per parameter tensor;
* **sharding** -- FSDP over N GPUs divides weights, gradients and optimiser state of the
  generator and fake score by N, and the teacher's too when ``shard_teacher`` (the default);
  DDP divides nothing.  FSDP adds the unsharded parameters and gradients of the block in flight
  (and the prefetched one): ``2 x largest block x (compute + gradient bytes)``;
* **AMP weight copies** -- without FSDP, autocast keeps a bf16 copy of every fp32 weight that
  a grad-recording forward uses (saved for backward): the trained network, and in SiD's generator
  phase also the fp32 fake score it differentiates through;
* **activations** -- the bytes autograd saves for backward, MEASURED by running the real backbone
  on the ``meta`` device (no memory, no compute) under ``saved_tensors_hooks``, with
  scaled-dot-product attention replaced by a function that saves what flash attention saves
  (``q, k, v, out`` and the fp32 log-sum-exp; never the attention matrix).  Parameters are not
  counted again; storages saved twice are counted once.  Measured at batch 1 and 2 and
  extrapolated linearly.  With activation checkpointing a checkpointed block keeps only its
  inputs, and backward recomputes one block at a time (+ the largest block's activations).
  Which forwards record a graph in each phase comes from :func:`phase_plan` (checked against the
  real methods in the unit tests): e.g. SiD's generator phase differentiates through the
  generator (batch B), the teacher (2B with CFG) and the fake score (2B), frozen weights but
  gradients to the input, all alive at once;
* **transient** -- a heuristic working set for backward: ``TRANSIENT_BLOCKS`` x the largest single
  block's activations at the largest batch of the phase;
* **inputs** -- the conditioning tensors (x2 when a CFG forward concatenates the unconditional
  batch).

Not counted: the CUDA context and the caching allocator's slack (``nvidia-smi`` shows ~1-3 GB more
than ``torch.cuda.max_memory_allocated``), text encoders and VAE (prompts and latents come from
caches), the VFM discriminator of SenseFlow's adversarial term (off in these estimates),
communication buffers beyond the in-flight block.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..teachers.base import SenseflowError
from .presets import Preset, count_parameters, get_preset, method_config

GiB = 2 ** 30
#: backward working set, in units of the largest block's saved activations (a heuristic; with it the
#: estimated peak of the tiny CPU presets is within -10%..+22% of the measured one, docs/performance.md)
TRANSIENT_BLOCKS = 1.0
Precision = Literal["fp32", "amp_bf16", "bf16"]
GradMode = Literal["params", "input", "none"]


def bytes_per_element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def dtypes(precision: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(teacher weights, trainable weights, compute) dtypes of a precision mode."""
    if precision == "fp32":
        return torch.float32, torch.float32, torch.float32
    if precision == "amp_bf16":
        return torch.bfloat16, torch.float32, torch.bfloat16
    if precision == "bf16":
        return torch.bfloat16, torch.bfloat16, torch.bfloat16
    raise SenseflowError(f"unknown precision {precision!r}; use fp32, amp_bf16 or bf16")


# -------------------------------------------------------------------------------------------------
# counting what autograd saves
# -------------------------------------------------------------------------------------------------
class _FlashLikeAttention(torch.autograd.Function):
    """Shape-only stand-in for flash attention: saves q, k, v, out and an fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class FlashAttentionSaving(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to :class:`_FlashLikeAttention` (meta-device counting only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            qkv = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
            return _FlashLikeAttention.apply(*qkv)
        return func(*args, **kwargs)


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorCounter:
    """Bytes of distinct storages autograd saves for backward inside the context (not parameters).

    ``blocks`` (name -> module) attributes saved bytes to the outermost running block and records
    the bytes of each block's tensor inputs (what activation checkpointing keeps).  Works on real
    tensors and on the meta device.
    """

    def __init__(self, exclude: Iterable[Tensor] = (), blocks: dict[str, nn.Module] | None = None) -> None:
        self.exclude = {_storage_key(t) for t in exclude}
        self.blocks = blocks or {}
        self.saved: dict[int, tuple[int, str | None]] = {}
        self.block_inputs: dict[str, int] = {}
        self._refs: list[Tensor] = []  # keep storages alive: their keys must stay unique
        self._stack: list[str] = []

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.saved.values())

    def by_block(self) -> dict[str | None, int]:
        out: dict[str | None, int] = {}
        for n, block in self.saved.values():
            out[block] = out.get(block, 0) + n
        return out

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.saved:
            self.saved[key] = (t.untyped_storage().nbytes(), self._stack[0] if self._stack else None)
            self._refs.append(t)
        return t

    @contextlib.contextmanager
    def __call__(self) -> Iterator["SavedTensorCounter"]:
        handles = []
        for name, module in self.blocks.items():
            def pre(_m, args, kwargs, name=name):
                if not self._stack:
                    seen: set[int] = set()
                    size = 0
                    for leaf in tree_leaves((args, kwargs)):
                        if isinstance(leaf, Tensor) and _storage_key(leaf) not in seen \
                                and _storage_key(leaf) not in self.exclude:
                            seen.add(_storage_key(leaf))
                            size += leaf.untyped_storage().nbytes()
                    self.block_inputs[name] = self.block_inputs.get(name, 0) + size
                self._stack.append(name)

            def post(_m, _args, _out, name=name):
                self._stack.pop()
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()


# -------------------------------------------------------------------------------------------------
# per-network activation profiles (meta device)
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    """``fixed + per_sample * batch`` bytes."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return max(0, self.fixed + self.per_sample * batch)

    @staticmethod
    def fit(b1: int, b2: int) -> "Linear":
        return Linear(fixed=2 * b1 - b2, per_sample=b2 - b1)


@dataclass(frozen=True)
class ActivationProfile:
    """Saved-for-backward bytes of one backbone forward as a function of the batch."""

    total: Linear                 # no activation checkpointing
    outside_blocks: Linear        # saved outside the blocks (embedders, final layer)
    block_inputs: Linear          # what checkpointed blocks keep
    blocks: tuple[Linear, ...]    # per block

    def saved(self, batch: int, checkpointing: bool = False) -> int:
        if not checkpointing:
            return self.total.at(batch)
        return self.outside_blocks.at(batch) + self.block_inputs.at(batch) + self.largest_block(batch)

    def largest_block(self, batch: int) -> int:
        return max((b.at(batch) for b in self.blocks), default=0)


def _measure_once(preset: Preset, config: dict[str, Any], resolution: int, dtype: torch.dtype, mode: GradMode,
                  batch: int, lora_rank: int = 0) -> tuple[int, int, int, dict[str, int]]:
    model = preset.build_backbone("meta", dtype, config=config)
    model.requires_grad_(mode == "params")
    if lora_rank and mode == "params":   # only the adapters train: frozen linears save no inputs of their own
        from ..lora import apply_lora
        apply_lora(model, rank=lora_rank)
    kwargs = preset.backbone_inputs(batch, resolution, "meta", dtype, config=config)
    if mode == "input":
        first = next(iter(kwargs))
        kwargs[first] = kwargs[first].requires_grad_(True)
    adapter_blocks = preset.block_names(model)
    modules = dict(model.named_modules())
    counter = SavedTensorCounter(exclude=list(model.parameters()) + list(model.buffers()),
                                 blocks={n: modules[n] for n in adapter_blocks})
    grad = mode != "none"
    with torch.set_grad_enabled(grad), counter(), FlashAttentionSaving():
        model(**kwargs)
    per_block = counter.by_block()
    outside = per_block.pop(None, 0)
    blocks = {n: per_block.get(n, 0) for n in adapter_blocks}
    return counter.total, outside, sum(counter.block_inputs.values()), blocks


@functools.lru_cache(maxsize=64)
def _profile_cached(preset_name: str, student: bool, resolution: int, dtype: torch.dtype,
                    mode: GradMode, lora_rank: int = 0) -> ActivationProfile:
    preset = get_preset(preset_name)
    config = preset.student_config() if student else dict(preset.config)
    t1, o1, i1, b1 = _measure_once(preset, config, resolution, dtype, mode, 1, lora_rank)
    t2, o2, i2, b2 = _measure_once(preset, config, resolution, dtype, mode, 2, lora_rank)
    return ActivationProfile(total=Linear.fit(t1, t2), outside_blocks=Linear.fit(o1, o2),
                             block_inputs=Linear.fit(i1, i2),
                             blocks=tuple(Linear.fit(b1[n], b2[n]) for n in b1))


def activation_profile(preset: Preset | str, network: str, resolution: int, dtype: torch.dtype,
                       mode: GradMode, lora_rank: int = 0) -> ActivationProfile:
    """Saved bytes of ``network`` (``teacher`` / ``generator`` / ``fake_score``) in a forward of ``mode``.

    ``params``: trainable weights (the network being trained); ``input``: frozen weights with a
    gradient to the image input (SiD's teacher / fake score in G's phase); ``none``: no graph.
    ``lora_rank``: a trainable network (``params``) is a LoRA network of that rank (PEFT on the meta build).
    """
    name = preset if isinstance(preset, str) else preset.name
    if mode == "none":
        return ActivationProfile(Linear(0, 0), Linear(0, 0), Linear(0, 0), ())
    lora = int(lora_rank) if network != "teacher" and mode == "params" else 0
    return _profile_cached(name, network != "teacher", int(resolution), dtype, mode, lora)


# -------------------------------------------------------------------------------------------------
# which forwards record a graph in each phase
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """One backbone call: which network, batch multiplier (2 = CFG), what gradient it records."""

    network: str
    batch_mult: int
    grad: GradMode
    what: str = ""


def _mult(spec, guidance_kinds: frozenset[str]) -> int:
    cfg = getattr(spec, "cfg", None)
    if cfg is None or "cfg" not in guidance_kinds:
        return 1
    if isinstance(cfg, tuple):
        return 1 if cfg == (1.0, 1.0) else 2
    return 1 if float(cfg) == 1.0 else 2


def phase_plan(config, guidance_kinds: frozenset[str] = frozenset({"cfg"})) -> dict[str, list[Forward]]:
    """The backbone forwards of each phase of a method, from its config (no models needed).

    Only calls that matter for memory are listed: grad-recording forwards (``params`` / ``input``)
    and the largest no-grad forwards (their working set is transient).  The SenseFlow/DMD2
    adversarial discriminator is not modelled (benchmarks run with ``adversarial_weight: 0``).
    """
    name = config.name
    if name in ("dmd2", "senseflow"):
        gen = [Forward("generator", 1, "params", "G(x_t)"),
               Forward("teacher", _mult(config.real_guidance, guidance_kinds), "none", "teacher x0 (real score)"),
               Forward("fake_score", _mult(config.fake_guidance, guidance_kinds), "none", "fake x0")]
        if name == "senseflow" and config.isg_weight > 0:
            gen.append(Forward("teacher", _mult(config.isg_guidance, guidance_kinds), "none", "ISG teacher step"))
        fake = [Forward("generator", 1, "none", "G sample"),
                Forward("fake_score", 1, "params", "fake score regression")]
        return {"generator": gen, "fake_score": fake}
    if name == "sid":
        fake = [Forward("generator", 1, "none", "G rollout"),
                Forward("fake_score", _mult(config.fake_train_guidance, guidance_kinds), "params",
                        "fake score regression (CFG-combined)")]
        if config.adversarial:
            fake.append(Forward("fake_score", 1, "params", "SiD2a real-latent discriminator pass"))
        gen = [Forward("generator", 1, "params", "G(x_k)"),
               Forward("teacher", _mult(config.teacher_guidance, guidance_kinds), "input", "f_r (through x_t)"),
               Forward("fake_score", _mult(config.fake_guidance, guidance_kinds), "input", "f_f (through x_t)")]
        return {"fake_score": fake, "generator": gen}
    raise SenseflowError(f"no memory plan for method {name!r}")


# -------------------------------------------------------------------------------------------------
# the estimate
# -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    component: str
    bytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    preset: str
    method: str
    precision: str
    gpus: int
    strategy: str
    batch_size: int
    resolution: int
    activation_checkpointing: bool
    shard_teacher: bool
    params: dict[str, int]
    static: list[Row]
    phases: dict[str, list[Row]]
    peak_phase: str
    grads_freeable_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        return sum(r.bytes for r in self.static)

    def phase_bytes(self, phase: str) -> int:
        return self.static_bytes + sum(r.bytes for r in self.phases[phase])

    @property
    def total_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["static_bytes"] = self.static_bytes
        d["phase_bytes"] = {p: self.phase_bytes(p) for p in self.phases}
        d["total_bytes"] = self.total_bytes
        d["total_gb"] = self.total_gb
        return d

    def table(self) -> str:
        unit, scale = ("GB", 1e9) if self.total_bytes >= 1e8 else ("MB", 1e6)

        def gb(n: int) -> str:
            return f"{n / scale:10.2f}" if unit == "GB" else f"{n / scale:10.3f}"
        head = (f"memory estimate: {self.preset} x {self.method} x {self.precision}, {self.gpus} GPU(s) "
                f"({self.strategy}{', teacher sharded' if self.shard_teacher and self.gpus > 1 else ''}), "
                f"batch {self.batch_size}/GPU, {self.resolution}px, activation checkpointing "
                f"{'on' if self.activation_checkpointing else 'off'}")
        params = ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in self.params.items())
        lines = [head, f"parameters: {params}", f"{'component':<52}{unit + '/device':>10}  note", "-" * 100]
        for r in self.static:
            lines.append(f"{r.component:<52}{gb(r.bytes)}  {r.note}")
        lines.append(f"{'= static (whole run)':<52}{gb(self.static_bytes)}")
        for phase, rows in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"phase {phase}:")
            for r in rows:
                lines.append(f"  {r.component:<50}{gb(r.bytes)}  {r.note}")
            lines.append(f"  {'= static + phase':<50}{gb(self.phase_bytes(phase))}{mark}")
        lines.append("-" * 100)
        lines.append(f"{'PEAK per device (allocated, excl. CUDA context)':<52}{gb(self.total_bytes)}  "
                     f"{unit} = {self.total_bytes / GiB:.3f} GiB")
        if self.grads_freeable_bytes:
            lines.append(f"(freeing each network's gradients right after its optimiser step would save "
                         f"{self.grads_freeable_bytes / 1e9:.2f} GB)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class ParamStats:
    params: int          # parameter elements
    tensors: int         # parameter tensors (Adam keeps a 4-byte step per tensor)
    largest_block: int   # parameter elements of the largest block (FSDP unit)
    float_buffers: int   # floating-point buffer elements (cast with the weights; never sharded)
    other_buffer_bytes: int

    def weight_bytes(self, bytes_per: int, shard: int = 1) -> int:
        return self.params * bytes_per // shard + self.float_buffers * bytes_per + self.other_buffer_bytes


@functools.lru_cache(maxsize=32)
def _param_stats(preset_name: str, student: bool) -> ParamStats:
    """Parameter and buffer counts of a preset's network (meta build)."""
    preset = get_preset(preset_name)
    config = preset.student_config() if student else dict(preset.config)
    model = preset.build_backbone("meta", torch.float32, config=config)
    blocks = preset.block_names(model)
    largest = max((count_parameters(model.get_submodule(b)) for b in blocks), default=count_parameters(model))
    float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    other = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point())
    return ParamStats(count_parameters(model), sum(1 for _ in model.parameters()), largest, float_buffers, other)


@functools.lru_cache(maxsize=32)
def _lora_stats(preset_name: str, rank: int) -> tuple[int, int]:
    """(elements, tensors) of the LoRA adapters a trainable network of the preset gets (family's auto targets)."""
    from ..lora import count_lora_parameters

    preset = get_preset(preset_name)
    model = preset.build_backbone("meta", torch.float32, config=preset.student_config())
    return count_lora_parameters(model, rank, "auto")


def _cond_bytes(preset: Preset, batch: int, dtype: torch.dtype) -> int:
    n = preset.text_tokens * preset.text_dim + preset.pooled_dim if preset.bench.conditioning is None \
        else preset.text_dim   # a family with its own conditioning (custom: one text vector)
    return batch * n * bytes_per_element(dtype)


def estimate_memory(preset: Preset | str, method: str = "sid", precision: Precision = "bf16", gpus: int = 1,
                    batch_size: int = 1, resolution: int | None = None, activation_checkpointing: bool = False,
                    shard_teacher: bool = True, strategy: str = "auto", method_overrides: dict[str, Any] | None = None,
                    optimizer_states: int = 2, checkpoint_teacher: bool = False, lora_rank: int | None = None,
                    shared_base: bool = True) -> MemoryEstimate:
    """Predict the per-device peak of ``torch.cuda.max_memory_allocated`` for one training setup.

    ``lora_rank``: the generator and fake score are LoRA networks of that rank on the family's
    ``auto`` targets (``generator.lora`` / ``fake_score.lora``): only the adapters train (gradients,
    optimiser state, AMP copies), their frozen base is stored like the teacher's, and with
    ``shared_base`` (single GPU, as the trainer: ``lora.shared_base``) it IS the teacher's, so it
    costs nothing more.  Counted on the preset's meta build, so every family's preset gets it.

    ``batch_size`` is per GPU.  ``strategy``: ``auto`` (fsdp for >1 GPU), ``fsdp``, ``ddp`` or ``none``.
    ``checkpoint_teacher`` models checkpointing the frozen teacher's blocks too (what-if: the trainer's
    ``parallel.activation_checkpointing`` wraps only the generator and the fake score).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    resolution = int(resolution or preset.default_resolution)
    preset.check_resolution(resolution)
    if gpus < 1 or batch_size < 1:
        raise SenseflowError("gpus and batch_size must be >= 1")
    if lora_rank is not None and lora_rank < 1:
        raise SenseflowError(f"--lora-rank must be >= 1, got {lora_rank}")
    strategy = ("fsdp" if gpus > 1 else "none") if strategy == "auto" else strategy
    if strategy not in ("none", "ddp", "fsdp"):
        raise SenseflowError(f"unknown strategy {strategy!r}; use auto, none, ddp or fsdp")
    if gpus == 1:
        strategy = "none"
    cfg = method_config(method, preset.family, method_overrides)
    teacher_dtype, train_dtype, compute_dtype = dtypes(precision)
    tb, wb, cb = (bytes_per_element(d) for d in (teacher_dtype, train_dtype, compute_dtype))
    shard = gpus if strategy == "fsdp" else 1
    t_shard = shard if shard_teacher else 1

    st_teacher, st_student = _param_stats(preset.name, False), _param_stats(preset.name, True)
    p_teacher, p_student = st_teacher.params, st_student.params
    n_student = st_student.tensors
    blk_teacher, blk_student = st_teacher.largest_block, st_student.largest_block
    params = {"teacher": p_teacher, "generator": p_student, "fake_score": p_student}
    trainables = ("generator", "fake_score")
    lora_p, lora_t = _lora_stats(preset.name, int(lora_rank)) if lora_rank else (0, 0)
    share = bool(lora_rank) and shared_base and shard == 1 and strategy == "none"
    p_trained, n_trained = (lora_p, lora_t) if lora_rank else (p_student, n_student)
    if lora_rank:
        params.update({"generator adapters": lora_p, "fake_score adapters": lora_p})

    def buffers_note(st: ParamStats, b: int) -> str:
        n = st.float_buffers * b + st.other_buffer_bytes
        return f" + buffers {n / 1e6:.1f} MB" if n else ""

    static = [Row("teacher weights", st_teacher.weight_bytes(tb, t_shard),
                  f"{p_teacher / 1e9:.3f}B x {tb} B" + (f" / {t_shard}" if t_shard > 1 else "")
                  + buffers_note(st_teacher, tb))]
    for net in trainables:
        if not lora_rank:
            static.append(Row(f"{net} weights", st_student.weight_bytes(wb, shard),
                              f"{p_student / 1e9:.3f}B x {wb} B" + (f" / {shard}" if shard > 1 else "")
                              + buffers_note(st_student, wb)))
            continue
        adapters = lora_p * wb // shard
        base = 0 if share else st_student.weight_bytes(tb, shard)
        where = "base shared with the teacher (lora.shared_base)" if share else \
            f"own frozen base {p_student / 1e9:.3f}B x {tb} B" + (f" / {shard}" if shard > 1 else "") \
            + buffers_note(st_student, tb)
        static.append(Row(f"{net} weights", base + adapters,
                          f"LoRA rank {lora_rank}: adapters {lora_p / 1e6:.1f}M x {wb} B; {where}"))
    for net in trainables:
        static.append(Row(f"{net} optimiser state (Adam m, v, step)",
                          (optimizer_states * p_trained * wb) // shard + 4 * n_trained,
                          f"{optimizer_states} x {'adapter ' if lora_rank else ''}weights"))
    if shard > 1:
        fsdp = 2 * max(blk_teacher if t_shard > 1 else 0, blk_student) * (cb + wb)
        static.append(Row("FSDP unsharded block buffers", fsdp, "2 x largest block x (compute + grad bytes)"))

    guidance_kinds = preset.make_adapter(resolution).guidance_kinds
    plan = phase_plan(cfg, guidance_kinds)
    phases: dict[str, list[Row]] = {}
    for phase, forwards in plan.items():
        rows: list[Row] = []
        largest_block = 0
        amp_copies: set[str] = set()
        max_mult = 1
        for fw in forwards:
            batch = batch_size * fw.batch_mult
            max_mult = max(max_mult, fw.batch_mult)
            dtype = compute_dtype
            prof_mode: GradMode = fw.grad if fw.grad != "none" else "params"
            profile = activation_profile(preset, fw.network, resolution, dtype, prof_mode, int(lora_rank or 0))
            largest_block = max(largest_block, profile.largest_block(batch))
            if fw.grad == "none":
                continue
            ckpt = activation_checkpointing and (fw.network != "teacher" or checkpoint_teacher)
            rows.append(Row(f"activations: {fw.network} x{batch} ({fw.grad})", profile.saved(batch, ckpt),
                            fw.what + (", checkpointed" if ckpt else "")))
            if precision == "amp_bf16" and fw.network != "teacher" and shard == 1:
                amp_copies.add(fw.network)
        for net in sorted(amp_copies):
            rows.append(Row(f"AMP bf16 weight copies: {net}", p_trained * 2, "autocast cast, saved for backward"))
        if phase in trainables:
            rows.append(Row(f"{phase} gradients", p_trained * wb // shard, "freed after the step (trainer)"))
        rows.append(Row("transient (backward working set, heuristic)", int(TRANSIENT_BLOCKS * largest_block),
                        f"{TRANSIENT_BLOCKS:g} x largest block's activations"))
        rows.append(Row("inputs (conditioning, latents)", _cond_bytes(preset, batch_size * max_mult, compute_dtype)
                        + 8 * batch_size * 4 * int(torch.tensor(preset.latent_shape(resolution)).prod()),
                        "prompt embeddings + a few fp32 latent-sized tensors"))
        phases[phase] = rows
    peak_phase = max(phases, key=lambda p: sum(r.bytes for r in phases[p]))
    notes = []
    if activation_checkpointing and not checkpoint_teacher and any(
            f.network == "teacher" and f.grad == "input" for fs in plan.values() for f in fs):
        notes.append("parallel.activation_checkpointing wraps the generator and fake score only; the teacher's "
                     "graph (SiD differentiates through it) is kept whole -- see checkpoint_teacher")
    if precision == "amp_bf16" and shard == 1:
        notes.append("AMP without FSDP: autocast's bf16 weight copies are saved for backward")
    if lora_rank:
        notes.append("LoRA: the trained network's activations are measured with the adapters applied (PEFT on the "
                     "meta build); frozen networks differentiated through the input (SiD) are measured without them")
        if shared_base and not share:
            notes.append("lora.shared_base is single-process: with FSDP each network keeps its own base (as the "
                         "trainer does)")
    return MemoryEstimate(preset=preset.name, method=method, precision=precision, gpus=gpus, strategy=strategy,
                          batch_size=batch_size, resolution=resolution,
                          activation_checkpointing=activation_checkpointing,
                          shard_teacher=shard_teacher and shard > 1, params=params, static=static, phases=phases,
                          peak_phase=peak_phase, grads_freeable_bytes=0, notes=notes)


def compare_with_run(est: MemoryEstimate, result: dict[str, Any]) -> list[tuple[str, int, int | None]]:
    """(quantity, estimated bytes, measured bytes) for a benchmark run of the same setup.

    Weights and optimiser state are compared with the tensors that exist after the run, and so are
    gradients, which the trainer frees after every step (estimated resident: 0);
    activations with the bytes autograd saved in each phase (``measure_saved``); the peak with
    ``peak_allocated_bytes`` (CUDA: ``max_memory_allocated``; CPU: allocator events).
    """
    rows: list[tuple[str, int, int | None]] = []
    resident = result.get("resident_bytes") or {}
    static = {r.component: r.bytes for r in est.static}
    for net in ("teacher", "generator", "fake_score"):
        rows.append((f"{net} weights (+ buffers)", static[f"{net} weights"], resident.get(f"weights/{net}")))
    for net in ("generator", "fake_score"):
        rows.append((f"{net} gradients (resident after a step)", 0, resident.get(f"grads/{net}", 0)))
        rows.append((f"{net} optimiser state", static[f"{net} optimiser state (Adam m, v, step)"],
                     resident.get(f"optimizer/{net}")))
    # under activation checkpointing the inner saves are hidden from saved_tensors_hooks: not comparable
    saved = {} if est.activation_checkpointing else (result.get("saved_bytes") or {})
    for phase, phase_rows in est.phases.items():
        estimated = sum(r.bytes for r in phase_rows if r.component.startswith(("activations", "AMP")))
        rows.append((f"saved for backward, phase {phase}", estimated, saved.get(phase)))
    rows.append(("peak allocated", est.total_bytes, result.get("peak_allocated_bytes")))
    return rows


def format_comparison(rows: list[tuple[str, int, int | None]]) -> str:
    lines = [f"{'estimate vs measured':<40}{'estimated':>14}{'measured':>14}{'gap':>9}"]
    for name, e, m in rows:
        gap = "" if not m else f"{(e - m) / m:+.1%}"
        lines.append(f"{name:<40}{e:>14,}{'n/a' if m is None else f'{m:,}':>14}{gap:>9}")
    return "\n".join(lines)


__all__ = ["ActivationProfile", "FlashAttentionSaving", "Forward", "MemoryEstimate", "Row", "SavedTensorCounter",
           "compare_with_run", "format_comparison",
           "activation_profile", "bytes_per_element", "dtypes", "estimate_memory", "phase_plan"]
