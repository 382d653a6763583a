"""Tiny random FLUX.2 diffusers folders (``Flux2Pipeline`` = dev, ``Flux2KleinPipeline`` = klein), built offline.

Same idea as :mod:`tests.helpers.tiny_models`: the REAL classes (``Flux2Transformer2DModel``,
``AutoencoderKLFlux2``, ``Mistral3ForConditionalGeneration`` / ``Qwen3ForCausalLM``) at a tiny size,
saved with ``save_pretrained`` so the adapter loads them through a user's code path.

* Both text encoders have enough layers for the pipelines' DEFAULT ``text_encoder_out_layers``
  (dev ``(10, 20, 30)``: 30 layers; klein ``(9, 18, 27)``: 28 layers), so the stock pipelines run
  with their own defaults; the transformer's ``joint_attention_dim`` is 3 x the encoder width.
* The dev tokenizer is a ``PreTrainedTokenizerFast`` with a Mistral-style chat template and the
  pipeline's whole ``SYSTEM_MESSAGE`` as ONE added token (so short ``max_sequence_length`` values
  still reach the prompt).  ``processor=True`` declares the tokenizer folder a ``PixtralProcessor``
  in ``model_index.json`` (as FLUX.2-dev does, with processor / image-processor configs), which
  ``DiffusionPipeline.from_pretrained`` cannot load here (no torchvision) but the adapter must.
* The klein tokenizer is a byte-level BPE ``Qwen2Tokenizer`` with the Qwen3 chat template
  (``enable_thinking=False`` -> the empty think block).
* The VAE's batch-norm running statistics are set to non-trivial values, so the latent
  normalisation is exercised.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tests.helpers.byte_bpe import add_chain_merges
from tests.helpers.tiny_models import WORDS, write_flow_scheduler, write_model_index

#: FLUX.2-dev's scheduler_config.json (dynamic shifting; the pipeline computes its own mu)
TINY_FLUX2_SCHEDULER: dict[str, Any] = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                        "base_image_seq_len": 256, "max_image_seq_len": 4096,
                                        "time_shift_type": "exponential"}

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)

QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_level_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Printable characters (byte-level: space is ``Ġ``, newline ``Ċ``) plus whole-word merges ``Ġword``."""
    vocab: dict[str, int] = {"<|endoftext|>": 0}
    for c in string.printable:
        if c not in " \t\r\n\x0b\x0c":
            vocab.setdefault(c, len(vocab))
    vocab.setdefault("\u0120", len(vocab))   # Ġ
    vocab.setdefault("\u010a", len(vocab))   # Ċ
    merges: list[tuple[str, str]] = []
    for w in words:
        add_chain_merges(["\u0120"] + list(w), vocab, merges)
    return vocab, merges


def make_qwen3_tokenizer(words: Sequence[str] = WORDS, model_max_length: int = 512):
    """A byte-level BPE ``Qwen2Tokenizer`` with Qwen3's chat tokens and template (FLUX.2-klein's ``tokenizer/``)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_vocab(words)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def make_mistral_tokenizer(words: Sequence[str] = WORDS, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` with Mistral's chat tokens and a Mistral-style template (FLUX.2-dev).

    The pipeline's ``SYSTEM_MESSAGE`` is one added token (see module docstring)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_vocab(words)
    for special in ("<unk>", "<s>", "</s>", "<pad>"):
        vocab.setdefault(special, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]})
    tok.add_tokens([SYSTEM_MESSAGE])
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def make_qwen3_encoder(tokenizer, hidden_size: int = 8, num_layers: int = 28, seed: int = 0):
    """A tiny ``Qwen3ForCausalLM`` (klein's text encoder class)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=hidden_size // 2, max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def make_mistral3_encoder(tokenizer, hidden_size: int = 8, num_layers: int = 31, seed: int = 0):
    """A tiny ``Mistral3ForConditionalGeneration`` (dev's text encoder class: Mistral text model + Pixtral tower)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden_size // 2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=4, image_size=16, patch_size=4)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tokenizer.unk_token_id,
                         spatial_merge_size=2)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(cfg).eval()


def make_flux2_vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (8, 16), seed: int = 0):
    """A tiny ``AutoencoderKLFlux2`` with random (non-trivial) batch-norm running statistics."""
    from diffusers import AutoencoderKLFlux2

    n = len(block_out_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=latent_channels,
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=4,
                             sample_size=32).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
    return vae


def make_flux2_transformer(in_channels: int = 16, joint_attention_dim: int = 24, num_layers: int = 2,
                           num_single_layers: int = 2, guidance_embeds: bool = True, seed: int = 0):
    """A tiny ``Flux2Transformer2DModel`` (2 heads x 8 = 16 wide; rope axes sum to the head dim)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=in_channels, num_layers=num_layers,
                                   num_single_layers=num_single_layers, attention_head_dim=8, num_attention_heads=2,
                                   joint_attention_dim=joint_attention_dim, timestep_guidance_channels=16,
                                   mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds).eval()


@dataclass
class TinyFlux2Folder:
    """What :func:`make_tiny_flux2_folder` built (the in-memory models are the saved ones)."""

    path: Path
    variant: str
    transformer: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    extra: dict[str, Any] = field(default_factory=dict)


def make_tiny_flux2_folder(path: str | Path, variant: str = "dev", *, processor: bool = False, text_hidden: int = 8,
                           latent_channels: int = 4, joint_attention_dim: int | None = None,
                           in_channels: int | None = None, guidance_embeds: bool | None = None,
                           is_distilled: bool = False, with_tokenizer: bool = True, seed: int = 0,
                           write_index: bool = True) -> TinyFlux2Folder:
    """Build a tiny FLUX.2 ``variant`` (``"dev"``: ``Flux2Pipeline``; ``"klein"``: ``Flux2KleinPipeline``) folder.

    Defaults are consistent (joint dim 3 x encoder width, in_channels 4 x VAE latent channels;
    dev has a guidance embedding, klein none); pass other values to build broken folders.
    """
    if variant not in ("dev", "klein"):
        raise ValueError(f"unknown FLUX.2 variant {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    index: dict[str, tuple[str, str] | None] = {}
    if variant == "dev":
        tok = make_mistral_tokenizer()
        enc = make_mistral3_encoder(tok, hidden_size=text_hidden, seed=next(seeds))
        index["text_encoder"] = ("transformers", "Mistral3ForConditionalGeneration")
        index["tokenizer"] = ("transformers", "PixtralProcessor" if processor else "PreTrainedTokenizerFast")
    else:
        tok = make_qwen3_tokenizer()
        enc = make_qwen3_encoder(tok, hidden_size=text_hidden, seed=next(seeds))
        index["text_encoder"] = ("transformers", "Qwen3ForCausalLM")
        index["tokenizer"] = ("transformers", "Qwen2TokenizerFast")
    enc.save_pretrained(str(path / "text_encoder"))
    if with_tokenizer:
        tok.save_pretrained(str(path / "tokenizer"))
        if processor:   # FLUX.2-dev's tokenizer/ is a PixtralProcessor: processor + image-processor configs
            (path / "tokenizer" / "processor_config.json").write_text(json.dumps(
                {"processor_class": "PixtralProcessor", "patch_size": 16, "spatial_merge_size": 2,
                 "image_token": "[IMG]"}, indent=2))
            (path / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(
                {"image_processor_type": "PixtralImageProcessorFast", "processor_class": "PixtralProcessor",
                 "patch_size": 16}, indent=2))
            cfg_path = path / "tokenizer" / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["processor_class"] = "PixtralProcessor"
            cfg_path.write_text(json.dumps(cfg, indent=2))

    vae = make_flux2_vae(latent_channels=latent_channels, seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    index["vae"] = ("diffusers", "AutoencoderKLFlux2")

    if guidance_embeds is None:
        guidance_embeds = variant == "dev"
    tr = make_flux2_transformer(in_channels=in_channels if in_channels is not None else 4 * latent_channels,
                                joint_attention_dim=joint_attention_dim if joint_attention_dim is not None
                                else 3 * text_hidden, guidance_embeds=guidance_embeds, seed=next(seeds))
    tr.save_pretrained(str(path / "transformer"))
    index["transformer"] = ("diffusers", "Flux2Transformer2DModel")
    write_flow_scheduler(path, shift=3.0, **TINY_FLUX2_SCHEDULER)
    index["scheduler"] = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    if write_index:
        write_model_index(path, "Flux2Pipeline" if variant == "dev" else "Flux2KleinPipeline", index)
        if variant == "klein":
            mi = json.loads((path / "model_index.json").read_text())
            mi["is_distilled"] = bool(is_distilled)
            (path / "model_index.json").write_text(json.dumps(mi, indent=2))
    return TinyFlux2Folder(path=path, variant=variant, transformer=tr, text_encoder=enc, tokenizer=tok, vae=vae)


def make_tiny_flux2_dev_folder(path: str | Path, **kwargs: Any) -> TinyFlux2Folder:
    return make_tiny_flux2_folder(path, "dev", **kwargs)


def make_tiny_flux2_klein_folder(path: str | Path, **kwargs: Any) -> TinyFlux2Folder:
    return make_tiny_flux2_folder(path, "klein", **kwargs)
