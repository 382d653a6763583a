"""Tiny random models of the real transformers classes the evaluation metrics load, saved as folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.tiny_models import make_clip_tokenizer


def make_tiny_clip_folder(path: str | Path, *, image_size: int = 32, projection_dim: int = 16, seed: int = 0,
                          preprocessor: bool = True, logit_scale: float | None = None,
                          hidden_act: str = "quick_gelu") -> Path:
    """A ``CLIPModel`` (ViT vision tower, causal text tower) + ``CLIPTokenizer`` (+ preprocessor_config.json)."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tok = make_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act=hidden_act)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, hidden_act=hidden_act)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps({
            "size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return path


def make_tiny_owlv2_folder(path: str | Path, *, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """An ``Owlv2ForObjectDetection`` (CLIP-like towers + box/class heads) with a 16-token ``CLIPTokenizer``."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    path = Path(path)
    tok = make_clip_tokenizer(model_max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).eval() \
        .save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
