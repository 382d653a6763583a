"""The official ``ImageReward.pt`` -> transformers ``BlipForImageTextRetrieval`` folder + its MLP head.

``ImageReward.pt`` (huggingface.co/THUDM/ImageReward) is the state dict of ``ImageReward.ImageReward``:
``blip.visual_encoder`` (BLIP's timm-style ViT-L/16), ``blip.text_encoder`` (BLIP's "med" BERT with a
cross-attention block in every layer, no pooler), ``blip.vision_proj`` / ``blip.text_proj`` and
``mlp.layers.*``.  transformers' BLIP classes are the same network under other names for the ViT
(``blocks.i.attn.qkv`` -> ``encoder.layers.i.self_attn.qkv`` ...) and the same names for the BERT, so
the conversion is a rename.  ``itm_head`` (in transformers' class, not in ImageReward) is written as
zeros -- the score never uses it; ``senseflow_convert.json`` says so.  The score's normalisation
(``ImageReward.py``: ``self.mean = 0.16717362830052426``, ``self.std = 1.0333394966054072``, prompts
padded/truncated to 35 BERT tokens, 224 px) is written to ``image_reward.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ...teachers.base import SenseflowError
from ..metrics.mlp_head import mlp_keys
from .common import check_complete, prepare_out, read_official, source_meta, write_atomic

WHAT = "convert-weights image-reward"
SOURCE = "ImageReward.pt from huggingface.co/THUDM/ImageReward (the state dict of ImageReward.ImageReward)"
TOKENIZER_NEEDS = "bert-base-uncased's vocab.txt (huggingface.co/google-bert/bert-base-uncased)"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
IGNORED = ("blip.text_encoder.embeddings.position_ids",)  # a persistent buffer in BLIP's med.py

_VIT = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def blip_config(state: dict[str, Tensor]):
    from transformers import BlipConfig

    try:
        vw = state["blip.visual_encoder.cls_token"].shape[-1]
        patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        grid = int(round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        v_mlp = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        vocab, tw = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape
        positions = state["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        t_mlp = state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
        cross = state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1]
        proj = state["blip.vision_proj.weight"].shape[0]
    except KeyError as exc:
        raise SenseflowError(f"{WHAT}: the checkpoint lacks {exc.args[0]}; expected {SOURCE}") from None
    vision = dict(hidden_size=vw, intermediate_size=v_mlp, num_attention_heads=max(1, vw // 64),
                  num_hidden_layers=_count(state, r"blip\.visual_encoder\.blocks\.(\d+)\."),
                  image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=t_mlp, num_attention_heads=max(1, tw // 64),
                num_hidden_layers=_count(state, r"blip\.text_encoder\.encoder\.layer\.(\d+)\."),
                max_position_embeddings=positions, encoder_hidden_size=cross, layer_norm_eps=1e-12,
                hidden_act="gelu", pad_token_id=0, bos_token_id=vocab - 2, sep_token_id=102)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=proj)


def map_image_reward(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """ImageReward names -> (BlipForImageTextRetrieval weights, MLP weights, keys not understood)."""
    blip: dict[str, Tensor] = {}
    mlp: dict[str, Tensor] = {}
    unused: list[str] = []
    simple = {
        "blip.visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "blip.visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
        "blip.visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
        "blip.visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
    }
    vit = re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
    mlp_names = set(mlp_keys("mlp."))
    for key, value in state.items():
        if key in IGNORED:
            continue
        if key in simple:
            blip[simple[key]] = value
        elif (m := vit.match(key)) and m.group(2) in _VIT:
            blip[f"vision_model.encoder.layers.{m.group(1)}.{_VIT[m.group(2)]}.{m.group(3)}"] = value
        elif key.startswith("blip.text_encoder."):
            blip["text_encoder." + key[len("blip.text_encoder."):]] = value
        elif key.startswith(("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")):
            blip[key[len("blip."):]] = value
        elif key in mlp_names:
            mlp[key[len("mlp."):]] = value
        else:
            unused.append(key)
    return blip, mlp, unused


def _tokenizer(folder: str | Path | None, vocab: int):
    """bert-base-uncased + BLIP's ``init_tokenizer`` additions ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer

    if folder is None or not (Path(folder) / "vocab.txt").is_file():
        raise SenseflowError(f"{WHAT}: --tokenizer must be a folder with {TOKENIZER_NEEDS}")
    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != vocab:
        raise SenseflowError(f"{WHAT}: the tokenizer in {folder} has {len(tok)} tokens with BLIP's [DEC]/[ENC], the "
                             f"checkpoint {vocab}; expected {TOKENIZER_NEEDS}")
    return tok


def convert_image_reward(src: str | Path, out: str | Path, *, tokenizer: str | Path | None,
                         overwrite: bool = False) -> Path:
    """Validate everything, then write ``out`` (BLIP folder, mlp.safetensors, image_reward.json, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import BlipForImageTextRetrieval

    src = Path(src)
    if not src.is_file():
        raise SenseflowError(f"{WHAT}: {src} is not a file; expected {SOURCE}")
    out = prepare_out(out, overwrite, WHAT)
    state = read_official(src, WHAT, SOURCE)
    config = blip_config(state)
    tok = _tokenizer(tokenizer, config.text_config.vocab_size)
    with torch.device("meta"):
        expected = BlipForImageTextRetrieval(config).state_dict()
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    blip, mlp, unused = map_image_reward(state)
    if "itm_head.weight" not in blip:  # ImageReward's BLIP has no ITM head; zeros are written instead
        expected = {k: v for k, v in expected.items() if not k.startswith("itm_head.")}
    check_complete(blip, expected, unused, WHAT, src)
    missing_mlp = [k for k in mlp_keys() if k not in mlp]
    if missing_mlp:
        raise SenseflowError(f"{WHAT}: {src} lacks the reward head mlp.{missing_mlp[0]} (and {len(missing_mlp) - 1} "
                             f"more); expected {SOURCE}")
    model = BlipForImageTextRetrieval(config)
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()
    model.load_state_dict(blip, strict=False)  # every other key was checked above
    model.eval()
    itm = ("from the checkpoint" if "itm_head.weight" in blip
           else "zeros: not in ImageReward.pt, never used by the score")

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in mlp.items()}, str(folder / "mlp.safetensors"))
        tok.save_pretrained(str(folder))
        (folder / "image_reward.json").write_text(json.dumps(
            {"mean": REWARD_MEAN, "std": REWARD_STD, "max_length": MAX_LENGTH,
             "image_size": int(config.vision_config.image_size)}, indent=2) + "\n")

    meta = source_meta(src, "image_reward", itm_head=itm)
    return write_atomic(out, write, meta)
