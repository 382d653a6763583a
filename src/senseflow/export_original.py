"""``senseflow export --format single-file | kohya-lora``: a student in the layouts UIs load.

Besides the diffusers folder (:mod:`senseflow.export_diffusers`), users run models in ComfyUI,
A1111 / Forge and other UIs, which load

* a **single-file checkpoint** in the model's original key layout (Stability's MMDiT / LDM UNet,
  Black Forest Labs' FLUX.1 / FLUX.2, NVlabs' SANA, Tongyi-MAI's Z-Image; Qwen-Image's is diffusers' own
  names), and
* **LoRA weights in kohya-ss' layout** (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``).

Each family describes its layouts in its own file (``ExportRecipe.single_file`` /
``ExportRecipe.kohya_lora``, see :mod:`senseflow.original_layout`); a family without one is refused
with a one-line error.  The layouts are exactly what diffusers' own readers accept
(``<Model>.from_single_file`` and the pipelines' ``load_lora_weights``), which is how the tests check
them: written here, read back by diffusers, same weights and same images.

``--out DIR`` gets ``DIR/<DIR name>.safetensors`` plus what reproduces ``senseflow generate``:

* single-file: the backbone's ``config.json`` (``DIR/<transformer|unet>/``, so ``from_single_file`` runs
  offline with ``config=DIR``), the student's ``scheduler/``, ``senseflow_export.json`` and a README;
  a LoRA student is merged into the file;
* kohya-lora: the kohya file next to the diffusers-format ``pytorch_lora_weights.safetensors``,
  ``senseflow_export.json`` and a README.

Everything is validated before anything is written; the folder is built next to ``DIR`` and renamed
into place (a failure leaves nothing), and non-finite weights are refused.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .teachers.base import SenseflowError

FORMATS = ("diffusers", "single-file", "checkpoint", "kohya-lora")
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
EXPORT_META = "senseflow_export.json"


def _descriptors():
    from .teachers import registry

    return registry.descriptors()


def _families_with(attr: str) -> str:
    names = [d.name for d in _descriptors() if d.export is not None and getattr(d.export, attr) is not None]
    return ", ".join(names) if names else "none"


def _recipe(family: str, attr: str, fmt: str):
    from .teachers import registry

    desc = registry.find(family)
    recipe = getattr(desc.export, attr, None) if desc is not None and desc.export is not None else None
    if recipe is None:
        what = ("original single-file layout that diffusers reads back (from_single_file)" if attr == "single_file"
                else "kohya LoRA layout that diffusers' load_lora_weights reads")
        raise SenseflowError(f"--format {fmt}: family {family!r} has no {what}; families with one: "
                             f"{_families_with(attr)} (use --format diffusers)")
    return desc, recipe


def _out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(str(out))))
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise SenseflowError(f"--out {str(path)!r} already exists: choose another folder or pass --overwrite")
    if path.name.endswith(".safetensors"):
        raise SenseflowError(f"--out {str(out)!r}: give a folder (the file inside is named after it), not a "
                             f".safetensors file")
    return path


def _write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Build the folder beside ``out`` with ``fill(tmp)``, then rename it into place (atomic)."""
    from .export_diffusers import write_folder_atomically
    return write_folder_atomically(out, fill)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], dtype: str | None) -> None:
    from safetensors.torch import save_file

    from .train.finite import require_finite

    if dtype is not None:
        from .build import DTYPES
        target = DTYPES[dtype]
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    require_finite(tensors, path.name)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load(student, teacher, weights, loaded):
    from .student import check_stock_export, read_student

    spec = loaded.spec if loaded is not None else read_student(student)
    spec.weights_file(weights)
    check_stock_export(spec)
    if loaded is not None and weights is not None and weights != loaded.weights:
        raise SenseflowError(f"weights={weights!r} but the student passed as `loaded` holds its {loaded.weights} weights")
    return spec


def _seeding_lines(family: str, call: dict[str, Any], pipe: str = "pipe") -> list[str]:
    from .export_diffusers import seeding

    args = ",\n    ".join(f"{k}={v!r}" for k, v in call.items())
    lines = ["meta = json.load(open(\"00000.json\"))          # written by senseflow generate"]
    if seeding(family) == "global":
        lines += ["torch.manual_seed(meta[\"seed\"])   # SD3/FLUX draw the latents AND the re-noise from the global RNG",
                  f"image = {pipe}(\n    prompt=meta[\"prompt\"],\n    {args},\n).images[0]"]
    else:
        lines += [f"image = {pipe}(\n    prompt=meta[\"prompt\"],\n    {args},\n"
                  f"    generator=torch.Generator(\"cpu\").manual_seed(meta[\"seed\"]),\n).images[0]"]
    return lines


def _teacher_components(teacher_dir: Path, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The teacher folder's ``names`` components (classes from ``model_index.json``; safetensors only)."""
    import importlib

    from .teachers.loading import read_model_index

    index = read_model_index(teacher_dir) or {}
    out = {}
    for name in names:
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or not (teacher_dir / name).is_dir():
            raise SenseflowError(f"--format checkpoint needs the teacher's {name}/ ({teacher_dir}/model_index.json "
                                 f"lists none or the folder is missing): copy it from the original model")
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        out[name] = cls.from_pretrained(str(teacher_dir / name), use_safetensors=True).eval()
    return out


def export_single_file(student: str | os.PathLike, out: str | os.PathLike, *,
                       teacher: str | os.PathLike | None = None, dtype: str | None = None, overwrite: bool = False,
                       sampler: str | None = None, weights: str | None = None, loaded=None,
                       checkpoint: bool = False) -> Path:
    """Write ``out/<out name>.safetensors``: the student backbone in its family's original layout (see module doc).

    ``checkpoint=True`` (``--format checkpoint``): the whole-model file instead (backbone + the teacher's
    text encoders and VAE), for UIs that load one checkpoint (A1111 / Forge, ComfyUI "Load Checkpoint").
    """
    from .export_diffusers import make_scheduler, pipeline_call
    from .student import load_student, teacher_config

    spec = _load(student, teacher, weights, loaded)
    fmt = "checkpoint" if checkpoint else "single-file"
    desc, recipe = _recipe(spec.family, "single_file", fmt)
    if checkpoint and recipe.checkpoint is None:
        names = ", ".join(d.name for d in _descriptors() if d.export is not None and d.export.single_file is not None
                          and d.export.single_file.checkpoint is not None) or "none"
        raise SenseflowError(f"--format checkpoint: family {spec.family!r} has no whole-model checkpoint layout that "
                             f"diffusers reads back; families with one: {names} (use --format single-file)")
    sampler = sampler or spec.sampler
    if sampler not in ("stochastic", "euler"):
        raise SenseflowError(f"--sampler must be 'stochastic' or 'euler', got {sampler!r}")
    shown = str(out)
    out = _out_dir(out, overwrite)
    config = teacher_config(spec, teacher)
    if loaded is None:
        loaded = load_student(spec.folder, teacher=teacher, device="cpu", dtype=None, weights=weights)
    if desc.export.check is not None:
        desc.export.check(loaded)
    backbone = loaded.backbone
    if loaded.has_lora:                 # UIs load one file: the adapters are merged (into a copy)
        from .lora import merge_lora
        backbone = merge_lora(copy.deepcopy(backbone))
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    from .train.finite import require_finite
    require_finite(state, f"the exported {desc.backbone_folder}")
    original = recipe.to_original(state, dict(backbone.config))    # one-line error on an unmapped weight
    teacher_dir = Path(config.paths.teacher)
    if checkpoint:
        components = _teacher_components(teacher_dir, recipe.checkpoint_components)
        original = recipe.checkpoint(original, components)
        del components
    scheduler = make_scheduler(loaded, sampler)
    call = pipeline_call(loaded, sampler)
    name = f"{out.name}.safetensors"
    info = {"format": fmt, "family": spec.family, "file": name,
            "loader": recipe.checkpoint_loader if checkpoint else recipe.loader,
            "backbone": desc.backbone_folder, "pipeline": desc.pipeline_class, "scheduler": type(scheduler).__name__,
            "sampler": sampler, "steps": len(spec.anchors), "anchors": spec.anchors, "resolution": spec.resolution,
            "teacher": str(config.paths.teacher), "student": str(spec.folder.resolve()), "lora_merged": loaded.has_lora,
            "call": call, "weights": loaded.weights, "where": recipe.checkpoint_where if checkpoint else recipe.where}
    sched = type(scheduler).__name__
    full = ["import json, torch", f"from diffusers import {info['loader']}, {sched}", "",
            f"scheduler = {sched}.from_pretrained({shown!r}, subfolder=\"scheduler\")",
            f"pipe = {info['loader']}.from_single_file(\n    {str(Path(shown) / name)!r}, config={info['teacher']!r}, "
            f"scheduler=scheduler)   # config: the teacher folder (tokenizers, component configs)",
            *_seeding_lines(spec.family, call)]
    code = "\n".join(full) if checkpoint else "\n".join([
        "import json, torch",
        f"from diffusers import DiffusionPipeline, {recipe.loader}, {type(scheduler).__name__}", "",
        f"{desc.backbone_folder} = {recipe.loader}.from_single_file(\n    {str(Path(shown) / name)!r}, "
        f"config={shown!r}, subfolder={desc.backbone_folder!r})",
        f"scheduler = {type(scheduler).__name__}.from_pretrained({shown!r}, subfolder=\"scheduler\")",
        f"pipe = DiffusionPipeline.from_pretrained(\n    {info['teacher']!r}, {desc.backbone_folder}="
        f"{desc.backbone_folder}, scheduler=scheduler)", *_seeding_lines(spec.family, call)])
    info["snippet"] = code

    def fill(tmp: Path) -> None:
        meta = {"format": "pt", "producer": "senseflow",
                "senseflow": json.dumps({k: info[k] for k in ("family", "sampler", "steps", "anchors", "resolution",
                                                              "call")})}
        _save(original, tmp / name, meta, dtype)
        backbone.save_config(str(tmp / desc.backbone_folder))
        scheduler.save_pretrained(str(tmp / "scheduler"))
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2))
        _readme(tmp, info, [
            f"`{name}`: the {info['steps']}-step student of `{info['teacher']}` ({spec.family}) as ONE file in the "
            f"model's original key layout" + (" (LoRA merged)" if loaded.has_lora else "")
            + (", with the teacher's " + ", ".join(recipe.checkpoint_components) if checkpoint else "") + ".",
            f"Where: {info['where']}.",
            f"Sampling: {info['steps']} steps, guidance-free (CFG / guidance 1), the {sampler} sampler with the "
            f"student's {'sigmas' if 'sigmas' in call else 'timesteps'} "
            f"{call.get('sigmas', call.get('timesteps'))}; in a UI pick the same number of steps, CFG 1 and a "
            f"sampler/schedule that visits those noise levels.",
            "diffusers reads it back (offline: the backbone config and the student's scheduler are in this folder):"],
            code)

    return _write_folder(out, fill)


def export_kohya_lora(student: str | os.PathLike, out: str | os.PathLike, *,
                      teacher: str | os.PathLike | None = None, dtype: str | None = None, overwrite: bool = False,
                      sampler: str | None = None, weights: str | None = None, loaded=None) -> Path:
    """Write ``out/<out name>.safetensors`` (kohya layout) next to ``pytorch_lora_weights.safetensors`` (diffusers)."""
    from .export_diffusers import pipeline_call
    from .lora import save_diffusers_lora
    from .original_layout import lora_pairs
    from .student import load_student

    spec = _load(student, teacher, weights, loaded)
    desc, recipe = _recipe(spec.family, "kohya_lora", "kohya-lora")
    if spec.lora is None and (loaded is None or not loaded.has_lora):
        raise SenseflowError("--format kohya-lora: this student has no LoRA adapters (it was trained without "
                             "generator.lora); use --format single-file or diffusers")
    sampler = sampler or spec.sampler
    if sampler not in ("stochastic", "euler"):
        raise SenseflowError(f"--sampler must be 'stochastic' or 'euler', got {sampler!r}")
    out = _out_dir(out, overwrite)
    if loaded is None:
        loaded = load_student(spec.folder, teacher=teacher, device="cpu", dtype=None, weights=weights)
    if not loaded.has_lora:
        raise SenseflowError("--format kohya-lora: this student has no LoRA adapters; use --format single-file or "
                             "diffusers")
    if desc.export.check is not None:
        desc.export.check(loaded)
    backbone = loaded.backbone
    pairs = lora_pairs(backbone)
    kohya = recipe.to_kohya(pairs, dict(backbone.config))       # one-line error on an unmapped adapter
    call = pipeline_call(loaded, sampler)
    name = f"{out.name}.safetensors"
    ranks = sorted({int(p[0].shape[0]) for p in pairs.values()})
    info = {"format": "kohya-lora", "family": spec.family, "file": name, "diffusers_file": DIFFUSERS_LORA,
            "pipeline": desc.pipeline_class, "sampler": sampler, "steps": len(spec.anchors), "anchors": spec.anchors,
            "resolution": spec.resolution, "student": str(spec.folder.resolve()), "modules": len(pairs),
            "ranks": ranks, "call": call, "weights": loaded.weights, "where": recipe.where}
    code = "\n".join([
        "import json, torch", "from diffusers import DiffusionPipeline", "",
        "# the student's base: the folder `senseflow export --format diffusers` wrote for this student",
        "pipe = DiffusionPipeline.from_pretrained(\"EXPORT_FOLDER\")",
        f"pipe.load_lora_weights({str(out)!r}, weight_name={name!r})   # kohya layout; diffusers converts it",
        *_seeding_lines(spec.family, call)])
    info["snippet"] = code

    def fill(tmp: Path) -> None:
        meta = {"format": "pt", "producer": "senseflow", "ss_network_module": "networks.lora",
                "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
                "senseflow": json.dumps({k: info[k] for k in ("family", "sampler", "steps", "anchors", "resolution",
                                                              "call")})}
        _save(kohya, tmp / name, meta, dtype)
        written = save_diffusers_lora(backbone, tmp, spec.family, weight_name=DIFFUSERS_LORA)
        if written.name != DIFFUSERS_LORA:   # pragma: no cover -- save_lora_weights names the file as asked
            raise SenseflowError(f"diffusers wrote {written.name}, expected {DIFFUSERS_LORA}")
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2))
        _readme(tmp, info, [
            f"`{name}`: the student's {len(pairs)} LoRA adapters (rank {', '.join(map(str, ranks))}) in kohya-ss' "
            f"key layout; `{DIFFUSERS_LORA}`: the same adapters in diffusers' layout.",
            f"Where: {recipe.where}.",
            "The adapters apply to the student's BASE weights (the teacher's, for a run that trained only LoRA; "
            "a FLUX student's base has no guidance embedder, so on FLUX.1-dev itself they do not give the student: "
            "use `--format single-file`, which merges them, there).",
            f"Sampling: {info['steps']} steps, guidance-free (CFG / guidance 1), the {sampler} sampler.",
            "diffusers converts the kohya file with its own loader:"], code)

    return _write_folder(out, fill)


def _readme(folder: Path, info: dict[str, Any], paragraphs: list[str], code: str) -> None:
    lines = [f"# senseflow student ({info['family']}, {info['format']})", ""]
    for p in paragraphs:
        lines += [p, ""]
    lines += ["```python", code, "```", ""]
    (folder / "README.md").write_text("\n".join(lines))


def export(fmt: str, student: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> Path:
    """Dispatch ``--format`` (``diffusers`` goes to :func:`senseflow.export_diffusers.export_diffusers`)."""
    if fmt not in FORMATS:
        raise SenseflowError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "diffusers":
        from .export_diffusers import export_diffusers
        return export_diffusers(student, out, **kwargs)
    for flag in ("link", "max_shard_size", "merge_lora"):
        value = kwargs.pop(flag, None)
        if value not in (None, False, "hardlink", "5GB"):
            raise SenseflowError(f"--{flag.replace('_', '-')} applies to --format diffusers only")
    if fmt == "kohya-lora":
        return export_kohya_lora(student, out, **kwargs)
    return export_single_file(student, out, checkpoint=fmt == "checkpoint", **kwargs)
