"""The toy DINOv2: a small ``transformers.Dinov2Model`` pretrained on procedural images, label-free.

SenseFlow's discriminator judges images through a *frozen, pretrained* DINOv2.  No pretrained
DINOv2 reaches this machine, so the toy world ships its own: the DINOv2 architecture (the very
``Dinov2Model`` class the real discriminator loads) at toy scale -- patch 4 on 32x32 RGB (an 8x8
token grid, the toy teacher's grid), 6 blocks of width 96, 3 heads, ~0.68M parameters, 2.7 MB of
float32 safetensors -- shipped in ``src/senseflow/assets/toy/dinov2/`` and named
``builtin:toy-dinov2`` in a ``discriminator:`` section.

Objective: SimMIM-style masked image modelling.  Half of the 8x8 tokens are replaced by DINOv2's
own mask token (``bool_masked_pos``); a linear decoder reads each masked token's final hidden state
and predicts that patch's 4x4x3 pixels; the loss is the squared error on the masked patches.  Why:

* it is NOT the evaluator's objective: no labels, no captions, no scene attributes, nothing from
  :mod:`senseflow.toy.evaluator` -- only the pixels of ``ToyWorld`` images, from a stream of their own
  (``derive_seed(seed, "toy-dinov2-data")``, disjoint from the teacher's, the distillation data's and
  the evaluator's streams);
* it trains reliably in minutes on one CPU thread: a plain regression loss, no EMA teacher, no
  centring / sharpening, no collapse to watch for (DINO / iBOT self-distillation needs far more
  steps and careful temperatures at this scale);
* filling a hole needs what a discriminator should look at: whether a shape continues into the
  patch, its colour, edge and extent.

Two measured details make it learn within the budget (docs/toy.md):

* *content weighting*: ~80% of the masked patches are plain background, which even a randomly
  initialised ViT with a fitted linear decoder predicts well; with a uniform loss the model sat on
  that plateau (only ~5% below random features after 1500 steps).  Masked patches that match the
  image's median colour (its background; a pixel statistic, no labels) therefore weigh
  ``BACKGROUND_WEIGHT`` = 0.25, patches with content 1;
* MAE's fixed 2-D sine-cosine values initialise the (trainable) position embeddings, so locality is
  there from step 0.

Inputs are preprocessed exactly as :class:`~senseflow.discriminators.vfm.VFMDiscriminator` does at
``input_policy: native`` (``[-1, 1]`` -> ``[0, 1]`` -> ImageNet mean/std, 32x32, no resizing), and half of
every batch goes through the discriminator's own differentiable colour + translation augmentation,
so the frozen backbone has seen the kind of inputs it will judge.  The target is the (augmented)
image in ``[-1, 1]``.

Training is deterministic given the seed and the thread count (weights, decoder, masks,
augmentation and data come from seeded generators) and writes its folder atomically.
``senseflow toy train-backbone --out DIR --steps N --seed S`` writes ``DIR/config.json`` +
``DIR/model.safetensors`` (a plain ``Dinov2Model`` folder), ``DIR/mim_decoder.safetensors`` (the
decoder, so the masked-prediction loss can be measured later) and ``DIR/training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..rng import derive_seed

IMAGE_SIZE = 32
BACKBONE_ASSET = Path(__file__).resolve().parent.parent / "assets" / "toy" / "dinov2"
DECODER_FILE = "mim_decoder.safetensors"
MASK_RATIO = 0.5
#: loss weight of a masked patch that is plain background (matches the image's median colour)
BACKGROUND_WEIGHT = 0.25
#: a patch "has content" when some pixel differs from the image's median colour by more than this ([-1, 1] units)
CONTENT_THRESHOLD = 0.1


# -------------------------------------------------------------------------------------------------
# architecture
# -------------------------------------------------------------------------------------------------
def backbone_config(hidden_size: int = 96, num_layers: int = 6, num_heads: int = 3, patch_size: int = 4):
    """The toy ``Dinov2Config`` (defaults = the shipped backbone)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        mlp_ratio=4, image_size=IMAGE_SIZE, patch_size=patch_size, layerscale_value=1.0,
                        drop_path_rate=0.0, use_mask_token=True)


def sincos_position_embedding(dim: int, grid: int) -> Tensor:
    """MAE's 2-D sine-cosine position embedding ``[grid * grid, dim]`` (row-major; half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([axis(ys), axis(xs)], dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def create_backbone(seed: int = 0, **arch: Any) -> nn.Module:
    """A freshly initialised toy ``Dinov2Model`` (deterministic in ``seed``; sine-cosine position init)."""
    from transformers import Dinov2Model

    torch.manual_seed(derive_seed(seed, "toy-dinov2-init") % (2 ** 31))
    model = Dinov2Model(backbone_config(**arch))
    with torch.no_grad():
        pos = model.embeddings.position_embeddings
        pos[0, 0] = 0.0
        pos[0, 1:] = sincos_position_embedding(pos.shape[-1], int(round(math.sqrt(pos.shape[1] - 1))))
    return model


class MIMDecoder(nn.Module):
    """SimMIM's light decoder: one linear map from a token's hidden state to its patch's pixels."""

    def __init__(self, hidden_size: int, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.proj = nn.Linear(hidden_size, patch_size * patch_size * channels)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)


def create_decoder(config, seed: int = 0) -> MIMDecoder:
    torch.manual_seed(derive_seed(seed, "toy-dinov2-decoder") % (2 ** 31))
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return MIMDecoder(int(config.hidden_size), int(patch), int(config.num_channels))


# -------------------------------------------------------------------------------------------------
# the objective
# -------------------------------------------------------------------------------------------------
def preprocess(images: Tensor) -> Tensor:
    """``[-1, 1]`` images -> DINOv2 pixel values, as the VFM discriminator does at native size."""
    from ..discriminators.vfm import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images + 1.0) / 2.0 - mean) / std


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]`` in DINOv2's token order (row-major)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_mask(n: int, tokens: int, generator: torch.Generator, ratio: float = MASK_RATIO) -> Tensor:
    """``[n, tokens]`` booleans with exactly ``round(ratio * tokens)`` hidden tokens per image."""
    k = max(1, round(ratio * tokens))
    chosen = torch.rand(n, tokens, generator=generator).argsort(dim=1)[:, :k]
    return torch.zeros(n, tokens, dtype=torch.bool).scatter_(1, chosen, True)


def patch_weights(images: Tensor, patch: int, background_weight: float = BACKGROUND_WEIGHT) -> Tensor:
    """``[B, N]``: 1 for patches with content, ``background_weight`` for patches of the image's median colour."""
    median = images.flatten(2).median(dim=2).values                              # [B, C]
    target = patchify(images, patch).unflatten(-1, (patch * patch, images.shape[1]))
    content = (target - median[:, None, None, :]).abs().amax(dim=(2, 3)) > CONTENT_THRESHOLD
    return torch.where(content, 1.0, background_weight)


def masked_prediction_loss(model: nn.Module, decoder: MIMDecoder, images: Tensor, mask: Tensor,
                           background_weight: float = BACKGROUND_WEIGHT) -> Tensor:
    """The pretraining loss: content-weighted mean squared pixel error on the masked patches (images in ``[-1, 1]``).

    ``background_weight=1`` gives plain SimMIM (uniform MSE over the masked patches).
    """
    hidden = model(pixel_values=preprocess(images), bool_masked_pos=mask).last_hidden_state[:, 1:]
    pred = decoder(hidden).float()
    target = patchify(images, decoder.patch_size).float()
    weights = patch_weights(images, decoder.patch_size, background_weight) * mask
    return ((pred - target).pow(2).mean(dim=-1) * weights).sum() / weights.sum().clamp_min(1e-8)


def augment_half(images: Tensor, generator: torch.Generator) -> Tensor:
    """The discriminator's colour + translation augmentation on the second half of the batch."""
    from ..discriminators.augment import diff_augment

    half = images.shape[0] // 2
    if half == 0:
        return images
    return torch.cat([images[:half], diff_augment(images[half:], ["color", "translation"], generator=generator)])


def fresh_batch(world_seed: int, n: int, mask_seed: int = 0, patch: int = 4) -> tuple[Tensor, Tensor]:
    """``n`` un-augmented images of ``ToyWorld(world_seed)`` and fixed masks (for held-out measurements)."""
    from .world import ToyWorld

    images, _, _ = ToyWorld(world_seed).batch(n, 0)
    tokens = (images.shape[-2] // patch) * (images.shape[-1] // patch)
    return images, random_mask(n, tokens, torch.Generator().manual_seed(mask_seed))


@torch.no_grad()
def heldout_loss(model: nn.Module, decoder: MIMDecoder, world_seed: int, n: int = 256,
                 background_weight: float = BACKGROUND_WEIGHT) -> float:
    images, mask = fresh_batch(world_seed, n, patch=decoder.patch_size)
    was = model.training
    model.eval()
    loss = masked_prediction_loss(model, decoder, images, mask, background_weight).item()
    model.train(was)
    return loss


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------
def train_backbone(steps: int, seed: int = 0, batch_size: int = 64, lr: float = 1.5e-3, warmup: int = 100,
                   weight_decay: float = 0.05, progress: bool = True,
                   **arch: Any) -> tuple[nn.Module, MIMDecoder, dict]:
    """Masked-image-modelling pretraining (AdamW, warm-up + cosine); returns ``(model, decoder, info)``."""
    from .world import ToyWorld

    model = create_backbone(seed, **arch).train()
    decoder = create_decoder(model.config, seed).train()
    tokens = (IMAGE_SIZE // decoder.patch_size) ** 2
    params = list(model.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999))
    world = ToyWorld(seed=derive_seed(seed, "toy-dinov2-data") % (2 ** 31))
    g_mask = torch.Generator().manual_seed(derive_seed(seed, "toy-dinov2-masks"))
    g_aug = torch.Generator().manual_seed(derive_seed(seed, "toy-dinov2-augment"))
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), total=steps, desc="toy dinov2", disable=not progress)
    for step in bar:
        images, _, _ = world.batch(batch_size, step)
        images = augment_half(images, g_aug)
        loss = masked_prediction_loss(model, decoder, images, random_mask(batch_size, tokens, g_mask))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    seconds = time.perf_counter() - t0
    tail = losses[-100:]
    return model.eval(), decoder.eval(), {"final_loss": sum(tail) / max(1, len(tail)), "seconds": seconds}


def save_backbone(model: nn.Module, decoder: MIMDecoder, out: str | os.PathLike, record: dict) -> Path:
    """Write ``out`` atomically: a temp sibling folder, then one rename (an existing ``out`` is replaced)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()}, str(tmp / DECODER_FILE))
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_backbone(folder: str | os.PathLike = BACKBONE_ASSET) -> tuple[nn.Module, MIMDecoder]:
    """``(Dinov2Model, MIMDecoder)`` from a folder written by :func:`save_backbone` (eval mode)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval()
    decoder = create_decoder(model.config)
    decoder.load_state_dict(load_file(str(Path(folder) / DECODER_FILE)))
    return model, decoder.eval()


# -------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; replaced if it exists)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    command = (f"senseflow toy train-backbone --out {shlex.quote(str(args.out))} --steps {args.steps} "
               f"--batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}")
    model, decoder, info = train_backbone(args.steps, args.seed, args.batch_size, args.lr)
    heldout_seed = derive_seed(args.seed, "toy-dinov2-heldout") % (2 ** 31)
    record = {
        "command": command, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "objective": f"SimMIM masked pixel prediction: squared error on the masked 4x4 patches (mask ratio "
                     f"{MASK_RATIO}, background patches weighted {BACKGROUND_WEIGHT}); linear decoder in "
                     f"{DECODER_FILE}",
        "data": "ToyWorld(derive_seed(seed, 'toy-dinov2-data')) images only, half of each batch colour+translation "
                "augmented",
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "final_loss": info["final_loss"],
        "heldout_world_seed": heldout_seed,
        "heldout_loss": heldout_loss(model, decoder, heldout_seed),
        "heldout_mse": heldout_loss(model, decoder, heldout_seed, background_weight=1.0),
        "seconds": round(info["seconds"], 1),
    }
    save_backbone(model, decoder, args.out, record)
    print(json.dumps(record))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="senseflow toy train-backbone",
                                description="Pretrain the toy DINOv2 (masked image modelling on procedural images).")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
