"""The toy world's tokenizer and tiny CLIP text encoder, built locally from a seed.

Why: there is no model hub on the machines this project runs on, and offline
``CLIPTokenizer.from_pretrained`` of a missing hub id silently returns an *empty* tokenizer.  So the
toy teacher's text stack is built here from :data:`senseflow.toy.world.VOCABULARY`.  The toy
teacher's folder mirrors an SD3 folder: ``tokenizer/`` (this word-level tokenizer, saved as
``tokenizer.json``) and ``text_encoder/`` (a ``CLIPTextModelWithProjection``), so the same loading
code serves the toy world and real checkpoints.

The text encoder is randomly initialised and frozen: a random transformer still maps different
prompts to different, position-aware token states, and the toy DiT learns to read them (as real
DiTs learn to read a frozen CLIP/T5).  The tokenizer is word-level (every caption word is one
token), which makes prompts outside the vocabulary easy to reject with a clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from .world import VOCABULARY

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Special tokens first, so their ids are fixed: pad 0, unk 1, bos 2, eos 3.  The EOS id must not be
#: 2: transformers' CLIP treats ``eos_token_id == 2`` as a legacy config and pools at argmax(ids).
SPECIAL_TOKENS: list[str] = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
#: Tokens per prompt after padding: the longest caption (21 words) plus BOS and EOS fits.
MAX_LENGTH = 24


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens, then :data:`VOCABULARY` in order."""
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *VOCABULARY])}


def check_prompt(prompt: str) -> list[str]:
    """The prompt's words; ``ValueError`` naming any word outside the vocabulary, or a too-long prompt.

    The tokenizer itself maps unknown words to ``<unk>`` silently (tokenizers never raise), so
    every entry point that accepts user prompts should call this first.
    """
    words = prompt.lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word {unknown[0]!r} in prompt {prompt!r}: the toy vocabulary is "
                         f"{' '.join(VOCABULARY)}")
    if len(words) + 2 > MAX_LENGTH:
        raise ValueError(f"prompt has {len(words)} words; at most {MAX_LENGTH - 2} fit: {prompt!r}")
    return words


def build_tokenizer(save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (``tokenizers`` WordLevel in a ``PreTrainedTokenizerFast``).

    Lower-cases, splits on whitespace, wraps prompts as ``<|startoftext|> ... <|endoftext|>`` and
    pads with ``<pad>`` (use ``padding="max_length"``; ``model_max_length`` is :data:`MAX_LENGTH`).
    With ``save_dir`` it is saved there and reloads offline with
    ``transformers.AutoTokenizer.from_pretrained(save_dir)``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    ids = vocab()
    core = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN]), (EOS_TOKEN, ids[EOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, model_max_length=MAX_LENGTH, padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def text_encoder_config() -> CLIPTextConfig:
    """Tiny CLIP text config: hidden 64, 2 layers, 4 heads, projection 64, 24 positions."""
    ids = vocab()
    return CLIPTextConfig(
        vocab_size=len(ids), hidden_size=64, intermediate_size=128, projection_dim=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        pad_token_id=ids[PAD_TOKEN], bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN],
    )


def build_text_encoder(seed: int) -> CLIPTextModelWithProjection:
    """A randomly initialised (from ``seed``), frozen, eval-mode tiny CLIP text encoder.

    The global torch RNG is left untouched (initialisation runs under ``fork_rng``), so building
    the encoder does not shift any other random stream of a run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(text_encoder_config())
    model.requires_grad_(False)
    return model.eval()


def save_text_stack(folder: str | os.PathLike, seed: int) -> Path:
    """Write ``folder/tokenizer`` and ``folder/text_encoder`` (the SD3 folder layout); returns folder."""
    folder = Path(folder)
    build_tokenizer(folder / "tokenizer")
    build_text_encoder(seed).save_pretrained(str(folder / "text_encoder"))
    return folder


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a saved toy tokenizer, failing clearly if the folder is missing (never touches the hub)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; build one with build_tokenizer(save_dir)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """Checked, padded token ids ``[B, MAX_LENGTH]`` (raises on unknown words, see check_prompt)."""
    for p in prompts:
        check_prompt(p)
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids
