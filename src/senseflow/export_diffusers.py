"""``senseflow export``: a trained student as a diffusers folder that stock pipelines run as they are.

The folder is the teacher's folder (text encoders, tokenizers and VAE hard-linked or copied) with

* the student backbone in ``transformer/`` (``unet/`` for SDXL), written with ``save_pretrained``
  (sharded safetensors, ``max_shard_size``).  FLUX students have no guidance embedder
  (``guidance_embeds=False``), so the pipeline passes no guidance.  A LoRA student is written as its
  base backbone plus ``pytorch_lora_weights.safetensors`` (the family pipeline's
  ``save_lora_weights``; load it with ``pipe.load_lora_weights(folder)``), or merged into the
  backbone with ``merge_lora=True``;
* a ``scheduler/`` whose step IS the student's sampler:

  - SD3 / FLUX / SANA: ``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` and no dynamic shifting
    (the student's NATIVE sigmas are passed as ``sigmas=``, so no shift is applied twice and the
    training resolution's FLUX ``mu`` is baked in), ``stochastic_sampling=True`` for the stochastic
    sampler.  diffusers 0.42's stochastic step is ``x0 = x - sigma v``;
    ``x' = (1 - sigma') x0 + sigma' eps'``: exactly our re-noise step; at the last step
    ``sigma' = 0`` returns ``x0``, as our sampler does.  Euler: ``x' = x + (sigma' - sigma) v``, our
    deterministic step;
  - SDXL stochastic: ``LCMScheduler`` with the explicit ``timesteps`` (999/749/499/249): its step is
    the x0 prediction (boundary scalings ``c_skip`` ~ 1e-8, ``c_out`` = 1 in float32 at t >= 249) and a
    re-noise to the next timestep with the pipeline's generator; the last step returns x0.
    SDXL euler: ``DDIMScheduler`` (``timestep_spacing="trailing"``, ``set_alpha_to_one``, eta 0),
    which reproduces uniformly spaced anchors only (``999, 749, 499, 249`` for K = 4).

``senseflow_export.json`` and ``README.md`` in the folder give the exact stock-diffusers call
(``guidance_scale=1``: the student is guidance-free; the sigmas / timesteps; the seeding -- see
:mod:`senseflow.generate`).  The folder is built next to ``out`` and renamed into place when
complete: a failure never leaves half an export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .student import LoadedStudent, check_stock_export, load_student, read_student, teacher_config
from .teachers.base import SenseflowError

EXPORT_META = "senseflow_export.json"
LINK_MODES = ("hardlink", "copy", "symlink")


def __getattr__(name: str):
    """``PIPELINES`` (family -> (pipeline class, backbone subfolder)) for code written before the registry."""
    if name == "PIPELINES":
        from .teachers import registry
        return {d.name: (d.pipeline_class, d.backbone_folder) for d in registry.descriptors() if d.exports_to_diffusers}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------------------------------------
# schedulers and the pipeline call
# -------------------------------------------------------------------------------------------------
def trailing_timesteps(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """``DDIMScheduler(timestep_spacing="trailing")``'s ``k`` timesteps (SDXL's; kept here for old imports)."""
    from .teachers.sdxl import trailing_timesteps as trailing

    return trailing(k, num_train_timesteps)


def _recipe(family: str):
    """The family's :class:`~senseflow.teachers.registry.ExportRecipe` (its descriptor, ``teachers/<family>.py``)."""
    from .teachers import registry

    desc = registry.find(family)
    if desc is None or desc.export is None:
        raise SenseflowError(f"no diffusers scheduler for family {family!r}")
    return desc.export


def make_scheduler(student: LoadedStudent, sampler: str):
    """The stock scheduler whose ``step`` is the student's sampler (see module docstring)."""
    from .teachers.loading import read_scheduler_config

    return _recipe(student.family).scheduler(student, sampler, read_scheduler_config(student.teacher_path))


def pipeline_call(student: LoadedStudent, sampler: str) -> dict[str, Any]:
    """The keyword arguments of the stock pipeline call that reproduces ``senseflow generate``."""
    recipe = _recipe(student.family)
    res = student.spec.resolution
    call: dict[str, Any] = {"num_inference_steps": len(student.spec.anchors)}
    call.update(recipe.step_kwargs(student, sampler))
    call["guidance_scale"] = 1.0
    call["height"] = res
    call["width"] = res
    if recipe.call_kwargs is not None:
        recipe.call_kwargs(student, call)
    return call


def seeding(family: str) -> str:
    """Where the family's pipeline draws its noise: ``global`` RNG or the ``generator`` (its NoiseRecipe)."""
    from .generate import noise_recipe

    return "global" if noise_recipe(family).stream == "global" else "generator"


def snippet(folder: str, family: str, call: dict[str, Any], lora: bool) -> str:
    """The stock-diffusers code that reproduces ``senseflow generate`` (image ``NNNNN.json``'s seed)."""
    args = ",\n    ".join(f"{k}={v!r}" for k, v in call.items())
    lines = ["import json, torch", "from diffusers import DiffusionPipeline", "",
             "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"   # the --device senseflow generate used",
             f"pipe = DiffusionPipeline.from_pretrained({folder!r}).to(device)"]
    if lora:
        lines.append(f"pipe.load_lora_weights({folder!r}, weight_name=\"pytorch_lora_weights.safetensors\")")
    lines += ["meta = json.load(open(\"00000.json\"))          # written by senseflow generate", ""]
    if seeding(family) == "global":
        lines += ["torch.manual_seed(meta[\"seed\"])   # SD3/FLUX draw the latents AND the re-noise from the global RNG",
                  f"image = pipe(\n    prompt=meta[\"prompt\"],\n    {args},\n).images[0]"]
    else:
        lines += [f"image = pipe(\n    prompt=meta[\"prompt\"],\n    {args},\n"
                  f"    generator=torch.Generator(\"cpu\").manual_seed(meta[\"seed\"]),\n).images[0]"]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# folder plumbing
# -------------------------------------------------------------------------------------------------
def _link_tree(src: Path, dst: Path, mode: str) -> None:
    """``src`` -> ``dst``: hard links (falling back to copies across file systems), copies or symlinks."""
    if mode == "symlink":
        dst.symlink_to(src.resolve(), target_is_directory=True)
        return
    if mode == "copy":
        shutil.copytree(src, dst, symlinks=False)
        return

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, symlinks=False, copy_function=link)


def _components(index: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
            and len(v) == 2}


def _strip_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Remove the LoRA layers WITHOUT merging (the base backbone), in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, sub.get_base_layer())
    for attr in ("peft_config", "_senseflow_peft_config"):
        module.__dict__.pop(attr, None)
    if getattr(module, "_hf_peft_config_loaded", None):
        module._hf_peft_config_loaded = False
    return module


def _write_readme(folder: Path, info: dict[str, Any], code: str) -> None:
    lines = [f"# Few-step student of `{info['teacher']}` ({info['family']}, senseflow)", "",
             f"{info['steps']}-step {info['sampler']} sampler, guidance-free (`guidance_scale=1`), "
             f"trained at {info['resolution']} px. The `{info['backbone']}/` folder holds the student"
             + (" base; the LoRA adapters are in `pytorch_lora_weights.safetensors`." if info["lora"] else ".")
             + f" The `scheduler/` ({info['scheduler']}) takes exactly the student's steps.", "",
             "Reproduce `senseflow generate` (same prompt, same seed -> the same image) with stock diffusers:", "",
             "```python", code, "```", "",
             "Seeding: " + ("SD3 and FLUX pipelines draw the initial latents and the scheduler's re-noise from the "
                            "GLOBAL torch RNG of the execution device when no generator is given: call "
                            "`torch.manual_seed(seed)` right before the pipeline, one prompt per call, on the device "
                            "`senseflow generate` ran on."
                            if info["seeding"] == "global" else
                            "the pipeline's CPU `generator` draws the initial latents and every re-noise (one prompt "
                            "per generator; a list of generators reproduces a batch; any device)."),
             "", (f"Fewer steps (`senseflow generate --steps k`): pass `num_inference_steps=k` and the first k "
                  f"{'sigmas' if 'sigmas' in info['call'] else 'timesteps'}."
                  if ("sigmas" in info["call"] or "timesteps" in info["call"]) else
                  "Fewer steps (`senseflow generate --steps k`) do not reproduce with this DDIM scheduler (its "
                  "timesteps are spaced for all the steps)."),
             "", "Exact (float32 weights): the same images up to float rounding (~1e-6 on [0, 1] images). Loading "
             "with `dtype=torch.bfloat16` is faster but no longer bit-comparable.", ""]
    (folder / "README.md").write_text("\n".join(lines))


_SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}


def parse_shard_size(size: str | int) -> int:
    """``--max-shard-size`` (``5GB``, ``500MB``, bytes) as bytes; anything else is a one-line error up front."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper()
        unit = text[-2:] if text[-2:] in _SIZE_UNITS else ""
        number = text[: len(text) - len(unit)].strip()
        try:
            value = int(float(number) * _SIZE_UNITS.get(unit, 1)) if number.replace(".", "", 1).isdigit() else -1
        except (ValueError, OverflowError):
            value = -1
    if value <= 0:
        raise SenseflowError(f"--max-shard-size {size!r}: give a positive size such as 5GB, 500MB or a number of "
                             "bytes")
    return value



def write_folder_atomically(out: Path, fill) -> Path:
    """Build the folder beside ``out`` with ``fill(tmp)``, then rename it into place: a crash or an error
    leaves the old ``out`` (or nothing) and no half-written export."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_diffusers(student: str | os.PathLike, out: str | os.PathLike, *, teacher: str | os.PathLike | None = None,
                     link: str = "hardlink", max_shard_size: str | int = "5GB", dtype: str | None = None,
                     merge_lora: bool = False, overwrite: bool = False, sampler: str | None = None,
                     loaded: LoadedStudent | None = None, weights: str | None = None) -> Path:
    """Write the diffusers folder ``out`` for a trained student (see module docstring); returns ``out``.

    ``sampler`` overrides the student's sampler (``student.json``).  ``loaded`` (a student already
    loaded with :func:`~senseflow.student.load_student`) is not modified.  ``weights`` (``ema`` /
    ``raw``) picks the weight set of a student that kept an EMA (default: ``student.safetensors``).
    """
    from .teachers.loading import read_model_index

    spec = loaded.spec if loaded is not None else read_student(student)
    spec.weights_file(weights)            # the requested weight set exists (one-line error otherwise)
    check_stock_export(spec)
    if loaded is not None and weights is not None and weights != loaded.weights:
        raise SenseflowError(f"weights={weights!r} but the student passed as `loaded` holds its {loaded.weights} weights")
    from .teachers import registry

    family = registry.find(spec.family)
    if family is None or not family.exports_to_diffusers:
        names = list(registry.diffusers_families())
        which = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
        raise SenseflowError(f"export writes a diffusers pipeline folder, which needs an {which} "
                             f"teacher; this student's family is {spec.family!r} (use senseflow generate)")
    sampler = sampler or spec.sampler
    if sampler not in ("stochastic", "euler"):
        raise SenseflowError(f"--sampler must be 'stochastic' or 'euler', got {sampler!r}")
    if link not in LINK_MODES:
        raise SenseflowError(f"--link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    max_shard_size = parse_shard_size(max_shard_size)
    shown = str(out)                 # the folder as the user named it (for the snippet)
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise SenseflowError(f"--out {str(out)!r} already exists: choose another folder or pass --overwrite")
    config = teacher_config(spec, teacher)
    teacher_dir = Path(config.paths.teacher)
    index = read_model_index(teacher_dir)
    if index is None:
        raise SenseflowError(f"the teacher folder {teacher_dir} has no model_index.json: export needs the complete "
                             f"diffusers folder the student was trained from")
    pipe_name, backbone_dir = family.pipeline_class, family.backbone_folder
    components = _components(index)
    if backbone_dir not in components:
        raise SenseflowError(f"{teacher_dir}/model_index.json lists no {backbone_dir}: not a {pipe_name} folder")
    for name, value in components.items():
        if name not in (backbone_dir, "scheduler") and value[0] is not None and not (teacher_dir / name).is_dir():
            raise SenseflowError(f"{teacher_dir}/model_index.json lists {name} but {teacher_dir / name} is missing: "
                                 f"copy it from the original model")
    own = loaded is None
    if loaded is None:
        loaded = load_student(spec.folder, teacher=teacher, device="cpu", dtype=None, weights=weights)
    if family.export.check is not None:   # what the stock pipeline cannot reproduce (teachers/<family>.py)
        family.export.check(loaded)
    scheduler = make_scheduler(loaded, sampler)
    call = pipeline_call(loaded, sampler)
    lora = loaded.has_lora and not merge_lora

    def fill(tmp: Path) -> None:
        backbone = loaded.backbone
        if not own and (loaded.has_lora or dtype is not None):   # never modify the caller's student
            import copy
            backbone = copy.deepcopy(backbone)
        if dtype is not None:
            from .build import DTYPES
            backbone.to(DTYPES[dtype])
        from .train.finite import require_finite
        require_finite(dict(backbone.named_parameters()), f"the exported {backbone_dir}")
        if loaded.has_lora:
            from .lora import merge_lora as merge, save_diffusers_lora
            if merge_lora:
                merge(backbone)
            else:
                save_diffusers_lora(backbone, tmp, spec.family)
                _strip_lora(backbone)
        backbone.save_pretrained(str(tmp / backbone_dir), max_shard_size=max_shard_size, safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        for name, value in components.items():
            if name in (backbone_dir, "scheduler") or value[0] is None:
                continue
            _link_tree(teacher_dir / name, tmp / name, link)
        new_index = dict(index)
        new_index[backbone_dir] = ["diffusers", type(backbone).__name__]
        new_index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2))
        code = snippet(shown, spec.family, call, lora)
        info = {"family": spec.family, "pipeline": pipe_name, "backbone": backbone_dir,
                "scheduler": type(scheduler).__name__, "sampler": sampler, "steps": len(spec.anchors),
                "anchors": spec.anchors, "resolution": spec.resolution, "teacher": str(teacher_dir),
                "student": str(spec.folder.resolve()), "lora": lora, "seeding": seeding(spec.family),
                "call": call, "snippet": code, "method": spec.meta.get("method"), "step": spec.meta.get("step"),
                "weights": loaded.weights}
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2))
        _write_readme(tmp, info, code)

    return write_folder_atomically(out, fill)
