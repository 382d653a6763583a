"""``senseflow generate``: images from a trained student, reproducible per image and by stock diffusers.

Seeds.  Image ``i`` of a run with ``--seed S`` gets its own seed ``image_seed(S, i)`` (a 32-bit
number derived from ``(S, i)``), so any subset of the prompts (``--start-idx``/``--num-prompts``,
any ``--batch-size``) reproduces the same images.  Each image is ONE random stream seeded with its
seed: the initial latents first, then (stochastic sampler) every re-noise draw, in order --
drawn exactly as the stock diffusers pipeline draws them, so that the folder written by
``senseflow export`` reproduces the image with a plain pipeline call:

* SD3 and FLUX pipelines draw the initial latents from ``generator`` but the scheduler's re-noise
  from the GLOBAL torch RNG (they do not hand their generator to ``scheduler.step``).  The stream
  is therefore the global RNG of the execution device: ``torch.manual_seed(seed)`` and no
  ``generator`` argument.  FLUX draws its initial latents unpacked ``[1, C, H, W]`` and its re-noise
  in the packed token layout ``[1, HW/4, 4C]`` (float32, as ``FlowMatchEulerDiscreteScheduler``
  upcasts the sample);
* SDXL (``LCMScheduler``) and SANA (``FlowMatchEulerDiscreteScheduler``) pipelines pass their
  ``generator`` to ``scheduler.step``: the stream is ``generator=torch.Generator("cpu").manual_seed(seed)``
  (batched calls with a list of generators reproduce too);
* other families (toy, custom): a CPU generator, latent-shaped draws.

Every image gets ``NNNNN.png`` and ``NNNNN.json`` (index, prompt, seed, steps, sampler, anchors,
...); with ``--format safetensors|npy`` the raw latent ``x0`` (before decode) replaces the PNG --
the default for a model whose outputs are not pictures (a custom ``(D,)``-latent model).
Outputs whose JSON already records the same settings (and whose file exists) are skipped, so
an interrupted run continues where it stopped.  Bad input fails with one line before anything is
written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .rng import derive_seed
from .teachers.base import SenseflowError
from .teachers.registry import DEFAULT_NOISE as DEFAULT_RECIPE, NoiseRecipe

SAMPLERS = ("stochastic", "euler")
#: what is written per prompt: a PNG of ``decode(x0)``, or the raw latent ``x0`` (before decode) as
#: safetensors (key ``latent``) or npy -- the only output of a model whose samples are not pictures
FORMATS = ("auto", "png", "safetensors", "npy")
EXTENSIONS = {"png": ".png", "safetensors": ".safetensors", "npy": ".npy"}


# -------------------------------------------------------------------------------------------------
# noise: exactly as the stock pipelines draw it
# -------------------------------------------------------------------------------------------------
def noise_recipe(family: str) -> NoiseRecipe:
    """How ``family``'s stock pipeline draws noise: the ``noise`` of its descriptor (``teachers/<family>.py``).

    The family's :class:`NoiseRecipe` (a CPU generator, latent-shaped draws, for a family without one)."""
    from .teachers import registry

    desc = registry.find(family)
    return desc.noise if desc is not None else DEFAULT_RECIPE


def __getattr__(name: str):
    """``RECIPES`` (family -> NoiseRecipe) for code written before the registry."""
    if name == "RECIPES":
        from .teachers import registry
        return {d.name: d.noise for d in registry.descriptors()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_seed(base_seed: int, index: int) -> int:
    """The seed of prompt ``index`` in a run with ``--seed base_seed`` (32 bits: fits every RNG API)."""
    return derive_seed(int(base_seed), "image", int(index)) % (2 ** 32)


class ImageNoise:
    """One image's random stream (initial latents, then re-noise draws), as the family's pipeline draws it."""

    def __init__(self, family: str, seed: int, latent_shape: Sequence[int], device: torch.device,
                 model_dtype: torch.dtype = torch.float32) -> None:
        self.recipe = noise_recipe(family)
        self.shape = tuple(int(s) for s in latent_shape)
        self.device = torch.device(device)
        self.model_dtype = model_dtype
        stream_device = self.device if self.recipe.stream == "global" else torch.device("cpu")
        self.generator = torch.Generator(device=stream_device).manual_seed(int(seed))

    def _draw(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        g = self.generator
        return torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype).to(self.device)

    def initial(self) -> Tensor:
        """The starting latents ``[1, *latent_shape]`` (``randn_tensor`` in the pipeline's ``prepare_latents``)."""
        return self._draw((1, *self.shape), self.model_dtype)

    def renoise(self) -> Tensor:
        """The fresh noise of one stochastic step, ``[1, *latent_shape]``."""
        dtype = torch.float32 if self.recipe.renoise_float32 else self.model_dtype
        if self.recipe.renoise is not None:   # the pipeline's own layout (FLUX: packed tokens)
            return self.recipe.renoise(self._draw, self.shape, dtype)
        return self._draw((1, *self.shape), dtype)


# -------------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_latents(student, cond, seeds: Sequence[int], steps: int | None = None,
                   sampler: str | None = None) -> Tensor:
    """Run the student's K-step sampler for one batch; image ``b`` uses only ``seeds[b]``'s stream.

    Same math as :meth:`FewStepGenerator.sample` (``x0`` at each anchor; stochastic: re-noise
    ``x = alpha(t') x0 + sigma(t') eps'``; euler: the deterministic step), with per-image noise.
    """
    gen = student.generator
    steps = gen.num_steps if steps is None else int(steps)
    sampler = sampler or student.spec.sampler
    if not 1 <= steps <= gen.num_steps:
        raise SenseflowError(f"--steps must be in 1..{gen.num_steps} (the student's anchors), got {steps}")
    if sampler not in SAMPLERS:
        raise SenseflowError(f"--sampler must be 'stochastic' or 'euler', got {sampler!r}")
    device = student.device
    from .teachers.loading import module_dtype
    dtype = module_dtype(student.backbone)
    shape = student.adapter.latent_shape()
    streams = [ImageNoise(student.family, s, shape, device, dtype) for s in seeds]
    x = torch.cat([s.initial() for s in streams]).float()
    n = x.shape[0]
    x0 = x
    for i in range(steps):
        t = gen.time(i, n, device)
        x0 = gen(x, t, cond)
        if i + 1 < steps:
            t_next = gen.time(i + 1, n, device)
            if sampler == "euler":
                x = gen.step(x, x0, t, t_next)
            else:
                eps = torch.cat([s.renoise() for s in streams]).to(x0.dtype)
                x = gen.schedule.add_noise(x0, eps, t_next)
    return x0


@torch.no_grad()
def render(student, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
           sampler: str | None = None) -> Tensor:
    """Prompts + per-image seeds -> images in ``[-1, 1]``, ``[B, 3, H, W]`` (float32, on CPU)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    cond = student.adapter.encode_prompts(list(prompts)).to(student.device)
    x0 = sample_latents(student, cond, seeds, steps, sampler)
    images = student.adapter.decode(x0)
    return images.float().cpu()


# -------------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------------
@dataclass
class GenerateResult:
    out: Path
    written: list[Path]
    skipped: int
    format: str = "png"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SenseflowError("--device cuda but no CUDA device is available; use --device auto or cpu")
    return torch.device(name)


def _record(spec, index: int, prompt: str, base_seed: int, steps: int, sampler: str) -> dict[str, Any]:
    seed = image_seed(base_seed, index)
    recipe = noise_recipe(spec.family)
    record = {"index": index, "prompt": prompt, "seed": seed, "base_seed": int(base_seed), "steps": steps,
              "sampler": sampler, "anchors": spec.anchors[:steps], "family": spec.family,
              "resolution": spec.resolution, "noise": "torch.manual_seed(seed)" if recipe.stream == "global"
              else "generator=torch.Generator('cpu').manual_seed(seed)",
              "student": str(spec.folder.resolve())}
    if spec.first_input_time is not None:   # only then: older records stay as they were
        record["first_input_time"] = spec.first_input_time
    return record


def _with_format(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """PNG records stay as they always were (folders written before --format still count as done)."""
    return record if fmt == "png" else {**record, "format": fmt}


def _resolve_format(requested: str, images: bool | None) -> str:
    """``auto``: PNG for a student whose outputs are pictures, raw latents (safetensors) otherwise."""
    if requested not in FORMATS:
        raise SenseflowError(f"--format must be one of {', '.join(FORMATS)}, got {requested!r}")
    if requested == "auto":
        return "png" if images is None or images else "safetensors"
    if requested == "png" and images is False:
        raise SenseflowError("--format png: this student's outputs are not images (its adapter's "
                             "decodes_to_images() is False); use --format safetensors or npy for the raw latents")
    return requested


def _save_latent(latent: Tensor, path: Path, fmt: str) -> None:
    """One raw latent, float32, written atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = latent.detach().float().cpu().contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({"latent": data}, str(tmp))
    else:
        import numpy as np
        with open(tmp, "wb") as fh:
            np.save(fh, data.numpy())
    os.replace(tmp, path)


def record_matches(output: Path, meta: Path, record: dict[str, Any]) -> bool:
    """Whether an output file exists with a JSON record equal to ``record`` (the resume rule of
    ``generate`` and ``evaluate``: an index is done only if it was made with the same settings)."""
    if not (output.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()) == record
    except (OSError, ValueError):
        return False


def _done(out: Path, stem: str, record: dict[str, Any]) -> bool:
    return record_matches(out / f"{stem}{EXTENSIONS[record.get('format', 'png')]}", out / f"{stem}.json", record)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def generate(student: str | os.PathLike, prompts: str | os.PathLike, out: str | os.PathLike, *,
             teacher: str | os.PathLike | None = None, start_idx: int = 0, num_prompts: int | None = None,
             batch_size: int = 4, steps: int | None = None, sampler: str | None = None, seed: int = 0,
             device: str = "auto", dtype: str | None = None, progress: bool = True,
             loaded=None, format: str = "auto", weights: str | None = None) -> GenerateResult:
    """Write ``NNNNN.png`` + ``NNNNN.json`` for prompts ``start_idx .. start_idx + num_prompts - 1``.

    ``format``: ``png``, or ``safetensors`` / ``npy`` for the raw latent ``x0`` (before decode);
    ``auto`` picks PNG unless the student's outputs are not images (``student.json`` ``images``,
    or its adapter's ``decodes_to_images()``).  ``loaded`` (a
    :class:`~senseflow.student.LoadedStudent`) skips loading the student again.
    ``weights`` (``ema`` / ``raw``): the weight set of a student that kept an EMA (default: its
    ``student.safetensors``, the EMA unless the run chose otherwise).
    """
    from .data.prompts import load_prompts
    from .images import check_images, save_png, to_uint8
    from .student import load_student, read_student, teacher_config

    # -- every check first: nothing is written (or loaded) for bad input ---------------------------
    spec = loaded.spec if loaded is not None else read_student(student)
    images = loaded.adapter.decodes_to_images() if loaded is not None else spec.meta.get("images")
    fmt = _resolve_format(format, images)
    spec.weights_file(weights)            # the requested weight set exists (one-line error otherwise)
    kind = weights or (loaded.weights if loaded is not None else spec.default_weights)
    if loaded is not None and weights is not None and weights != loaded.weights:
        raise SenseflowError(f"weights={weights!r} but the student passed as `loaded` holds its {loaded.weights} weights")
    all_prompts = load_prompts(prompts)
    if not 0 <= start_idx < len(all_prompts):
        raise SenseflowError(f"--start-idx {start_idx} is out of range: {prompts} has {len(all_prompts)} prompts "
                             f"(valid: 0..{len(all_prompts) - 1})")
    if num_prompts is not None and num_prompts < 1:
        raise SenseflowError(f"--num-prompts must be >= 1, got {num_prompts}")
    if batch_size < 1:
        raise SenseflowError(f"--batch-size must be >= 1, got {batch_size}")
    k = len(spec.anchors)
    steps = k if steps is None else int(steps)
    if not 1 <= steps <= k:
        raise SenseflowError(f"--steps must be in 1..{k} (the student has {k} anchors), got {steps}")
    sampler = sampler or spec.sampler
    if sampler not in SAMPLERS:
        raise SenseflowError(f"--sampler must be 'stochastic' or 'euler', got {sampler!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SenseflowError(f"--out {str(out)!r} exists and is not a directory")
    end = len(all_prompts) if num_prompts is None else min(len(all_prompts), start_idx + num_prompts)
    indices = list(range(start_idx, end))
    records = {i: _with_format(_record(spec, i, all_prompts[i], seed, steps, sampler), fmt) for i in indices}
    if len(spec.weight_kinds) > 1:        # a student with EMA and raw weights: images differ by set
        for record in records.values():
            record["weights"] = kind
    todo = [i for i in indices if not _done(out, f"{i:05d}", records[i])]
    skipped = len(indices) - len(todo)
    if loaded is None and todo:
        teacher_config(spec, teacher)     # the teacher folder exists (one-line error otherwise)
        loaded = load_student(spec.folder, teacher=teacher, device=_resolve_device(device), dtype=dtype,
                              weights=weights)
        if images is None and not loaded.adapter.decodes_to_images():  # student.json from before "images"
            return generate(student, prompts, out, teacher=teacher, start_idx=start_idx, num_prompts=num_prompts,
                            batch_size=batch_size, steps=steps, sampler=sampler, seed=seed, device=device,
                            dtype=dtype, progress=progress, loaded=loaded, format=format, weights=weights)

    # -- generate -----------------------------------------------------------------------------------
    written: list[Path] = []
    if not todo:
        return GenerateResult(out, written, skipped, fmt)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            chunk_prompts, seeds = [all_prompts[i] for i in chunk], [records[i]["seed"] for i in chunk]
            if fmt == "png":
                pictures = render(loaded, chunk_prompts, seeds, steps, sampler)
                check_images(pictures, type(loaded.adapter).__name__)
                outputs = list(to_uint8(pictures))
            else:
                cond = loaded.adapter.encode_prompts(chunk_prompts).to(loaded.device)
                outputs = list(sample_latents(loaded, cond, seeds, steps, sampler).float().cpu())
                bad = [i for i, x in zip(chunk, outputs) if not torch.isfinite(x).all()]
                if bad:
                    raise SenseflowError(f"the student's latent for prompt {bad[0]} is not finite; nothing is "
                                         f"written for it (a diverged student? try an earlier checkpoint)")
            for i, item in zip(chunk, outputs):
                path = out / f"{i:05d}{EXTENSIONS[fmt]}"
                if fmt == "png":
                    save_png(item, path)
                else:
                    _save_latent(item, path, fmt)
                _write_json(out / f"{i:05d}.json", records[i])
                written.append(path)
            bar.update(len(chunk))
    finally:
        bar.close()
    return GenerateResult(out, written, skipped, fmt)
