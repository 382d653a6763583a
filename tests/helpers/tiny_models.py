"""Tiny randomly initialised models of the REAL diffusers / transformers classes, saved as folders.

Real teachers cannot be downloaded here, so adapter tests build a tiny model of the real class from
a config, ``save_pretrained`` it into a temporary diffusers folder (tokenizers included, built
locally without the hub) and load it back through the same code path a user's folder takes.

Builders are deterministic (``seed``) and fast (a whole SD3 folder is built in well under a second).
Everything here works offline; nothing is downloaded.

Public helpers
  * ``make_clip_tokenizer`` / ``make_t5_tokenizer`` / ``make_word_level_tokenizer``: tokenizers
    built from an in-memory vocabulary;
  * ``make_clip_text_encoder`` / ``make_t5_encoder`` / ``make_vae``: tiny models of the real classes;
  * ``make_tiny_sd3_folder``: a complete (or partial) SD3 / SD3.5 diffusers folder;
  * ``write_model_index`` / ``write_flow_scheduler``: the bits of a diffusers folder that are not models.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

# -------------------------------------------------------------------------------------------------
# Tokenizers (no hub: built from an in-memory vocabulary)
# -------------------------------------------------------------------------------------------------
#: words that get a single token in every tiny tokenizer (so prompts built from them stay short)
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "and", "in", "with",
    "red", "green", "blue", "white", "black", "yellow", "small", "big",
    "cat", "dog", "circle", "square", "triangle", "cross", "photo", "painting",
)

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def make_clip_tokenizer(model_max_length: int = 77, pad_token: str = CLIP_EOS, words: Sequence[str] = WORDS):
    """A byte-level BPE ``CLIPTokenizer``: every lowercase letter, plus whole-word merges for ``words``.

    ``pad_token="!"`` reproduces SD3's second tokenizer (CLIP-G pads with ``!``).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1, "!": 2}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in words:
        # merge left to right: w[0] + w[1], (w[0]w[1]) + w[2], ..., the last piece carries </w>
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for nxt in pieces[1:]:
            pair = (left, nxt)
            if pair not in merges:
                merges.append(pair)
            left = left + nxt
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def make_t5_tokenizer(model_max_length: int = 512, words: Sequence[str] = WORDS):
    """A unigram ``T5Tokenizer`` (``<pad>``=0, ``</s>``=1, ``<unk>``=2), no extra ids."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in string.ascii_lowercase]
    vocab += [(c, -4.0) for c in string.ascii_lowercase]
    vocab += [("\u2581" + w, -1.0) for w in words if len(w) > 1]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def make_word_level_tokenizer(words: Sequence[str] = WORDS, model_max_length: int = 16):
    """A whitespace word-level fast tokenizer (``<pad>``=0, ``<unk>``=1, ``<eos>``=2) -- the toy layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   model_max_length=model_max_length)


# -------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------
def make_clip_text_encoder(tokenizer, hidden_size: int = 8, projection_dim: int = 16, num_layers: int = 2,
                           num_heads: int = 2, max_position_embeddings: int = 77, seed: int = 0):
    """A tiny ``CLIPTextModelWithProjection`` matching ``tokenizer`` (vocab size, EOS id)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    eos = tokenizer.eos_token_id
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        projection_dim=projection_dim, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg).eval()


def make_t5_encoder(tokenizer, d_model: int = 32, num_layers: int = 1, num_heads: int = 2, seed: int = 0):
    """A tiny ``T5EncoderModel`` matching ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // num_heads,
                   num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def make_vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (8, 16), shift_factor: float | None = 0.0609,
             scaling_factor: float = 1.5305, seed: int = 0):
    """A tiny ``AutoencoderKL`` (downsampling ``2 ** (len(block_out_channels) - 1)``) with SD3's factors."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=4,
        sample_size=32, shift_factor=shift_factor, scaling_factor=scaling_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def make_sd3_transformer(variant: str = "sd3", in_channels: int = 4, joint_attention_dim: int = 32,
                         pooled_projection_dim: int = 32, num_layers: int = 2, num_heads: int = 2,
                         head_dim: int = 8, patch_size: int = 2, sample_size: int = 16,
                         pos_embed_max_size: int = 16, seed: int = 0):
    """A tiny ``SD3Transformer2DModel``; ``variant="sd35"`` adds ``qk_norm="rms_norm"`` + a dual-attention layer."""
    from diffusers import SD3Transformer2DModel

    if variant not in ("sd3", "sd35"):
        raise ValueError(f"unknown SD3 variant {variant!r}")
    extra: dict[str, Any] = {}
    if variant == "sd35":
        extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=joint_attention_dim, caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=pos_embed_max_size, **extra,
    ).eval()


# -------------------------------------------------------------------------------------------------
# Folder plumbing
# -------------------------------------------------------------------------------------------------
def _versions() -> tuple[str, str]:
    import diffusers
    import transformers

    return diffusers.__version__, transformers.__version__


def write_model_index(folder: str | Path, pipeline_class: str, components: dict[str, tuple[str, str] | None]) -> Path:
    """Write ``model_index.json``; a ``None`` component is written as ``[null, null]`` (absent)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": _versions()[0]}
    for name, spec in components.items():
        index[name] = [None, None] if spec is None else list(spec)
    path = folder / "model_index.json"
    path.write_text(json.dumps(index, indent=2))
    return path


def write_flow_scheduler(folder: str | Path, shift: float = 3.0, **kwargs) -> Path:
    """Save a ``FlowMatchEulerDiscreteScheduler`` config into ``folder/scheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kwargs).save_pretrained(
        str(Path(folder) / "scheduler"))
    return Path(folder) / "scheduler"


@dataclass
class TinyFolder:
    """What :func:`make_tiny_sd3_folder` built (the in-memory models are the ones that were saved)."""

    path: Path
    transformer: Any
    text_encoders: dict[str, Any] = field(default_factory=dict)   # "text_encoder", "text_encoder_2", "text_encoder_3"
    tokenizers: dict[str, Any] = field(default_factory=dict)      # "tokenizer", "tokenizer_2", "tokenizer_3"
    vae: Any = None
    scheduler_shift: float = 3.0


def make_tiny_sd3_folder(path: str | Path, variant: str = "sd3", *, with_t5: bool = True, with_vae: bool = True,
                         num_clip: int = 2, word_level_tokenizer: bool = False, clip_hidden: Sequence[int] = (8, 12),
                         clip_projection: int = 16, t5_dim: int = 32, joint_attention_dim: int | None = None,
                         pooled_projection_dim: int | None = None, latent_channels: int = 4, shift: float = 3.0,
                         num_layers: int = 2, seed: int = 0, write_index: bool = True) -> TinyFolder:
    """Build a tiny SD3 (``variant="sd3"``) or SD3.5 (``"sd35"``) diffusers folder at ``path``.

    * the full layout (defaults): transformer, scheduler, CLIP-L + CLIP-G (``CLIPTextModelWithProjection``
      with ``CLIPTokenizer``), T5 (``T5EncoderModel`` + ``T5Tokenizer``), ``AutoencoderKL`` (8->4 px/latent: 2x);
      ``StableDiffusion3Pipeline.from_pretrained(path)`` loads and runs it;
    * ``with_t5=False`` / ``with_vae=False`` / ``num_clip=1`` leave those components out (``[null, null]``
      in model_index.json); without a VAE the transformer works in pixel space (3 channels);
    * the toy layout: ``num_clip=1, with_t5=False, with_vae=False, word_level_tokenizer=True``.

    ``joint_attention_dim`` defaults to the T5 width (with T5) or the summed CLIP widths (without);
    ``pooled_projection_dim`` to ``num_clip * clip_projection``.  Pass other values to build
    deliberately inconsistent folders for error tests.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if num_clip not in (0, 1, 2):
        raise ValueError("num_clip must be 0, 1 or 2")
    gen_seed = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None, scheduler_shift=shift)
    index: dict[str, tuple[str, str] | None] = {}

    clip_names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    for i, (enc_name, tok_name) in enumerate(clip_names):
        if i >= num_clip:
            index[enc_name] = None
            index[tok_name] = None
            continue
        if word_level_tokenizer:
            tok = make_word_level_tokenizer()
            tok_spec = ("transformers", "PreTrainedTokenizerFast")
            max_pos = tok.model_max_length
        else:
            tok = make_clip_tokenizer(pad_token=CLIP_EOS if i == 0 else "!")
            tok_spec = ("transformers", "CLIPTokenizer")
            max_pos = 77
        enc = make_clip_text_encoder(tok, hidden_size=clip_hidden[i], projection_dim=clip_projection,
                                     max_position_embeddings=max_pos, seed=next(gen_seed))
        tok.save_pretrained(str(path / tok_name))
        enc.save_pretrained(str(path / enc_name))
        out.text_encoders[enc_name], out.tokenizers[tok_name] = enc, tok
        index[enc_name] = ("transformers", "CLIPTextModelWithProjection")
        index[tok_name] = tok_spec

    if with_t5:
        tok3 = make_t5_tokenizer()
        enc3 = make_t5_encoder(tok3, d_model=t5_dim, seed=next(gen_seed))
        tok3.save_pretrained(str(path / "tokenizer_3"))
        enc3.save_pretrained(str(path / "text_encoder_3"))
        out.text_encoders["text_encoder_3"], out.tokenizers["tokenizer_3"] = enc3, tok3
        index["text_encoder_3"] = ("transformers", "T5EncoderModel")
        index["tokenizer_3"] = ("transformers", "T5TokenizerFast")
    else:
        index["text_encoder_3"] = None
        index["tokenizer_3"] = None

    if with_vae:
        vae = make_vae(latent_channels=latent_channels, seed=next(gen_seed))
        vae.save_pretrained(str(path / "vae"))
        out.vae = vae
        in_channels = latent_channels
        index["vae"] = ("diffusers", "AutoencoderKL")
    else:
        in_channels = 3
        index["vae"] = None

    if joint_attention_dim is None:
        joint_attention_dim = t5_dim if with_t5 else max(1, sum(clip_hidden[:num_clip]))
    if pooled_projection_dim is None:
        pooled_projection_dim = max(1, num_clip * clip_projection)
    tr = make_sd3_transformer(variant, in_channels=in_channels, joint_attention_dim=joint_attention_dim,
                              pooled_projection_dim=pooled_projection_dim, num_layers=num_layers,
                              seed=next(gen_seed))
    tr.save_pretrained(str(path / "transformer"))
    out.transformer = tr
    index["transformer"] = ("diffusers", "SD3Transformer2DModel")

    write_flow_scheduler(path, shift=shift)
    index["scheduler"] = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    index["image_encoder"] = None
    index["feature_extractor"] = None
    if write_index:
        write_model_index(path, "StableDiffusion3Pipeline", index)
    return out


# -------------------------------------------------------------------------------------------------
# FLUX.1 (FluxPipeline layout)
# -------------------------------------------------------------------------------------------------
def make_clip_text_model(tokenizer, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2,
                         max_position_embeddings: int = 77, seed: int = 0):
    """A tiny ``CLIPTextModel`` (no projection: FLUX's and SDXL's first encoder) matching ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_position_embeddings,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval()


def make_flux_transformer(in_channels: int = 16, joint_attention_dim: int = 32, pooled_projection_dim: int = 16,
                          num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                          axes_dims_rope: Sequence[int] = (4, 6, 6), guidance_embeds: bool = True, seed: int = 0):
    """A tiny ``FluxTransformer2DModel`` (``patch_size=1``: the pipeline packs 2x2 latent patches itself)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    ).eval()


#: FLUX's scheduler settings, with small sequence lengths so that ``mu`` varies at tiny resolutions
TINY_FLUX_SCHEDULER: dict[str, Any] = {"base_image_seq_len": 16, "max_image_seq_len": 256,
                                       "base_shift": 0.5, "max_shift": 1.15}


def make_tiny_flux_folder(path: str | Path, *, guidance_embeds: bool = True, clip_hidden: int = 16, t5_dim: int = 32,
                          latent_channels: int = 4, joint_attention_dim: int | None = None,
                          pooled_projection_dim: int | None = None, in_channels: int | None = None,
                          num_layers: int = 2, num_single_layers: int = 2, dynamic_shifting: bool = True,
                          scheduler: dict[str, Any] | None = None, seed: int = 0,
                          write_index: bool = True) -> TinyFolder:
    """Build a tiny FLUX.1 diffusers folder at ``path`` (``FluxPipeline.from_pretrained(path)`` runs it).

    Layout as FLUX.1-dev: ``text_encoder`` (``CLIPTextModel`` + ``CLIPTokenizer``), ``text_encoder_2``
    (``T5EncoderModel`` + T5 tokenizer), ``vae`` (``AutoencoderKL`` 2x, FLUX's shift/scaling factors),
    ``transformer`` (``FluxTransformer2DModel``, ``guidance_embeds=True`` like FLUX.1-dev) and a
    dynamically shifting ``FlowMatchEulerDiscreteScheduler`` (:data:`TINY_FLUX_SCHEDULER` unless
    ``scheduler`` overrides it).  ``joint_attention_dim`` / ``pooled_projection_dim`` / ``in_channels``
    default to the consistent values (T5 width, CLIP width, 4 x latent channels).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None, scheduler_shift=3.0)
    index: dict[str, tuple[str, str] | None] = {}

    tok = make_clip_tokenizer()
    enc = make_clip_text_model(tok, hidden_size=clip_hidden, seed=next(seeds))
    tok.save_pretrained(str(path / "tokenizer"))
    enc.save_pretrained(str(path / "text_encoder"))
    out.text_encoders["text_encoder"], out.tokenizers["tokenizer"] = enc, tok
    index["text_encoder"] = ("transformers", "CLIPTextModel")
    index["tokenizer"] = ("transformers", "CLIPTokenizer")

    tok2 = make_t5_tokenizer()
    enc2 = make_t5_encoder(tok2, d_model=t5_dim, seed=next(seeds))
    tok2.save_pretrained(str(path / "tokenizer_2"))
    enc2.save_pretrained(str(path / "text_encoder_2"))
    out.text_encoders["text_encoder_2"], out.tokenizers["tokenizer_2"] = enc2, tok2
    index["text_encoder_2"] = ("transformers", "T5EncoderModel")
    index["tokenizer_2"] = ("transformers", "T5TokenizerFast")

    vae = make_vae(latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611, seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    out.vae = vae
    index["vae"] = ("diffusers", "AutoencoderKL")

    tr = make_flux_transformer(
        in_channels=in_channels if in_channels is not None else 4 * latent_channels,
        joint_attention_dim=joint_attention_dim if joint_attention_dim is not None else t5_dim,
        pooled_projection_dim=pooled_projection_dim if pooled_projection_dim is not None else clip_hidden,
        num_layers=num_layers, num_single_layers=num_single_layers, guidance_embeds=guidance_embeds,
        seed=next(seeds))
    tr.save_pretrained(str(path / "transformer"))
    out.transformer = tr
    index["transformer"] = ("diffusers", "FluxTransformer2DModel")

    sched = dict(TINY_FLUX_SCHEDULER if scheduler is None else scheduler)
    write_flow_scheduler(path, shift=3.0, use_dynamic_shifting=dynamic_shifting, **sched)
    index["scheduler"] = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    index["image_encoder"] = None
    index["feature_extractor"] = None
    if write_index:
        write_model_index(path, "FluxPipeline", index)
    return out


# -------------------------------------------------------------------------------------------------
# Discriminator backbones (VFM discriminator): DINOv2 and a CLIP text model with its tokenizer
# -------------------------------------------------------------------------------------------------
def make_dinov2(hidden_size: int = 32, num_layers: int = 4, num_heads: int = 2, patch_size: int = 4,
                image_size: int = 16, seed: int = 0):
    """A tiny ``transformers.Dinov2Model`` (``image_size / patch_size`` position grid)."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       mlp_ratio=2, image_size=image_size, patch_size=patch_size, layerscale_value=1.0)
    torch.manual_seed(seed)
    return Dinov2Model(cfg).eval()


def make_tiny_dinov2_folder(path: str | Path, **kwargs) -> Path:
    """Save :func:`make_dinov2` (``**kwargs``) to ``path`` (config.json + model.safetensors)."""
    path = Path(path)
    make_dinov2(**kwargs).save_pretrained(str(path))
    return path


def make_tiny_clip_text_folder(path: str | Path, projection_dim: int = 16, hidden_size: int = 8,
                               seed: int = 0) -> Path:
    """Save a tiny ``CLIPTextModelWithProjection`` and its ``CLIPTokenizer`` together in ``path``."""
    path = Path(path)
    tok = make_clip_tokenizer()
    enc = make_clip_text_encoder(tok, hidden_size=hidden_size, projection_dim=projection_dim, seed=seed)
    tok.save_pretrained(str(path))
    enc.save_pretrained(str(path))
    return path


# -------------------------------------------------------------------------------------------------
# SDXL (StableDiffusionXLPipeline layout)
# -------------------------------------------------------------------------------------------------
def make_sdxl_unet(cross_attention_dim: int = 20, pooled_dim: int = 16, in_channels: int = 4,
                   addition_time_embed_dim: int = 4, projection_class_embeddings_input_dim: int | None = None,
                   seed: int = 0):
    """A tiny ``UNet2DConditionModel`` with SDXL's ``addition_embed_type="text_time"`` (2 levels: 4x fewer pixels)."""
    from diffusers import UNet2DConditionModel

    if projection_class_embeddings_input_dim is None:
        projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + pooled_dim
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
        transformer_layers_per_block=1,
    ).eval()


def write_sdxl_scheduler(folder: str | Path, prediction_type: str = "epsilon", **kwargs) -> Path:
    """Save SDXL's ``EulerDiscreteScheduler`` config (scaled_linear 0.00085..0.012) into ``folder/scheduler``."""
    from diffusers import EulerDiscreteScheduler

    cfg: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                           "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
                           "timestep_spacing": "leading", "steps_offset": 1}
    cfg.update(kwargs)
    EulerDiscreteScheduler(**cfg).save_pretrained(str(Path(folder) / "scheduler"))
    return Path(folder) / "scheduler"


def make_tiny_sdxl_folder(path: str | Path, *, clip_hidden: Sequence[int] = (8, 12), clip_projection: int = 16,
                          latent_channels: int = 4, cross_attention_dim: int | None = None,
                          projection_class_embeddings_input_dim: int | None = None, prediction_type: str = "epsilon",
                          force_zeros_for_empty_prompt: bool = True, scheduler: dict[str, Any] | None = None,
                          seed: int = 0, write_index: bool = True) -> TinyFolder:
    """Build a tiny SDXL diffusers folder at ``path`` (``StableDiffusionXLPipeline.from_pretrained(path)`` runs it).

    Layout as SDXL-base: ``text_encoder`` (``CLIPTextModel``), ``text_encoder_2``
    (``CLIPTextModelWithProjection``, pads with ``!``), ``unet`` (``UNet2DConditionModel``, text_time),
    ``vae`` (``AutoencoderKL`` 2x, scaling 0.13025, no shift) and an ``EulerDiscreteScheduler``.  The
    UNet's ``cross_attention_dim`` defaults to the summed CLIP widths and its
    ``projection_class_embeddings_input_dim`` to ``6 * 4 + clip_projection``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None)
    index: dict[str, tuple[str, str] | None] = {}

    tok = make_clip_tokenizer()
    enc = make_clip_text_model(tok, hidden_size=clip_hidden[0], seed=next(seeds))
    tok2 = make_clip_tokenizer(pad_token="!")
    enc2 = make_clip_text_encoder(tok2, hidden_size=clip_hidden[1], projection_dim=clip_projection, seed=next(seeds))
    for name, tname, e, t, cls in (("text_encoder", "tokenizer", enc, tok, "CLIPTextModel"),
                                   ("text_encoder_2", "tokenizer_2", enc2, tok2, "CLIPTextModelWithProjection")):
        t.save_pretrained(str(path / tname))
        e.save_pretrained(str(path / name))
        out.text_encoders[name], out.tokenizers[tname] = e, t
        index[name] = ("transformers", cls)
        index[tname] = ("transformers", "CLIPTokenizer")

    vae = make_vae(latent_channels=latent_channels, shift_factor=None, scaling_factor=0.13025, seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    out.vae = vae
    index["vae"] = ("diffusers", "AutoencoderKL")

    unet = make_sdxl_unet(cross_attention_dim=cross_attention_dim or sum(clip_hidden), pooled_dim=clip_projection,
                          in_channels=latent_channels,
                          projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
                          seed=next(seeds))
    unet.save_pretrained(str(path / "unet"))
    out.transformer = unet
    index["unet"] = ("diffusers", "UNet2DConditionModel")

    write_sdxl_scheduler(path, prediction_type=prediction_type, **(scheduler or {}))
    index["scheduler"] = ("diffusers", "EulerDiscreteScheduler")
    index["image_encoder"] = None
    index["feature_extractor"] = None
    if write_index:
        write_model_index(path, "StableDiffusionXLPipeline", index)
        mi = json.loads((path / "model_index.json").read_text())
        mi["force_zeros_for_empty_prompt"] = force_zeros_for_empty_prompt
        (path / "model_index.json").write_text(json.dumps(mi, indent=2))
    return out


# -------------------------------------------------------------------------------------------------
# SANA / SANA-Sprint (SanaPipeline / SanaSprintPipeline layout)
# -------------------------------------------------------------------------------------------------
def make_gemma_tokenizer(model_max_length: int = 2048, words: Sequence[str] = WORDS):
    """A BPE ``GemmaTokenizer`` (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3) that prepends ``<bos>``:
    printable characters plus whole-word merges (``"\u2581red"``) for ``words``; spaces become ``"\u2581"``."""
    from transformers import GemmaTokenizer

    from .byte_bpe import add_chain_merges

    vocab: dict[str, int] = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in string.printable:
        if c not in " \t\r\x0b\x0c":
            vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        add_chain_merges(["\u2581"] + list(w), vocab, merges)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    from tokenizers import processors

    # like the real Gemma tokenizer: <bos> first (SANA keeps token 0 and the last max_sequence_length - 1)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


def make_gemma2_encoder(tokenizer, hidden_size: int = 16, num_layers: int = 1, num_heads: int = 2, seed: int = 0):
    """A tiny ``Gemma2Model`` (SANA's text encoder class) matching ``tokenizer``."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
                       head_dim=hidden_size // num_heads, max_position_embeddings=4096, sliding_window=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Gemma2Model(cfg).eval()


def make_dc_vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (8, 16), scaling_factor: float = 0.41407,
                seed: int = 0):
    """A tiny ``AutoencoderDC`` (deep-compression VAE, ``2 ** (len(block_out_channels) - 1)`` downsampling)."""
    from diffusers import AutoencoderDC

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=tuple(block_out_channels), decoder_block_out_channels=tuple(block_out_channels),
        encoder_layers_per_block=(1,) * n, decoder_layers_per_block=(1,) * n,
        encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n,
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=scaling_factor,
    ).eval()


def make_sana_transformer(in_channels: int = 4, caption_channels: int = 16, num_layers: int = 2, num_heads: int = 2,
                          head_dim: int = 8, sprint: bool = False, seed: int = 0):
    """A tiny ``SanaTransformer2DModel``; ``sprint=True`` adds SANA-Sprint's guidance embedding and qk norm."""
    from diffusers import SanaTransformer2DModel

    inner = num_heads * head_dim
    extra: dict[str, Any] = {}
    if sprint:
        extra = {"guidance_embeds": True, "guidance_embeds_scale": 0.1, "qk_norm": "rms_norm_across_heads"}
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=num_heads, attention_head_dim=head_dim,
        num_layers=num_layers, num_cross_attention_heads=num_heads, cross_attention_head_dim=head_dim,
        cross_attention_dim=inner, caption_channels=caption_channels, mlp_ratio=2.5, sample_size=16, patch_size=1,
        norm_elementwise_affine=False, **extra,
    ).eval()


def make_tiny_sana_folder(path: str | Path, *, sprint: bool = False, text_hidden: int = 16, latent_channels: int = 4,
                          caption_channels: int | None = None, flow_shift: float = 3.0, scheduler: str | None = None,
                          seed: int = 0, write_index: bool = True) -> TinyFolder:
    """Build a tiny SANA (``sprint=False``) or SANA-Sprint (``sprint=True``) diffusers folder at ``path``.

    ``tokenizer`` (``GemmaTokenizer``), ``text_encoder`` (``Gemma2Model``), ``vae`` (``AutoencoderDC`` 2x),
    ``transformer`` (``SanaTransformer2DModel``) and a scheduler: SANA's ``DPMSolverMultistepScheduler``
    with ``flow_shift`` (or ``scheduler="flow_match"``: ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``);
    SANA-Sprint's ``SCMScheduler`` (TrigFlow, ``sigma_data=0.5``).  ``SanaPipeline`` /
    ``SanaSprintPipeline.from_pretrained(path)`` run it (``use_resolution_binning=False``).
    """
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out = TinyFolder(path=path, transformer=None, scheduler_shift=flow_shift)
    index: dict[str, tuple[str, str] | None] = {}

    tok = make_gemma_tokenizer()
    enc = make_gemma2_encoder(tok, hidden_size=text_hidden, seed=next(seeds))
    tok.save_pretrained(str(path / "tokenizer"))
    enc.save_pretrained(str(path / "text_encoder"))
    out.text_encoders["text_encoder"], out.tokenizers["tokenizer"] = enc, tok
    index["text_encoder"] = ("transformers", "Gemma2Model")
    index["tokenizer"] = ("transformers", "GemmaTokenizerFast")

    vae = make_dc_vae(latent_channels=latent_channels, seed=next(seeds))
    vae.save_pretrained(str(path / "vae"))
    out.vae = vae
    index["vae"] = ("diffusers", "AutoencoderDC")

    tr = make_sana_transformer(in_channels=latent_channels, caption_channels=caption_channels or text_hidden,
                               sprint=sprint, seed=next(seeds))
    tr.save_pretrained(str(path / "transformer"))
    out.transformer = tr
    index["transformer"] = ("diffusers", "SanaTransformer2DModel")

    kind = scheduler or ("scm" if sprint else "dpm")
    if kind == "scm":
        sched: Any = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    elif kind == "dpm":
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2)
    elif kind == "flow_match":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    else:
        raise ValueError(f"unknown scheduler {kind!r}")
    sched.save_pretrained(str(path / "scheduler"))
    index["scheduler"] = ("diffusers", type(sched).__name__)
    if write_index:
        write_model_index(path, "SanaSprintPipeline" if sprint else "SanaPipeline", index)
    return out
