"""Captions and real images from the user's local COCO files (annotation JSON + image folder).

Nothing is downloaded: users get ``annotations/captions_val2017.json`` (or ``captions_val2014.json``)
from ``annotations_trainval2017.zip`` / ``annotations_trainval2014.zip`` and the images from
``val2017.zip`` / ``val2014.zip`` at https://cocodataset.org/#download.

Selections (named in every preset and written to the manifest):

* ``best-clip``: every image of the split with the one of its (usually five) captions that has the
  highest CLIP ViT-B/32 score with the image (SenseFlow's COCO-5K);
* ``first``: each image with its first caption (lowest annotation id);
* images are taken in ascending image id; ``num_images`` smaller than the split draws that many
  with a fixed seed (``random.Random(seed).sample`` of the sorted ids, then sorted again).

Real images for FID are centre-cropped to a square and resized with PIL (DMD2's
``resize_and_center_crop``: ``CenterCropLongEdge`` then ``Image.LANCZOS``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..teachers.base import SenseflowError

COCO_HINT = ("get it from https://cocodataset.org/#download (annotations_trainval2017.zip -> "
             "annotations/captions_val2017.json, val2017.zip -> val2017/)")
RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class CocoImage:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def load_real_image(path: str | os.PathLike, size: int | None, resample: str = "lanczos") -> Tensor:
    """An image file -> uint8 ``[3, H, W]``; with ``size``: centre crop to a square, then resize to ``size``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != size:
                im = im.resize((size, size), RESAMPLE[resample])
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_coco(annotations: str | os.PathLike, images: str | os.PathLike) -> list[CocoImage]:
    """Read a COCO captions JSON and check every listed image is in the folder (one line otherwise)."""
    ann_path, img_dir = Path(annotations), Path(images)
    if not ann_path.is_file():
        raise SenseflowError(f"--coco-annotations {str(annotations)!r} not found: expected a COCO captions JSON "
                             f"(annotations/captions_val2017.json); {COCO_HINT}")
    if not img_dir.is_dir():
        raise SenseflowError(f"--coco-images {str(images)!r} is not a folder: expected the COCO image folder "
                             f"(val2017/ with 000000xxxxxx.jpg); {COCO_HINT}")
    try:
        data = json.loads(ann_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise SenseflowError(f"--coco-annotations {str(annotations)!r} is not valid JSON; {COCO_HINT}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise SenseflowError(f"--coco-annotations {str(annotations)!r} is not a COCO captions file (expected "
                             f"{{'images': [{{id, file_name}}], 'annotations': [{{image_id, caption}}]}}); {COCO_HINT}")
    caps: dict[int, list[tuple[int, str]]] = {}
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise SenseflowError(f"--coco-annotations: annotation {k} has no image_id/caption: is this the captions "
                                 f"file (captions_val2017.json), not instances_*.json?")
        caps.setdefault(int(a["image_id"]), []).append((int(a.get("id", k)), " ".join(a["caption"].split())))
    out = []
    for im in sorted(data["images"], key=lambda x: int(x["id"])):
        iid = int(im["id"])
        if iid not in caps:
            continue
        out.append(CocoImage(iid, img_dir / im["file_name"], tuple(c for _, c in sorted(caps[iid]))))
    if not out:
        raise SenseflowError(f"--coco-annotations {str(annotations)!r} lists no captioned image")
    missing = [x.path for x in out if not x.path.is_file()]
    if missing:
        raise SenseflowError(f"--coco-images {str(images)!r} lacks {len(missing)} of the {len(out)} annotated images "
                             f"(e.g. {missing[0].name}): pass the image folder of the same split as the annotations")
    return out


def select_images(images: Sequence[CocoImage], num: int | None, seed: int) -> list[CocoImage]:
    """All images, or ``num`` of them drawn with ``seed`` (kept in ascending image id)."""
    if num is None or num >= len(images):
        if num is not None and num > len(images):
            raise SenseflowError(f"the protocol needs {num} images but the annotations list {len(images)}: pass the "
                                 f"full split (or --num-prompts {len(images)} for a partial, non-comparable run)")
        return list(images)
    ids = sorted(random.Random(seed).sample(range(len(images)), num))
    return [images[i] for i in ids]


def first_captions(images: Sequence[CocoImage]) -> list[str]:
    return [im.captions[0] for im in images]


@torch.no_grad()
def best_clip_captions(images: Sequence[CocoImage], clip_folder: str | os.PathLike, device: torch.device,
                       batch_size: int = 32, progress: bool = True) -> list[str]:
    """Per image, the caption with the highest CLIP cosine (SenseFlow: ViT-B/32) -- ties: the first.

    Uses the CLIP folder of the ``clip_score`` metric (``transformers`` ``CLIPModel`` +
    ``CLIPProcessor``), projected embeddings, cosine similarity.
    """
    from tqdm.auto import tqdm
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(clip_folder)
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in
                                                         ("preprocessor_config.json", "processor_config.json")):
        raise SenseflowError(f"CLIP folder {str(clip_folder)!r} for the best-caption selection must be a "
                             f"transformers CLIPModel folder (config.json, model.safetensors, preprocessor_config.json, "
                             f"tokenizer files), e.g. `huggingface-cli download openai/clip-vit-base-patch32 "
                             f"--local-dir DIR`")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    chosen: list[str] = []
    for b in tqdm(range(0, len(images), batch_size), desc="best CLIP caption", disable=not progress):
        chunk = images[b:b + batch_size]
        pils = []
        for im in chunk:
            with Image.open(im.path) as pil:
                pils.append(pil.convert("RGB"))
        pix = processor(images=pils, return_tensors="pt")["pixel_values"].to(device)
        img = _embed(model.get_image_features(pixel_values=pix))
        texts = [c for im in chunk for c in im.captions]
        tok = processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(device)
        txt = _embed(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        k = 0
        for j, im in enumerate(chunk):
            sims = txt[k:k + len(im.captions)] @ img[j]
            chosen.append(im.captions[int(torch.argmax(sims))])
            k += len(im.captions)
    return chosen


def _embed(out) -> Tensor:
    """Projected embedding, L2-normalised (transformers 5 returns a ModelOutput with ``pooler_output``)."""
    x = out if isinstance(out, Tensor) else out.pooler_output
    return torch.nn.functional.normalize(x.float(), dim=-1)
