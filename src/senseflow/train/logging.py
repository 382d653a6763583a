"""Run logging: TensorBoard scalars and images, plus a plain ``metrics.jsonl`` anyone can plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from ..images import save_png


def as_float(value: Tensor | float | int) -> float:
    return float(value.detach().float().mean().item()) if isinstance(value, Tensor) else float(value)


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import
            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, Tensor | float]) -> dict[str, float]:
        flat = {k: as_float(v) for k, v in values.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}}) + "\n")
        if self.writer is not None:
            for k, v in flat.items():
                self.writer.add_scalar(k, v, step)
        return flat

    def image(self, step: int, tag: str, grid: np.ndarray) -> Path:
        path = self.run_dir / "samples" / f"{tag}_{step:08d}.png"
        save_png(grid, path)
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")
        return path

    def latents(self, step: int, tag: str, latents: Tensor, prompts: list[str]) -> Path:
        """Raw samples of a model whose outputs are not pictures: ``samples/<tag>_<step>.safetensors``.

        ``latents`` ``[B, *latent_shape]`` float32, the prompts in the file's metadata (JSON list).
        """
        import os

        from safetensors.torch import save_file

        path = self.run_dir / "samples" / f"{tag}_{step:08d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"prompts": json.dumps(list(prompts)), "step": str(step)})
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
