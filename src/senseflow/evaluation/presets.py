"""Protocol presets: every choice behind a paper's table, named, so a number says how it was made.

Sources of the settings (read, not copied):

* ``senseflow-coco5k`` -- SenseFlow paper, Sec. 4.1: "COCO 2017 validation set, which contains 5,000
  images. Each image in this set is paired with the text annotation that yields the highest CLIP
  Score (ViT-B/32)"; metrics FID-T and Patch FID-T (student vs the teacher's images), CLIP score
  (ViT-B/32), HPSv2, PickScore, ImageReward; the teacher rows of Tab. 1 use 100 NFE for SD 3.5 Large,
  80 for SDXL and 50 for FLUX.1 dev.
* ``dmd2-coco10k`` -- DMD2 ``experiments/sdxl/README.md`` + ``main/sdxl/test_folder_sdxl.py`` +
  ``main/coco_eval/coco_evaluator.py``: 10K COCO-2014 validation images with one caption each
  (``--total_eval_samples 10000``), FID against those real images after ``CenterCropLongEdge`` +
  LANCZOS resize to ``--eval_res 512``, patch FID (299x299 centre crops at full resolution), CLIP score
  with open_clip ViT-g/14 (laion2b_s12b_b42k) and the prompt prefix "A photo depicts ".
* ``sid-coco10k`` -- SiD-DiT paper, Sec. 5: "FID and CLIP computed on the 10k COCO-2014 validation
  subset employed by DMD2"; the CLIP model and prefix are not stated: we use DMD2's (a stated assumption).

Where a paper leaves a choice open (the teacher's CFG scale, DMD2's exact 10K subset, seeds) the
preset fixes one and ``docs/evaluation.md`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..teachers.base import SenseflowError


@dataclass(frozen=True)
class PresetMetric:
    name: str
    expects: str                                  # the weights a user must pass (--weights NAME=PATH)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    coco_split: str                               # the COCO split whose annotations/images are expected
    num_images: int
    caption: str                                  # "best-clip" | "first"
    metrics: tuple[PresetMetric, ...]
    selection_seed: int = 0                       # which images when num_images < the split
    seed: int = 0                                 # base seed of the (prompt, seed) pairs
    real_size: int | None = None                  # real images: centre crop + resize (None: no real images)
    real_resample: str = "lanczos"
    #: family -> (Euler steps, CFG or embedded guidance) of the teacher reference
    teacher: dict[str, tuple[int, float]] = field(default_factory=dict)
    notes: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "coco_split": self.coco_split,
                "num_images": self.num_images, "caption": self.caption, "selection_seed": self.selection_seed,
                "seed": self.seed, "real_size": self.real_size, "real_resample": self.real_resample,
                "metrics": [{"name": m.name, "expects": m.expects, "options": m.options} for m in self.metrics],
                "teacher": {k: {"steps": s, "guidance": g} for k, (s, g) in self.teacher.items()},
                "notes": self.notes}


INCEPTION = "TF-Inception 2015-12-05: inception-2015-12-05.pt (TorchScript) or pt_inception-2015-12-05-6726825d.pth"
CLIP_B32 = "CLIP ViT-B/32 transformers folder (openai/clip-vit-base-patch32)"
CLIP_G14 = "CLIP ViT-g/14 transformers folder (laion/CLIP-ViT-g-14-laion2B-s12B-b42K)"
#: SenseFlow Tab. 1 teacher NFE: SD 3.5 Large 100 (50 steps x CFG), SDXL 80 (40 x CFG), FLUX.1 dev 50 (embedded)
PAPER_TEACHERS = {"sd3": (50, 3.5), "sdxl": (40, 6.0), "flux": (50, 3.5), "sana": (20, 4.5), "toy": (32, 3.0)}

PRESETS: dict[str, Preset] = {
    "senseflow-coco5k": Preset(
        name="senseflow-coco5k",
        description="SenseFlow Tab. 1: COCO-2017 val 5K, best CLIP-B/32 caption per image; FID-T / Patch FID-T vs "
                    "the teacher at the paper's NFE, CLIP-B/32, HPSv2, PickScore, ImageReward",
        coco_split="val2017", num_images=5000, caption="best-clip",
        metrics=(PresetMetric("fid_t", INCEPTION), PresetMetric("clip_score", CLIP_B32),
                 PresetMetric("hps", "HPSv2 / v2.1 as a transformers CLIPModel folder (senseflow convert-weights hps)"),
                 PresetMetric("pickscore", "PickScore_v1 transformers CLIPModel folder (yuvalkirstain/PickScore_v1)"),
                 PresetMetric("image_reward", "ImageReward folder (senseflow convert-weights image-reward)")),
        teacher=dict(PAPER_TEACHERS),
        notes="teacher CFG is not stated in the paper: SD3.5 3.5 (its model card), SDXL 6 (DMD2's SDXL teacher "
              "evaluation), FLUX embedded 3.5"),
    "dmd2-coco10k": Preset(
        name="dmd2-coco10k",
        description="DMD2 SDXL: COCO-2014 val 10K, one caption per image; FID vs real (512 px, LANCZOS) + patch FID, "
                    "CLIP ViT-g/14 with prefix 'A photo depicts '",
        coco_split="val2014", num_images=10000, caption="first", selection_seed=0, seed=10,
        real_size=512, real_resample="lanczos",
        metrics=(PresetMetric("fid", INCEPTION),
                 PresetMetric("clip_score", CLIP_G14, {"prefix": "A photo depicts "})),
        notes="DMD2 evaluates a fixed, separately downloaded 10K subset (coco10k/subset + all_prompts.pkl); this "
              "preset draws 10K images of the user's val2014 with selection_seed 0 and takes each image's first "
              "caption: same protocol, not the same images"),
    "sid-coco10k": Preset(
        name="sid-coco10k",
        description="SiD-DiT Tab. 1-2: the DMD2 COCO-2014 10K protocol, FID vs real + CLIP",
        coco_split="val2014", num_images=10000, caption="first", selection_seed=0, seed=10,
        real_size=512, real_resample="lanczos",
        metrics=(PresetMetric("fid", INCEPTION),
                 PresetMetric("clip_score", CLIP_G14, {"prefix": "A photo depicts "})),
        notes="SiD-DiT names DMD2's subset but not its CLIP model or prefix: DMD2's are assumed; GenEval is a "
              "separate benchmark (see the compositional metric, which is not GenEval)"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SenseflowError(f"unknown --preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
