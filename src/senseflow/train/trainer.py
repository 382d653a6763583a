"""The training loop -- infrastructure only.

Devices, precision, gradient accumulation, clipping, the per-network optimisers, checkpoint /
resume, logging and progress.  *What* is optimised and *when* is the method's business
(:class:`senseflow.methods.Method`); the trainer contains no model- or method-specific branch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OptimizerConfig, TrainConfig
from ..images import check_images, make_grid
from ..methods.base import Batch, Method
from ..rng import RandomStreams, derive_seed
from ..teachers.base import Conditioning
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .compiled import optimizer_kernels
from .distributed import DistContext, full_tensor
from .finite import check_parameters
from .ema import EMA_NAME, EMAConfig, GeneratorEMA
from .logging import RunLogger, as_float
from .sharded import is_sharded, load_sharded, save_sharded


class BatchSource(Protocol):
    """Where training batches come from (prompt files, the toy world, image-text data, caches)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig,
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """One optimiser over ``params``; ``groups`` (torch param groups covering exactly ``params``) give some of them
    their own settings, e.g. DMD2's GAN head its own learning rate (``Method.param_groups``)."""
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.name]
    return cls(groups or params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
               **optimizer_kernels(params))


@dataclass
class SampleSpec:
    """Fixed prompts and noise for sample grids, so grids are comparable across steps."""

    prompts: list[str]
    cond: Conditioning
    noise: torch.Tensor


@dataclass
class TrainerHooks:
    """Optional callbacks (e.g. the demo's periodic evaluation), called with (trainer, step)."""

    on_log: list = field(default_factory=list)
    on_step: list = field(default_factory=list)
    on_sample: list = field(default_factory=list)
    #: after the final checkpoint and BEFORE the final sample grid (api.train writes student/ here,
    #: so a failure while sampling can never lose the student)
    on_finish: list = field(default_factory=list)


class Trainer:
    def __init__(self, method: Method, data: BatchSource, train: TrainConfig, optim: dict[str, OptimizerConfig],
                 run_dir: Path, rng: RandomStreams, device: torch.device, samples: SampleSpec | None = None,
                 sampler: str = "stochastic", hooks: TrainerHooks | None = None,
                 ctx: DistContext | None = None, ema: EMAConfig | None = None) -> None:
        self.method, self.data, self.cfg = method, data, train
        self.ctx = ctx or DistContext(device=device)
        self.run_dir, self.rng, self.device = Path(run_dir), rng, device
        self.samples, self.sampler = samples, sampler
        self.hooks = hooks or TrainerHooks()
        self.networks = method.networks()
        self.params: dict[str, list[nn.Parameter]] = {}
        for name, net in self.networks.items():
            params = list(net.trainable_parameters()) if hasattr(net, "trainable_parameters") else \
                [p for p in net.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"network {name!r} has no trainable parameters")
            self.params[name] = params
        groups = getattr(method, "param_groups", lambda _name, _params: None)  # a duck-typed method may lack it
        self.optimizers = {name: build_optimizer(self.params[name], optim[name], groups(name, self.params[name]))
                           for name in self.networks}
        # generator.ema: an fp32 average on this rank's shards; an output only (IDA reads the raw weights)
        self.ema = GeneratorEMA(self.networks["generator"], self.params["generator"], ema,
                                train.batch_size * self.ctx.world_size) \
            if ema is not None and "generator" in self.networks else None
        self.step = 0
        self._trainable: str | None = "*"  # unknown: the first set_phase visits every network
        self.logger: RunLogger | None = None
        self.last_logs: dict[str, float] = {}
        #: called once, right before the run writes anything (after its first step succeeded): the
        #: builder creates the run directory and its config.yaml here, so a refused run writes nothing
        self.before_first_write: Callable[[], None] | None = None
        self._writing = False

    # -- one phase -----------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "amp_bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_phase(self, phase: str | None) -> None:
        """Only the current phase's network is trainable: no gradient can leak into another one.

        Only networks whose state changes are visited (this runs twice per phase on every step).
        """
        if phase == self._trainable:
            return
        for name, params in self.params.items():
            if self._trainable == "*" or name in (phase, self._trainable):
                for p in params:
                    p.requires_grad_(name == phase)
        self._trainable = phase

    def run_phase(self, phase: str, batch: Batch) -> dict[str, Any]:
        self.set_phase(phase)
        opt = self.optimizers[phase]
        opt.zero_grad(set_to_none=True)
        logs: dict[str, Any] = {}  # detached tensors: converted to floats only at log time (no device syncs)
        accum = self.cfg.grad_accum
        for micro in batch.split(accum):
            with self._autocast():
                out = self.method.loss(phase, micro, self.rng)
            (out.loss / accum).backward()
            for k, v in out.logs.items():
                v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
                logs[k] = logs.get(k, 0.0) + v / accum
        params = self.params[phase]
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))
        logs[f"grad_norm/{phase}"] = norm.detach()
        if torch.isfinite(norm):
            opt.step()
            check_parameters(params, phase, self.step, norm, opt.param_groups[0]["lr"])
            logs.update(self.method.after_step(phase))
            if phase == "generator" and self.ema is not None:
                logs["ema_decay"] = self.ema.update(self.step)
        else:  # never let one bad batch destroy the weights
            logs[f"skipped/{phase}"] = 1.0
        opt.zero_grad(set_to_none=True)  # free this network's gradients before the next phase
        self.set_phase(None)
        return logs

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "rng": self.rng.state_dict(), "data": self.data.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> Path:
        if self.ema is not None:
            self.ema.check_finite(self.step, self.ctx)
        if self.ctx.distributed:
            shared = {"step": self.step, "data": self.data.state_dict(), "rng_shared": self.rng.shared.get_state()}
            extra = None
            if self.ema is not None:
                shared["ema"] = self.ema.state_dict()
                extra = {"ema": self.ema.shadow}
            return save_sharded(self.run_dir, self.step, self.networks, self.optimizers, shared,
                                self.rng.state_dict(), self.ctx, self.cfg.keep_checkpoints, extra=extra)
        extra = {EMA_NAME: self.ema.tensors()} if self.ema is not None else None
        return save_checkpoint(self.run_dir, self.step, self.networks, self.state_dict(), self.cfg.keep_checkpoints,
                               extra=extra)

    def resume(self, path: Path | None = None) -> bool:
        """Load ``path`` or the run's latest checkpoint; returns whether one was loaded.

        Sharded (DCP) checkpoints load onto any world size, a single process included; each rank
        takes back its own RNG streams when the checkpoint has them (new ranks keep fresh ones).
        """
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            return False
        if is_sharded(path):
            extra = {"ema": self.ema.shadow} if self.ema is not None else None
            shared, local = load_sharded(path, self.networks, self.optimizers, self.ctx.rank, extra=extra)
            if local is not None:
                self.rng.load_state_dict(local)
            self.rng.shared.set_state(shared["rng_shared"])
            self.data.load_state_dict(shared["data"])
            self.step = int(shared["step"])
            if self.ema is not None:
                self.ema.resume(path, shared.get("ema"), sharded=True)
            return True
        if self.ctx.distributed:
            from ..teachers.base import SenseflowError
            raise SenseflowError(f"{str(path)!r} is a single-process checkpoint; resume it with one process "
                                 "(multi-process runs write sharded checkpoints that load on any world size)")
        state = load_checkpoint(path, self.networks)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.rng.load_state_dict(state["rng"])
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        if self.ema is not None:
            self.ema.resume(path, state.get("ema"), sharded=False)
        return True

    def eval_weights(self):
        """Context in which the generator holds the weights served for sampling / evaluation.

        ``generator.ema.weights: ema`` (the default when an EMA is kept) swaps the EMA in and the raw
        weights back afterwards, exactly; otherwise the raw weights are used as they are.
        """
        if self.ema is not None and self.ema.cfg.weights == "ema":
            return self.ema.swapped_in()
        return contextlib.nullcontext()

    # -- samples ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, tag: str = "student") -> None:
        if self.samples is None:
            return
        gen = self.method.models.generator
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.cfg.seed, "grid"))
        was_training = gen.training
        gen.eval()
        with self._autocast():
            x0 = gen.sample(self.samples.noise, self.samples.cond, sampler=self.sampler, generator=g)
        gen.train(was_training)
        adapter = self.method.models.teacher.adapter
        pictures = adapter.decodes_to_images()  # a (D,)-latent custom model has no picture to show
        images = adapter.decode(x0.float()) if pictures else None
        if self.logger is None:  # not the main process: it only took part in the sharded forwards
            return
        if pictures:
            check_images(images, type(adapter).__name__)
            scale = max(1, 128 // images.shape[-1])
            self.logger.image(self.step, tag, make_grid(images, nrow=min(8, len(images)), scale=scale))
        else:
            self.logger.latents(self.step, tag, x0.float(), self.samples.prompts)
        for hook in self.hooks.on_sample:
            hook(self, self.step)

    # -- the loop --------------------------------------------------------------------------------
    def _start_writing(self) -> None:
        """The run has passed its first step: create the run directory, its config, the logger."""
        if self._writing:
            return
        if self.before_first_write is not None:
            self.before_first_write()
        self.logger = RunLogger(self.run_dir, tensorboard=self.cfg.tensorboard) if self.ctx.is_main else None
        self._writing = True

    def _first_step(self, batch: Batch) -> dict[str, Any]:
        """The first iteration, with running out of memory reported as one line (nothing written yet)."""
        from .preflight import out_of_memory

        logs: dict[str, Any] = {}
        try:
            for phase in self.method.phases(self.step):
                logs.update(self.run_phase(phase, batch))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            error = out_of_memory(exc, self.cfg, self.device)
            if error is None:
                raise
            raise error from None
        return logs

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        main = self.ctx.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.method.name}",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
        # per-key sums and counts: with TTUR a key of one phase appears only in that phase's iterations, so its
        # mean is over those iterations, not over the whole window (which would dilute G's losses TTUR-fold)
        window: dict[str, float] = {}
        seen: dict[str, int] = {}
        count, t0 = 0, time.perf_counter()
        try:
            while self.step < cfg.steps:
                batch = self.data.next_batch()
                logs: dict[str, Any] = {}
                if not self._writing:
                    logs = self._first_step(batch)
                    self._start_writing()
                else:
                    for phase in self.method.phases(self.step):
                        logs.update(self.run_phase(phase, batch))
                self.step += 1
                count += 1
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v
                    seen[k] = seen.get(k, 0) + 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - t0
                    means = {k: as_float(v) / seen[k] for k, v in window.items()}
                    means = self.ctx.mean(means)
                    means["it_per_s"] = count / max(elapsed, 1e-9)
                    self.last_logs = self.logger.scalars(self.step, means) if main else means
                    bar.set_postfix({k: f"{v:.3g}" for k, v in self.last_logs.items()
                                     if k.startswith("loss_")}, refresh=False)
                    for hook in self.hooks.on_log:
                        hook(self, self.step)
                    window, seen, count, t0 = {}, {}, 0, time.perf_counter()
                for hook in self.hooks.on_step:
                    hook(self, self.step)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    with self.eval_weights():
                        self.sample_grid()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
            self._start_writing()
            self.save()
            for hook in self.hooks.on_finish:
                hook(self, self.step)
            with self.eval_weights():
                self.sample_grid()
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
            self._writing = False  # a later fit() opens a fresh logger
        return self.last_logs
