"""Official HPSv2 / HPSv2.1 open_clip checkpoints -> a transformers ``CLIPModel`` folder.

``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (huggingface.co/xswu/HPSv2) hold the state dict
of open_clip's ``CLIP`` for ViT-H-14 (``{"state_dict": ...}``).  open_clip packs q/k/v into one
``in_proj_weight`` (``nn.MultiheadAttention``) and stores projections as ``x @ P`` matrices; transformers
has separate ``q_proj/k_proj/v_proj`` and ``nn.Linear`` projections (``P.T``).  Everything else is a
rename.  Sizes are read off the tensors; head counts (not visible in shapes) follow open_clip's model
configs (64-wide text heads; 16 vision heads for ViT-L/H/g, 12 for ViT-B).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ...teachers.base import SenseflowError
from .common import (check_complete, prepare_out, read_official, source_meta, tokenizer_files, write_atomic)

WHAT = "convert-weights hps"
SOURCE = "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt from huggingface.co/xswu/HPSv2 (an open_clip ViT-H-14 state dict)"
TOKENIZER_NEEDS = "the CLIP-H tokenizer, e.g. a copy of huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
IGNORED = ("attn_mask",)  # open_clip's causal-mask buffer (older versions saved it)

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _blocks(state: dict[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def clip_config(state: dict[str, Tensor], hidden_act: str = "gelu"):
    """A ``CLIPConfig`` whose shapes equal the open_clip state dict's."""
    from transformers import CLIPConfig

    try:
        vw = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        tw = state["token_embedding.weight"].shape[1]
        vocab = state["token_embedding.weight"].shape[0]
        context = state["positional_embedding"].shape[0]
        embed = state["text_projection"].shape[1]
        v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise SenseflowError(f"{WHAT}: the checkpoint lacks {exc.args[0]}; expected {SOURCE}") from None
    if vw not in VISION_HEADS or tw % 64:
        raise SenseflowError(f"{WHAT}: unknown open_clip widths (vision {vw}, text {tw}); expected {SOURCE}")
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=t_mlp, num_hidden_layers=_blocks(state, ""),
                num_attention_heads=tw // 64, max_position_embeddings=context, hidden_act=hidden_act,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # open_clip: <start>, <end> are the last ids
    vision = dict(hidden_size=vw, intermediate_size=v_mlp, num_hidden_layers=_blocks(state, "visual."),
                  num_attention_heads=VISION_HEADS[vw], image_size=grid * patch, patch_size=patch,
                  hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def map_open_clip(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip names -> transformers CLIPModel names; returns (mapped, source keys not understood)."""
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    simple = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif (m := block.match(key)) and m.group(3) in _BLOCK:
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.{_BLOCK[m.group(3)]}.{m.group(4)}"] = value
        elif (m := re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)):
            tower = "vision_model" if m.group(1) else "text_model"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{name}.{m.group(3)}"] = part.contiguous()
        elif key.split(".")[-1] in IGNORED:
            continue
        else:
            unused.append(key)
    return out, unused


def convert_hps(src: str | Path, out: str | Path, *, tokenizer: str | Path | None, overwrite: bool = False,
                hidden_act: str = "gelu") -> Path:
    """Validate everything, then write ``out`` (config.json, model.safetensors, tokenizer files)."""
    from transformers import CLIPModel

    src = Path(src)
    if not src.is_file():
        raise SenseflowError(f"{WHAT}: {src} is not a file; expected {SOURCE}")
    out = prepare_out(out, overwrite, WHAT)
    tok_files = tokenizer_files(tokenizer, WHAT, TOKENIZER_NEEDS)
    state = read_official(src, WHAT, SOURCE)
    config = clip_config(state, hidden_act)
    with torch.device("meta"):
        expected = CLIPModel(config).state_dict()
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    mapped, unused = map_open_clip(state)
    check_complete(mapped, expected, unused, WHAT, src)
    model = CLIPModel(config)
    model.load_state_dict(mapped, strict=False)
    model.eval()

    def write(folder: Path) -> None:
        import shutil

        model.save_pretrained(str(folder))
        for f in tok_files:
            shutil.copy2(f, folder / f.name)

    return write_atomic(out, write, source_meta(src, "hps", hidden_act=hidden_act))
