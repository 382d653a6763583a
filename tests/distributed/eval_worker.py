"""Run under ``torchrun --nproc_per_node=2`` (or plainly, for the single-process reference): one evaluation.

Usage: eval_worker.py OUT CACHE STUDENT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from senseflow.evaluation.backends import MetricSpec  # noqa: E402
from senseflow.evaluation.promptset import expand  # noqa: E402
from senseflow.evaluation.runner import EvalPlan, evaluate  # noqa: E402
from senseflow.evaluation.sources import StudentSource  # noqa: E402
from tests.helpers.eval_fakes import MeanMetric, OrderMetric, SeedSource  # noqa: E402

PROMPTS = ["a red circle at the top left on a white background", "a blue square in the center on a black background",
           "a green triangle at the bottom right on a gray background"]


def main(out: str, cache: str, student: str) -> None:
    teacher = SeedSource("teacher", offset=3, cached=True, size=32)     # the toy student's resolution
    fake = SeedSource("fake", size=32)
    toy = StudentSource(student, label="toy", steps=1)
    metrics = {"mean": MeanMetric(), "order": OrderMetric()}
    plan = EvalPlan(out=Path(out), prompts=expand(PROMPTS, base_seed=1, per_prompt=2, source="test"),
                    sources=[fake, toy], teacher=teacher, metrics=[MetricSpec(n) for n in metrics],
                    prebuilt=metrics, cache_dir=Path(cache), batch_size=1, metric_batch_size=4, device="cpu",
                    progress=False, command=["test"])
    evaluate(plan)
    rank = int(os.environ.get("RANK", "0"))
    (Path(out) / f"rendered-{rank}.json").write_text(json.dumps({"teacher": teacher.rendered, "fake": fake.rendered}))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    from tests.distributed.clean_exit import exit_cleanly
    exit_cleanly()
