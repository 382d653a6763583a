"""A tiny random Qwen-Image diffusers folder of the REAL classes (``QwenImagePipeline.from_pretrained`` runs it).

Layout as ``Qwen/Qwen-Image``: ``tokenizer`` (``Qwen2Tokenizer``, byte-level BPE built in memory with
the chat template's special tokens), ``text_encoder`` (``Qwen2_5_VLForConditionalGeneration`` from a
tiny config, vision tower included), ``vae`` (``AutoencoderKLQwenImage``: 5-D video latents with a
frame axis, per-channel ``latents_mean`` / ``latents_std``; one spatial downsampling here, so 2 px per
latent), ``transformer`` (``QwenImageTransformer2DModel``, ``in_channels = 4 z_dim`` for the 2x2
packing) and the released model's ``FlowMatchEulerDiscreteScheduler`` settings with small sequence
lengths (:data:`TINY_QWENIMAGE_SCHEDULER`) so that ``mu`` varies at tiny resolutions.

Everything is built offline; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .byte_bpe import add_chain_merges, bytes_to_unicode
from .tiny_models import WORDS, TinyFolder, write_flow_scheduler, write_model_index

#: the special tokens QwenImagePipeline's prompt template uses (plus Qwen's end of text / pad token)
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: QwenImagePipeline.prompt_template_encode (diffusers 0.42), written out here to build the tokenizer's merges
TEMPLATE_WORDS: tuple[str, ...] = (
    "system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape", "size",
    "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background")
#: Qwen/Qwen-Image scheduler/scheduler_config.json's shift settings, with base/max sequence lengths for tiny
#: images; its ``shift_terminal: 0.02`` is left out (it turns the stock pipeline's ``sigmas=[1.0]`` into NaN:
#: pass ``scheduler={**TINY_QWENIMAGE_SCHEDULER, "shift_terminal": 0.02}`` for the released layout)
TINY_QWENIMAGE_SCHEDULER: dict[str, Any] = {"base_image_seq_len": 16, "max_image_seq_len": 256, "base_shift": 0.5,
                                            "max_shift": 0.9, "time_shift_type": "exponential"}
#: tiny VAE latent statistics (the real VAE has 16 channels with its own values)
TINY_LATENTS_MEAN: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075)
TINY_LATENTS_STD: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558)


def make_qwen2_tokenizer(words: Sequence[str] = WORDS, model_max_length: int = 32768):
    """A byte-level BPE ``Qwen2Tokenizer``: all 256 byte symbols, whole-word merges (with and without the
    leading-space symbol ``Ġ``) for ``words`` and the template's words, and the special tokens.

    With these merges the template prefix ``<|im_start|>system ... <|im_start|>user\\n`` is exactly 34
    tokens, as with the real tokenizer (``prompt_template_encode_start_idx = 34``).
    """
    from transformers import Qwen2Tokenizer

    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    table = bytes_to_unicode()
    for b in range(256):
        vocab.setdefault(table[b], len(vocab))
    merges: list[tuple[str, str]] = []
    pieces = [p for w in dict.fromkeys([*TEMPLATE_WORDS, *words]) for p in (w, "\u0120" + w) if len(p) > 1]
    for piece in pieces:
        add_chain_merges(piece, vocab, merges)
    for _ in range(8):             # chains cut by another word's earlier merge: join the pieces with later merges
        model = BPE(vocab=dict(vocab), merges=list(merges))
        broken = [[t.value for t in model.tokenize(p)] for p in pieces]
        broken = [parts for parts in broken if len(parts) > 1]
        if not broken:
            break
        for parts in broken:
            add_chain_merges(parts, vocab, merges)
    for tok in SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def make_qwen25vl_encoder(tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                          num_kv_heads: int = 1, seed: int = 0):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (the class Qwen-Image's text_encoder/ holds), from a config.

    The text model's rotary embedding is Qwen2.5-VL's multimodal RoPE (``mrope_section`` sums to half a
    head); the vision tower is tiny too (it is never called for text-only prompts, as in the pipeline).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    n = len(tokenizer)
    cfg = Qwen2_5_VLConfig(
        text_config={"vocab_size": n + 4, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
                     "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                     "num_key_value_heads": num_kv_heads, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                     "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0]},
        image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2, vision_end_token_id=n + 3,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def make_qwenimage_vae(z_dim: int = 4, base_dim: int = 8, seed: int = 0,
                       latents_mean: Sequence[float] = TINY_LATENTS_MEAN,
                       latents_std: Sequence[float] = TINY_LATENTS_STD):
    """A tiny ``AutoencoderKLQwenImage`` (one spatial downsampling: 2 px per latent; pipeline vae_scale_factor 2)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], latents_mean=list(latents_mean),
                                  latents_std=list(latents_std)).eval()


def make_qwenimage_transformer(in_channels: int = 16, out_channels: int = 4, joint_attention_dim: int = 32,
                               num_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                               axes_dims_rope: Sequence[int] = (4, 6, 6), seed: int = 0, **extra: Any):
    """A tiny ``QwenImageTransformer2DModel`` (``patch_size=2``: the pipeline packs 2x2 latent patches itself)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=joint_attention_dim,
        axes_dims_rope=tuple(axes_dims_rope), **extra).eval()


def make_tiny_qwenimage_folder(path: str | Path, *, text_hidden: int = 32, z_dim: int = 4,
                               joint_attention_dim: int | None = None, in_channels: int | None = None,
                               num_layers: int = 2, scheduler: dict[str, Any] | None = None, seed: int = 0,
                               write_index: bool = True, **transformer_extra: Any) -> TinyFolder:
    """Build a tiny Qwen-Image diffusers folder at ``path`` (see module docstring).

    ``joint_attention_dim`` / ``in_channels`` default to the consistent values (the text encoder's
    width, 4 x the VAE's ``z_dim``); pass others to build deliberately inconsistent folders.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None, scheduler_shift=1.0)

    tok = make_qwen2_tokenizer()
    enc = make_qwen25vl_encoder(tok, hidden_size=text_hidden, seed=next(seeds))
    tok.save_pretrained(str(path / "tokenizer"))
    enc.save_pretrained(str(path / "text_encoder"))
    out.text_encoders["text_encoder"], out.tokenizers["tokenizer"] = enc, tok

    vae = make_qwenimage_vae(z_dim=z_dim, seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    out.vae = vae

    tr = make_qwenimage_transformer(
        in_channels=in_channels if in_channels is not None else 4 * z_dim, out_channels=z_dim,
        joint_attention_dim=joint_attention_dim if joint_attention_dim is not None else text_hidden,
        num_layers=num_layers, seed=next(seeds), **transformer_extra)
    tr.save_pretrained(str(path / "transformer"))
    out.transformer = tr

    sched = dict(TINY_QWENIMAGE_SCHEDULER if scheduler is None else scheduler)
    write_flow_scheduler(path, shift=1.0, use_dynamic_shifting=True, **sched)
    if write_index:
        write_model_index(path, "QwenImagePipeline", {
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
            "tokenizer": ("transformers", "Qwen2Tokenizer"),
            "transformer": ("diffusers", "QwenImageTransformer2DModel"),
            "vae": ("diffusers", "AutoencoderKLQwenImage")})
    return out
