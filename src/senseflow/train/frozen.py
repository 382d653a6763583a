"""How a run stores its frozen weights: ``teacher.weight_dtype`` (fp8) and ``teacher.cpu_offload``.

Applied once by the run builder, right after the networks are built: the student and the fake
score are copies of the teacher made BEFORE this runs, so they keep full-precision, on-device
weights whatever the teacher's storage is (:mod:`senseflow.train.fp8`, :mod:`senseflow.train.offload`).

Text encoders during training (docs/performance.md, "Offload and fp8 frozen teacher"):

* ``paths.cache`` (``senseflow cache``): the teacher is loaded WITHOUT its text encoders
  (``load_text_encoders=False``), so they take no memory at all during training;
* prompt files / the toy world / image-text or LMDB data without a cache: every batch's
  prompts are encoded during training, so the encoders stay loaded -- on the device, or, with
  ``teacher.cpu_offload: text_encoders | all``, in host memory with accelerate's offload hooks.
"""

from __future__ import annotations

import torch

from ..teachers.base import SenseflowError

OFFLOADS_BACKBONE = ("backbone", "all")
OFFLOADS_TEXT = ("text_encoders", "all")


def check_teacher_storage(config, distributed: bool) -> None:
    """Refuse (one line, before anything is loaded or written) combinations the storage cannot serve."""
    t = config.teacher
    if t.weight_dtype == "none" and t.cpu_offload == "none":
        return
    what = " and ".join(x for x in (f"teacher.weight_dtype: {t.weight_dtype}" if t.weight_dtype != "none" else "",
                                     f"teacher.cpu_offload: {t.cpu_offload}" if t.cpu_offload != "none" else "") if x)
    if distributed:
        raise SenseflowError(f"{what} is for single-process runs; distributed runs shard the teacher "
                             f"(parallel.shard_teacher) and offload shards with parallel.cpu_offload")
    if t.cpu_offload in OFFLOADS_BACKBONE and t.dtype == "float16" and config.train.precision == "amp_bf16":
        # an offloaded backbone holds meta tensors between calls, so storage_autocast cannot see its
        # float16 storage and give it a float16 autocast inside the bfloat16 one
        raise SenseflowError("teacher.cpu_offload: backbone offload of a float16 teacher under train.precision: "
                             "amp_bf16 is not supported; use teacher.dtype: bfloat16 or teacher.cpu_offload: "
                             "text_encoders")
    if t.cpu_offload in OFFLOADS_BACKBONE and config.train.compile:
        raise SenseflowError("teacher.cpu_offload: backbone offload hooks and train.compile do not mix (each "
                             "offloaded forward moves weights inside the compiled blocks); set train.compile: false "
                             "or teacher.cpu_offload: text_encoders")


def _shares_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    mine = {id(x) for x in (*a.parameters(), *a.buffers())}
    return any(id(x) in mine for x in (*b.parameters(), *b.buffers()))


def apply_teacher_storage(models, config, device: torch.device) -> dict[str, int]:
    """fp8 storage and/or CPU offload for the frozen teacher (and the text encoders); what was done.

    ``models``: :class:`~senseflow.methods.base.DistillationModels` whose generator and fake
    score were already copied from the teacher.
    """
    t = config.teacher
    done: dict[str, int] = {}
    teacher = models.teacher.backbone
    others = [models.generator.denoiser.backbone] + ([models.fake_score.backbone] if models.fake_score else [])
    shared = (t.weight_dtype == "fp8_e4m3" or t.cpu_offload in OFFLOADS_BACKBONE) and \
        any(_shares_tensors(teacher, o) for o in others)
    if shared:   # fp8 or offload would change (or move away) the base the trainable adapters sit on
        what = "teacher.weight_dtype: fp8_e4m3" if t.weight_dtype == "fp8_e4m3" else f"teacher.cpu_offload: {t.cpu_offload}"
        raise SenseflowError(f"{what} needs a teacher of its own, but the teacher shares its base weights with the "
                             "generator / fake score (LoRA shared base): set generator.lora.shared_base: false and "
                             "fake_score.lora.shared_base: false, or drop the setting")
    if t.weight_dtype == "fp8_e4m3":
        from .fp8 import quantize_linears
        done["fp8_linears"] = quantize_linears(teacher)
    if t.cpu_offload in OFFLOADS_BACKBONE:
        from .offload import offload_module
        offload_module(teacher, device, offload_buffers=True)
        done["offloaded_backbone"] = 1
    if t.cpu_offload in OFFLOADS_TEXT:
        from .offload import offload_text_encoders
        encoders = getattr(models.teacher.adapter, "text_encoders", lambda: [])()
        done["offloaded_text_encoders"] = offload_text_encoders(encoders, device)
    return done


__all__ = ["apply_teacher_storage", "check_teacher_storage"]
