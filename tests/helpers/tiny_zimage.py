"""A tiny random Z-Image diffusers folder of the REAL classes (``ZImagePipeline.from_pretrained`` runs it).

Layout as ``Tongyi-MAI/Z-Image``: ``tokenizer`` (``Qwen2Tokenizer``: byte-level BPE built in memory,
with Qwen's chat special tokens and a Qwen3-style chat template honouring ``enable_thinking``),
``text_encoder`` (``Qwen3Model``), ``vae`` (``AutoencoderKL`` 2x, the FLUX/Z-Image factors 0.3611 /
0.1159), ``transformer`` (``ZImageTransformer2DModel``) and a ``FlowMatchEulerDiscreteScheduler``
with the base model's static shift 6.0 (``dynamic=True``: FLUX-style dynamic shifting instead).
Everything is built offline and deterministically (``seed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from tests.helpers.byte_bpe import add_chain_merges, bytes_to_unicode
from tests.helpers.tiny_models import WORDS, TinyFolder, make_vae, write_flow_scheduler, write_model_index

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: Qwen3's chat template reduced to what ZImagePipeline uses (user turns + the generation prompt; the
#: empty think block only when enable_thinking is false, as Qwen3's own template)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
#: Z-Image / FLUX.1 autoencoder factors
VAE_SCALING, VAE_SHIFT = 0.3611, 0.1159


def make_qwen_tokenizer(words: Sequence[str] = WORDS, model_max_length: int = 512):
    """A byte-level BPE ``Qwen2Tokenizer``: every byte, whole-word merges for ``words`` (with and without the
    leading-space marker ``Ġ``), Qwen's special tokens and :data:`CHAT_TEMPLATE`; pads with ``<|endoftext|>``."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]
    for w in (*words, "user", "assistant"):
        for pieces in (list(w), [space] + list(w)):
            add_chain_merges(pieces, vocab, merges)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def make_qwen3_encoder(tokenizer, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A tiny ``Qwen3Model`` (Z-Image's text encoder class) matching ``tokenizer``."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
                      head_dim=hidden_size // num_heads, max_position_embeddings=1024,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(seed)
    return Qwen3Model(cfg).eval()


def make_zimage_transformer(in_channels: int = 4, dim: int = 32, n_layers: int = 2, n_refiner_layers: int = 1,
                            n_heads: int = 2, cap_feat_dim: int = 16, axes_dims: Sequence[int] = (4, 6, 6),
                            axes_lens: Sequence[int] = (1024, 64, 64), seed: int = 0):
    """A tiny ``ZImageTransformer2DModel`` (``dim / n_heads == sum(axes_dims)``; patch 2, frame patch 1).

    The pad tokens (``x_pad_token`` / ``cap_pad_token``) start at zero; every parameter gets a small
    random perturbation so that padding and every weight visibly change the output."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=in_channels, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, cap_feat_dim=cap_feat_dim,
        axes_dims=list(axes_dims), axes_lens=list(axes_lens),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model


def make_tiny_zimage_folder(path: str | Path, *, latent_channels: int = 4, text_hidden: int = 16,
                            cap_feat_dim: int | None = None, in_channels: int | None = None, shift: float = 6.0,
                            dynamic: bool = False, scheduler: dict[str, Any] | None = None, seed: int = 0,
                            causal_lm: bool = False, write_index: bool = True) -> TinyFolder:
    """Build a tiny Z-Image diffusers folder at ``path`` (see module docstring).

    ``cap_feat_dim`` / ``in_channels`` default to the consistent values (text width, VAE channels):
    pass others to build deliberately inconsistent folders for error tests.  ``causal_lm=True`` saves the
    text encoder as a ``Qwen3ForCausalLM`` checkpoint (its config.json then says so) while model_index.json
    keeps ``Qwen3Model`` -- the layout of the released folders.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None, scheduler_shift=shift)
    index: dict[str, tuple[str, str] | None] = {}

    tok = make_qwen_tokenizer()
    enc = make_qwen3_encoder(tok, hidden_size=text_hidden, seed=next(seeds))
    tok.save_pretrained(str(path / "tokenizer"))
    if causal_lm:
        from transformers import Qwen3ForCausalLM

        lm = Qwen3ForCausalLM(enc.config)
        lm.model.load_state_dict(enc.state_dict())
        lm.save_pretrained(str(path / "text_encoder"))
    else:
        enc.save_pretrained(str(path / "text_encoder"))
    out.text_encoders["text_encoder"], out.tokenizers["tokenizer"] = enc, tok
    index["text_encoder"] = ("transformers", "Qwen3Model")
    index["tokenizer"] = ("transformers", "Qwen2Tokenizer")

    vae = make_vae(latent_channels=latent_channels, shift_factor=VAE_SHIFT, scaling_factor=VAE_SCALING,
                   seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    out.vae = vae
    index["vae"] = ("diffusers", "AutoencoderKL")

    tr = make_zimage_transformer(in_channels=in_channels if in_channels is not None else latent_channels,
                                 cap_feat_dim=cap_feat_dim if cap_feat_dim is not None else text_hidden,
                                 seed=next(seeds))
    tr.save_pretrained(str(path / "transformer"))
    out.transformer = tr
    index["transformer"] = ("diffusers", "ZImageTransformer2DModel")

    sched = dict(scheduler or {})
    if dynamic:
        sched = {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
                 "base_shift": 0.5, "max_shift": 1.15, **sched}
    write_flow_scheduler(path, shift=shift, **sched)
    index["scheduler"] = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    if write_index:
        write_model_index(path, "ZImagePipeline", index)
    return out
