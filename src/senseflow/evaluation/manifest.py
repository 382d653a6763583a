"""``manifest.json``: everything needed to say exactly what an evaluation number was computed from.

Prompt list and file hashes, every seed, the resolution and resize rules, the sha256 of every metric
weight file (:meth:`Metric.weight_files`), each source's settings and fingerprint, package versions,
the command line, the number of processes and the device.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

import torch

from .metrics.base import sha256_file

PACKAGES = ("senseflow", "torch", "diffusers", "transformers", "torchmetrics", "scipy", "numpy", "pillow",
            "safetensors", "accelerate")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def weight_hashes(metrics: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{metric: {path: sha256}}`` for every weight file each metric read."""
    return {name: {str(p): sha256_file(p) for p in m.weight_files()} for name, m in metrics.items()}


def build_manifest(plan, metrics: dict[str, Any], world_size: int, device: torch.device) -> dict[str, Any]:
    prompts = plan.prompts
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(plan.command),
        "protocol": plan.protocol,
        "prompts": {"source": prompts.source, "file_sha256": prompts.file_sha256, "list_sha256": prompts.sha256,
                    "count": len(prompts), "per_prompt": prompts.per_prompt},
        "seeds": {"base_seed": prompts.base_seed, "rule": "senseflow.generate.image_seed(base_seed, index)",
                  "values": list(prompts.seeds)},
        "real_images": {"count": len(prompts.real_images), "resize": plan.real_size,
                        "rule": "centre crop to a square, PIL LANCZOS resize to resize x resize (coco.load_real_image)"
                                if plan.real_size else "native size"},
        "sources": {s.label: s.settings() for s in plan.all_sources},
        "resolution": {s.label: s.settings().get("resolution") or s.settings().get("call", {}).get("height")
                       for s in plan.all_sources},
        "metrics": {spec.name: {"weights": spec.weights, "options": spec.options} for spec in plan.metrics},
        "weights_sha256": weight_hashes(metrics),
        "packages": package_versions(),
        "python": platform.python_version(),
        "world_size": world_size,
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
