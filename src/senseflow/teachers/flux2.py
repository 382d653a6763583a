"""FLUX.2 (``Flux2Transformer2DModel``) teacher adapter: FLUX.2-dev and FLUX.2-klein from a local diffusers folder.

One family, two variants; the variant is ``model_index.json``'s ``_class_name``:

* ``Flux2Pipeline`` (**dev**): ``Mistral3ForConditionalGeneration`` text encoder; the tokenizer
  folder is a ``PixtralProcessor``.  Prompts are wrapped in the pipeline's chat format (its
  ``SYSTEM_MESSAGE`` as the system turn, the prompt as the user turn, ``format_input``), tokenized
  with ``apply_chat_template(..., padding="max_length", truncation=True, max_length=512)`` and the
  hidden states of layers ``(10, 20, 30)`` are stacked: ``prompt_embeds = [B, L, 3 x 5120]``.
  Guidance-distilled: the guidance scale is fed to the transformer's guidance embedding
  (``guidance``, float32, multiplied by 1000 inside); there is no unconditional branch.
* ``Flux2KleinPipeline`` (**klein**): ``Qwen3ForCausalLM`` + ``Qwen2TokenizerFast``.  Each prompt
  is rendered with the chat template (user turn, ``add_generation_prompt=True``,
  ``enable_thinking=False``), tokenized to ``max_length`` and layers ``(9, 18, 27)`` are stacked.
  No guidance embedding (``guidance=None``): true CFG ``v_u + s (v_c - v_u)`` with the empty prompt
  as the negative, unless ``model_index.json`` says ``is_distilled: true`` (the step-distilled
  klein ignores the guidance scale; CFG is then refused).

Shared by both (``Flux2Pipeline.prepare_latents`` / ``_pack_latents`` / ``_prepare_*_ids`` and the
decode at the end of ``__call__``):

* latents: the VAE latent ``[B, 32, H, W]`` is 2x2-PATCHIFIED to ``[B, 128, H/2, W/2]`` and
  normalised by the VAE's batch-norm running statistics, ``(z - bn.mean) / sqrt(bn.var + eps)``.
  This normalised patchified tensor is the adapter's latent (:meth:`latent_shape`) -- it is also
  exactly the tensor the pipeline draws its noise in (``randn_tensor((B, 128, H/2, W/2))``).  The
  transformer sees it flattened to tokens ``[B, (H/2)(W/2), 128]`` (row-major), with position ids
  ``(t, h, w, l) = (0, i, j, 0)`` for the image and ``(0, 0, 0, k)`` for text token ``k``;
* time: the transformer gets ``timestep = sigma`` (the pipeline divides the scheduler's
  ``1000 sigma`` by 1000; the model multiplies by 1000 inside) and predicts the flow velocity
  ``v = eps - x0`` (``FlowMatchEulerDiscreteScheduler.step``: ``x' = x + (sigma' - sigma) v``);
* schedule: the scheduler config's dynamic exponential shift, with ``mu`` from the pipeline's
  ``compute_empirical_mu(image_seq_len, num_steps)`` -- which depends on the number of sampling
  steps.  The teacher's time law uses ``mu_steps`` (default 50 = the pipelines'
  ``num_inference_steps`` default): ``mu = 2.02`` at 1024 px.  ``mu=`` / ``shift=`` override it;
* VAE decode: ``z = unpatchify(x * sqrt(bn.var + eps) + bn.mean)``, ``vae.decode(z)``.

Student and fake score of dev (as the FLUX.1 adapter, following the released SenseFlow FLUX
trainer): copies WITHOUT the guidance embedding, called without ``guidance``; only the teacher
gets an embedded value.  ``student_guidance_embed`` / ``fake_guidance_embed`` keep full copies.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..released import ReleasedForms
from ..schedules import RectifiedFlow, as_time
from . import loading, registry
from .base import Conditioning, FeatureTap, SenseflowError
from .common import (DiffusersFolderAdapter, SingleTextEncoder, flow_export_scheduler, flow_step_kwargs,
                     max_sequence_length_kwarg)

TRANSFORMER_CLASS = "Flux2Transformer2DModel"
VAE_CLASS = "AutoencoderKLFlux2"
GUIDANCE_EMBEDDER_PREFIX = "time_guidance_embed.guidance_embedder."
#: both pipelines' max_sequence_length default
MAX_SEQUENCE_LENGTH = 512
#: both pipelines' num_inference_steps default (compute_empirical_mu depends on the step count)
DEFAULT_MU_STEPS = 50


@dataclass(frozen=True)
class Variant:
    """What differs between FLUX.2-dev and FLUX.2-klein (the pipeline classes' own defaults)."""

    name: str
    pipeline: str
    text_encoder_class: str
    hidden_states_layers: tuple[int, ...]
    guidance: str                      # "embedded" (dev) or "cfg" (klein)
    default_guidance_scale: float      # the pipeline's guidance_scale default


VARIANTS: dict[str, Variant] = {
    "Flux2Pipeline": Variant("dev", "Flux2Pipeline", "Mistral3ForConditionalGeneration", (10, 20, 30), "embedded", 4.0),
    "Flux2KleinPipeline": Variant("klein", "Flux2KleinPipeline", "Qwen3ForCausalLM", (9, 18, 27), "cfg", 4.0),
}
_BY_ENCODER = {v.text_encoder_class: v for v in VARIANTS.values()}


def variant_of(index: Mapping[str, Any] | None, folder: Path) -> Variant:
    """The variant ``model_index.json`` names (or, without one, the text encoder's class says)."""
    name = None if index is None else index.get("_class_name")
    if name is not None:
        if name not in VARIANTS:
            raise SenseflowError(f"{folder}/model_index.json is a {name}; the flux2 family loads "
                                 f"{' or '.join(VARIANTS)} folders (text-to-image FLUX.2-dev / klein)")
        return VARIANTS[name]
    cfg_path = folder / "text_encoder" / "config.json"
    if cfg_path.is_file():
        archs = loading.read_json(cfg_path).get("architectures") or []
        for arch in archs:
            if arch in _BY_ENCODER:
                return _BY_ENCODER[arch]
    raise SenseflowError(f"{folder} has no model_index.json naming Flux2Pipeline or Flux2KleinPipeline and no "
                         f"text_encoder/ to tell dev from klein: copy model_index.json from the original model")


# -------------------------------------------------------------------------------------------------
# latent layout (Flux2Pipeline._patchify_latents / _pack_latents / _prepare_latent_ids / _prepare_text_ids)
# -------------------------------------------------------------------------------------------------
def patchify(z: Tensor) -> Tensor:
    """VAE latent ``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]`` (channel index ``c * 4 + 2 di + dj``)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def to_tokens(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]`` (row-major)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def from_tokens(x: Tensor, h: int, w: int) -> Tensor:
    """``[B, h*w, C]`` -> ``[B, C, h, w]``."""
    b, _, c = x.shape
    return x.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, i, j, 0)`` of the ``h x w`` image tokens, ``[h*w, 4]``."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, 0, 0, k)`` of ``length`` text tokens, ``[length, 4]``."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """``Flux2Pipeline``'s ``mu``: a fit in the token count and the number of steps (BFL's empirical law)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def has_guidance_embedding(backbone: nn.Module) -> bool:
    cfg = getattr(backbone, "config", None)
    if isinstance(cfg, Mapping) and "guidance_embeds" in cfg:
        return bool(cfg["guidance_embeds"])
    return loading.find_module_name(backbone, "guidance_embedder") is not None


def without_guidance_embedding(backbone: nn.Module) -> nn.Module:
    """A trainable copy with ``guidance_embeds=False`` (every other tensor cloned in; strict)."""
    if not has_guidance_embedding(backbone):
        return copy.deepcopy(backbone)
    cfg = getattr(backbone, "config", None)
    if not isinstance(cfg, Mapping) or type(backbone).__name__ != TRANSFORMER_CLASS:
        raise SenseflowError(f"cannot remove the guidance embedding from a {type(backbone).__name__}: the FLUX.2 "
                             f"adapter needs the Flux2Transformer2DModel itself (unwrap it first)")
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    config["guidance_embeds"] = False
    student = type(backbone).from_config(config).to(device=loading.module_device(backbone),
                                                      dtype=loading.module_dtype(backbone))
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()
             if not k.startswith(GUIDANCE_EMBEDDER_PREFIX)}
    student.load_state_dict(state, strict=True)
    student.train(backbone.training)
    return student


def check_dims(transformer: Mapping[str, Any], *, resolution: int, text: Mapping[str, Any] | None,
               layers: Sequence[int], vae: Mapping[str, Any] | None, max_sequence_length: int,
               where: str) -> None:
    """Encoder width x layers == joint_attention_dim, 4 x VAE channels == in_channels, resolution; one line each."""
    joint, in_ch = int(transformer["joint_attention_dim"]), int(transformer["in_channels"])
    if int(transformer.get("patch_size", 1)) != 1:
        raise SenseflowError(f"{where}: the FLUX.2 transformer has patch_size={transformer.get('patch_size')}; "
                             f"FLUX.2 patchifies the latents itself and needs patch_size=1")
    if not 1 <= max_sequence_length <= 4096:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} is out of range: use 1 to 4096 "
                             f"(the pipelines' default: {MAX_SEQUENCE_LENGTH})")
    if text is not None:
        tc = text.get("text_config", text)
        hidden, n_layers = int(tc["hidden_size"]), int(tc["num_hidden_layers"])
        if max(layers) > n_layers:
            raise SenseflowError(f"text_encoder_out_layers {tuple(layers)} read hidden state {max(layers)} but the "
                                 f"text encoder in {where} has {n_layers} layers: give layers <= {n_layers}")
        if hidden * len(layers) != joint:
            raise SenseflowError(f"joint_attention_dim mismatch in {where}: {len(layers)} stacked text-encoder layers "
                                 f"x hidden_size {hidden} = {hidden * len(layers)}, but the transformer's "
                                 f"joint_attention_dim={joint}; the text encoder does not belong to this transformer")
    if vae is not None:
        lat = int(vae["latent_channels"])
        patch = vae.get("patch_size", (2, 2))
        if 4 * lat != in_ch or tuple(patch) != (2, 2):
            raise SenseflowError(f"the VAE has latent_channels={lat} (patch {tuple(patch)}) but the FLUX.2 transformer "
                                 f"has in_channels={in_ch} (= 4 x latent channels after 2x2 patchify) in {where}: the "
                                 f"vae/ does not belong to this transformer")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        if resolution <= 0 or resolution % (2 * scale) != 0:
            raise SenseflowError(f"resolution {resolution} is not a multiple of {2 * scale} (VAE factor {scale} x "
                                 f"2x2 patchify): pick a resolution divisible by {2 * scale}")


def schedule_for(sched: Mapping[str, Any], image_seq_len: int, *, mu: float | None, shift: float | None,
                 mu_steps: int, where: str) -> RectifiedFlow:
    """Explicit ``mu`` / ``shift``, else the scheduler config: dynamic -> ``compute_empirical_mu``, static -> shift."""
    if mu is not None and shift is not None:
        raise SenseflowError("give the FLUX.2 adapter either mu= (dynamic shift) or shift= (static shift), not both")
    if mu is not None:
        return RectifiedFlow(mu=float(mu))
    if shift is not None:
        return RectifiedFlow(shift=float(shift))
    if sched and not bool(sched.get("use_dynamic_shifting", True)):
        return RectifiedFlow(shift=float(sched.get("shift", 1.0)))
    if str((sched or {}).get("time_shift_type", "exponential")) != "exponential":
        raise SenseflowError(f"{where}/scheduler uses time_shift_type={sched.get('time_shift_type')!r}; FLUX.2 uses "
                             f"'exponential': pass an explicit mu= or shift=")
    if int(mu_steps) < 1:
        raise SenseflowError(f"mu_steps={mu_steps}: give the number of sampling steps mu is computed for (>= 1)")
    return RectifiedFlow(mu=compute_empirical_mu(image_seq_len, int(mu_steps)))


@dataclass
class TextEncoder:
    name: str
    tokenizer: Any
    model: nn.Module


def load_flux2_tokenizer(path: Path, variant: Variant):
    """The tokenizer (not the processor): FLUX.2-dev's ``tokenizer/`` is a ``PixtralProcessor``, whose import
    needs torchvision, but its text path only uses the tokenizer files and the chat template.

    ``AutoTokenizer`` first; where it cannot build the class ``tokenizer_config.json`` names (or builds one
    without pad token / chat template), the generic fast tokenizer reads the same ``tokenizer.json`` and
    ``tokenizer_config.json`` (special tokens, chat template)."""
    try:
        tok = loading.load_tokenizer(path)
        tok = getattr(tok, "tokenizer", tok)   # a processor that did load: its tokenizer
    except SenseflowError:
        if not (path / "tokenizer.json").is_file():
            raise
        tok = None
    if tok is None or getattr(tok, "pad_token", None) is None or getattr(tok, "chat_template", None) is None:
        try:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 -- any loader failure becomes a one-line user error
            if tok is None:
                raise SenseflowError(f"cannot load the tokenizer in {path}: {loading.one_line(exc)}; FLUX.2 needs "
                                     f"tokenizer.json + tokenizer_config.json there (copy them from the original "
                                     f"model)") from None
    if getattr(tok, "chat_template", None) is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            f = path / name
            if f.is_file():
                tok.chat_template = loading.read_json(f)["chat_template"] if name.endswith(".json") else f.read_text()
                break
    if getattr(tok, "chat_template", None) is None:
        raise SenseflowError(f"the tokenizer in {path} has no chat template, but {variant.pipeline} formats every "
                             f"prompt with it: copy chat_template.jinja (or tokenizer_config.json) from the original "
                             f"model's tokenizer/")
    if getattr(tok, "pad_token", None) is None:
        raise SenseflowError(f"the tokenizer in {path} has no pad token, but {variant.pipeline} pads every prompt to "
                             f"max_sequence_length: set pad_token in its tokenizer_config.json")
    return tok


class Flux2Adapter(SingleTextEncoder, DiffusersFolderAdapter):
    """FLUX.2 family adapter (see module docstring)."""

    family = "flux2"
    label = "FLUX.2"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    released = ReleasedForms(omega="alpha_sq", isg_form="two_step", isg_grid="native_1000")  # as FLUX.1's release

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int, vae: nn.Module | Mapping,
                 variant: Variant | str = "Flux2Pipeline", scheduler_config: Mapping[str, Any] | None = None,
                 mu: float | None = None, shift: float | None = None, mu_steps: int = DEFAULT_MU_STEPS,
                 text_encoder: TextEncoder | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 text_encoder_out_layers: Sequence[int] | None = None, is_distilled: bool = False,
                 default_embedded_guidance: float | None = None, student_guidance_embed: bool = False,
                 fake_guidance_embed: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str | None = None) -> None:
        self.variant = VARIANTS[variant] if isinstance(variant, str) else variant
        self.config = loading.config_of(transformer_config)
        self.resolution = int(resolution)
        self.source = source or "the FLUX.2 model"
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = loading.config_of(vae)
        self.text_encoder = text_encoder
        self.max_sequence_length = int(max_sequence_length)
        self.layers = tuple(int(i) for i in (text_encoder_out_layers or self.variant.hidden_states_layers))
        check_dims(self.config, resolution=self.resolution,
                   text=None if text_encoder is None else loading.config_of(text_encoder.model), layers=self.layers,
                   vae=self.vae_config, max_sequence_length=self.max_sequence_length, where=self.source)
        side = self.latent_shape()[-1]
        self.image_seq_len = side * side
        self.mu_steps = int(mu_steps)
        self.schedule = schedule_for(scheduler_config or {}, self.image_seq_len, mu=mu, shift=shift,
                                     mu_steps=self.mu_steps, where=self.source)
        self.is_distilled = bool(is_distilled)
        if self.variant.guidance == "embedded":
            self.guidance_kinds = frozenset({"embedded"})
        else:
            self.guidance_kinds = frozenset() if self.is_distilled else frozenset({"cfg"})
        self.default_embedded_guidance = (self.variant.default_guidance_scale if default_embedded_guidance is None
                                          else float(default_embedded_guidance))
        self.student_guidance_embed = bool(student_guidance_embed)
        self.fake_guidance_embed = bool(fake_guidance_embed)
        self._uncond: Conditioning | None = None
        self.device = torch.device(device)
        self.dtype = dtype

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        max_sequence_length: int = MAX_SEQUENCE_LENGTH, **options: Any) -> tuple["Flux2Adapter", nn.Module]:
        """Load ``(adapter, Flux2Transformer2DModel teacher)`` from a local FLUX.2-dev / klein folder (no download).

        ``options``: ``mu``, ``shift``, ``mu_steps``, ``text_encoder_out_layers``,
        ``default_embedded_guidance``, ``student_guidance_embed``, ``fake_guidance_embed``.
        """
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        folder = loading.as_folder(folder, "FLUX.2 teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "flux2")
        variant = variant_of(index, folder)
        tdir = loading.require_subfolder(folder, "transformer",
                                         hint="a FLUX.2 diffusers folder needs transformer/ (Flux2Transformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="FLUX.2")
        loading.require_keys(tcfg, ("joint_attention_dim", "in_channels"), tdir)
        vae_dir = loading.require_subfolder(folder, "vae", hint="a FLUX.2 diffusers folder needs vae/ (AutoencoderKLFlux2)")
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="FLUX.2")
        sched = loading.read_scheduler_config(folder)
        layers = tuple(options.get("text_encoder_out_layers") or variant.hidden_states_layers)
        text_cfg, tok = None, None
        if load_text_encoders:
            if not loading.component_present(folder, index, "text_encoder"):
                raise SenseflowError(f"{folder} has no text_encoder/: {variant.pipeline} needs its "
                                     f"{variant.text_encoder_class}; add it, or pass load_text_encoders=False and use "
                                     f"a prompt cache")
            text_cfg = loading.check_model_class(folder / "text_encoder", variant.text_encoder_class, adapter="FLUX.2")
            tok = load_flux2_tokenizer(folder / "tokenizer", variant)
        check_dims(tcfg, resolution=resolution, text=text_cfg, layers=layers, vae=vae_cfg,
                   max_sequence_length=max_sequence_length, where=str(folder))

        transformer = loading.load_model(Flux2Transformer2DModel, tdir, dtype=dtype, device=device, adapter="FLUX.2")
        encoder = None
        if load_text_encoders:
            import transformers

            model = loading.load_model(getattr(transformers, variant.text_encoder_class), folder / "text_encoder",
                                       dtype=dtype, device=device, frozen=True, adapter="FLUX.2")
            encoder = TextEncoder("text_encoder", tok, model)
        vae = loading.load_model(AutoencoderKLFlux2, vae_dir, dtype=dtype, device=device, frozen=True, adapter="FLUX.2")
        adapter = cls(transformer.config, resolution=resolution, vae=vae, variant=variant, scheduler_config=sched,
                      text_encoder=encoder, max_sequence_length=max_sequence_length,
                      is_distilled=bool((index or {}).get("is_distilled", False)), device=device, dtype=dtype,
                      source=str(folder), **options)
        return adapter, transformer

    # -- latents -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def latent_shape(self) -> tuple[int, ...]:
        """The normalised, 2x2-patchified latent ``(4 x latent channels, H/2, W/2)`` (the pipeline's noise shape)."""
        side = self.resolution // (self.vae_scale_factor * 2)
        return (int(self.config["in_channels"]), side, side)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        vae = self._require_vae()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + float(vae.config.batch_norm_eps)).to(like.device,
                                                                                                    like.dtype)
        return mean, std

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised patchified latents -> images in ``[-1, 1]`` (as the end of ``Flux2Pipeline.__call__``)."""
        vae = self._require_vae()
        mean, std = self._bn_stats(latents)
        z = unpatchify(latents * std + mean)
        return vae.decode(z.to(loading.module_dtype(vae)), return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images -> normalised patchified latents (the pipeline's ``_encode_vae_image``: the posterior mode)."""
        vae = self._require_vae()
        dist = vae.encode(images.to(loading.module_dtype(vae))).latent_dist
        z = patchify(dist.sample(generator) if sample else dist.mode()).to(images.dtype)
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
        except KeyError:
            raise SenseflowError(f"FLUX.2 conditioning needs 'prompt_embeds', got {sorted(cond.tensors)}: encode "
                                 f"prompts with the FLUX.2 adapter") from None
        n, joint = x_t.shape[0], int(self.config["joint_attention_dim"])
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != joint or prompt_embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the FLUX.2 transformer "
                                 f"needs [{n}, tokens, {joint}]: the prompt cache was built for another model")
        c_in = int(self.config["in_channels"])
        if x_t.ndim != 4 or x_t.shape[1] != c_in:
            raise SenseflowError(f"FLUX.2 latents must be [B, {c_in}, h, w] (normalised, patchified), "
                                 f"got {tuple(x_t.shape)}")
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        dtype = loading.module_dtype(backbone)
        h, w = x_t.shape[-2:]
        out = backbone(
            hidden_states=to_tokens(x_t.to(dtype)),
            timestep=t.to(torch.float32),
            guidance=self._guidance_for(backbone, embedded_guidance, n, x_t.device),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            txt_ids=text_ids(prompt_embeds.shape[1], device=x_t.device),
            img_ids=image_ids(h, w, device=x_t.device),
            return_dict=False,
        )[0]
        return from_tokens(out, h, w).to(x_t.dtype)

    def _guidance_for(self, backbone: nn.Module, embedded: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        if not has_guidance_embedding(backbone):
            if embedded is not None:
                raise SenseflowError("this FLUX.2 transformer has no guidance embedding (klein, or the guidance-free "
                                     "dev student / fake score): give embedded guidance only to a dev teacher")
            return None
        if embedded is None:
            embedded = torch.tensor(self.default_embedded_guidance)
        g = torch.as_tensor(embedded, dtype=torch.float32, device=device)
        return g.expand(n) if g.ndim == 0 else g.reshape(n)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.text_encoder is not None

    def _token_batch(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.text_encoder.tokenizer
        if self.variant.name == "dev":    # Flux2Pipeline._get_mistral_3_small_prompt_embeds
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input
            from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

            inputs = tok.apply_chat_template(format_input(prompts=prompts, system_message=SYSTEM_MESSAGE),
                                             add_generation_prompt=False, tokenize=True, return_dict=True,
                                             return_tensors="pt", padding="max_length", truncation=True,
                                             max_length=self.max_sequence_length)
            return inputs["input_ids"], inputs["attention_mask"]
        ids, masks = [], []               # Flux2KleinPipeline._get_qwen3_prompt_embeds: one prompt at a time
        for prompt in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            inputs = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=self.max_sequence_length)
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The pipeline's ``encode_prompt``: the chat-formatted prompt's hidden states of ``layers``, stacked."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder is None:
            raise SenseflowError("the FLUX.2 adapter was loaded without its text encoder (load_text_encoders=False): "
                                 "use a prompt cache, or load the teacher with its text encoder")
        model = self.text_encoder.model
        ids, mask = self._token_batch(list(prompts))
        dev = loading.module_device(model)
        with torch.no_grad():
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True, use_cache=False)
            stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)
        b, k, length, d = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, k * d)
        return Conditioning({"prompt_embeds": embeds.to(device=self.device, dtype=self.dtype)})

    def unconditional(self, batch_size: int) -> Conditioning:
        """Klein's negative prompt: the encoded empty prompt (cached); dev has no unconditional branch."""
        if "cfg" not in self.guidance_kinds:
            why = ("FLUX.2-dev is guidance-distilled: guide it with embedded guidance (guidance 'embedded'), not cfg"
                   if self.variant.name == "dev" else
                   "this FLUX.2-klein is step-distilled (is_distilled: true) and its pipeline ignores guidance: "
                   "train without cfg guidance")
            raise SenseflowError(why)
        if self._uncond is None:
            if not self.has_text_encoders:
                raise SenseflowError("FLUX.2-klein CFG needs the empty-prompt embedding but the text encoder is not "
                                     "loaded and none was cached: rebuild the prompt cache (`senseflow cache`)")
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch_size)

    def release_text_encoders(self) -> None:
        if "cfg" in self.guidance_kinds and self.has_text_encoders and self._uncond is None:
            self._uncond = self.encode_prompts([""])
        self.text_encoder = None

    # -- structure -----------------------------------------------------------------------------
    def feature_blocks(self, backbone: nn.Module) -> list[str]:
        """The double-stream blocks: single-stream ones output text and image tokens in one tensor."""
        return [n for n in self.block_names(backbone) if ".single_transformer_blocks." not in f".{n}"]

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """The image stream of the middle double-stream block (they return ``(text, image)``), or ``layer``.

        Single-stream blocks return ONE ``[B, text + image, D]`` tensor, so only double blocks are tapped."""
        return self.token_grid_tap(backbone, self.feature_blocks(backbone), layer, patch=1, index=1)

    def make_student(self, teacher_backbone: nn.Module) -> nn.Module:
        if self.student_guidance_embed:
            return copy.deepcopy(teacher_backbone)
        return without_guidance_embedding(teacher_backbone)

    def make_fake_score(self, teacher_backbone: nn.Module) -> nn.Module:
        if self.fake_guidance_embed:
            return copy.deepcopy(teacher_backbone)
        return without_guidance_embedding(teacher_backbone)

    def __repr__(self) -> str:
        return (f"Flux2Adapter(variant={self.variant.name}, source={self.source!r}, resolution={self.resolution}, "
                f"schedule={self.schedule}, text_encoder={'yes' if self.has_text_encoders else 'no'}, "
                f"layers={self.layers}, max_sequence_length={self.max_sequence_length})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
def draw_token_renoise(draw, shape, dtype: torch.dtype) -> Tensor:
    """The scheduler's re-noise is drawn like its model output: tokens ``[1, h*w, C]``, then back to ``[1, C, h, w]``."""
    c, h, w = shape
    return from_tokens(draw((1, h * w, c), dtype), h, w)


def export_call_kwargs(student, call: dict) -> None:
    """Both FLUX.2 pipelines take ``image`` FIRST: the snippet passes ``prompt=`` (export_diffusers)."""
    if has_guidance_embedding(student.backbone):   # a dev student kept its embedding: the adapter's default value
        call["guidance_scale"] = float(student.adapter.default_embedded_guidance)
    max_sequence_length_kwarg(student.adapter, call, MAX_SEQUENCE_LENGTH)
    layers = tuple(student.adapter.layers)
    if layers != student.adapter.variant.hidden_states_layers:
        call["text_encoder_out_layers"] = list(layers)


# -- senseflow bench --------------------------------------------------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor     # the preset's factor is the VAE's x the 2x2 patchify (16)


def _bench_tokens(preset, resolution: int) -> int:
    return (resolution // preset.vae_factor) ** 2


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> Flux2Adapter:
    """The preset describes the patchified latent (``latent_channels`` = 4 x the VAE's, factor = 2 x the VAE's)."""
    vae = {"latent_channels": preset.latent_channels // 4,
           "block_out_channels": [1] * (preset.vae_factor // 2).bit_length(), "patch_size": [2, 2]}
    variant = "Flux2Pipeline" if preset.config.get("guidance_embeds", True) else "Flux2KleinPipeline"
    return Flux2Adapter(preset.config, resolution=resolution, vae=vae, variant=variant,
                        scheduler_config=preset.scheduler, max_sequence_length=preset.text_tokens, device=device,
                        dtype=dtype, source=f"preset {preset.name}")


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    h, w = x.shape[-2:]
    kwargs = {"hidden_states": to_tokens(x), "timestep": t, "encoder_hidden_states": cond.tensors["prompt_embeds"],
              "txt_ids": text_ids(preset.text_tokens, device=device), "img_ids": image_ids(h, w, device=device),
              "return_dict": False}
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((x.shape[0],), 4.0, device=device, dtype=torch.float32)
    return kwargs


def _bench_conditioning(preset, batch: int, generator, device, dtype) -> Conditioning:
    joint = int(preset.config["joint_attention_dim"])
    embeds = torch.randn(batch, preset.text_tokens, joint, generator=generator).to(device=device, dtype=dtype)
    return Conditioning({"prompt_embeds": embeds})


def _bench_student_config(preset) -> dict:
    return {**preset.config, "guidance_embeds": False}


#: No explicit guidance: a dev teacher then gets its default embedded value (4.0; the value does not change the
#: cost), the guidance-free student / fake score none, and a klein teacher runs without CFG (one branch: a klein
#: run with ``{cfg: s}`` costs one more teacher branch -- pass ``--set real_guidance.cfg=4``).
BENCH_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dmd2": {"real_guidance": {}, "fake_guidance": {}},
    "senseflow": {"real_guidance": {}, "fake_guidance": {}, "isg_guidance": {}},
    "sid": {"teacher_guidance": {}, "fake_guidance": {}, "fake_train_guidance": {}},
}


def load_from_config(config, device: torch.device) -> tuple[Flux2Adapter, nn.Module]:
    """FLUX.2: ``mu`` from compute_empirical_mu; ``teacher.shift`` (if set) replaces it by a static shift."""
    from ..build import loader_kwargs

    return Flux2Adapter.from_pretrained(config.paths.teacher, **loader_kwargs(config, device, shift=config.teacher.shift))


# -- senseflow export --format single-file ----------------------------------------------------------
#: diffusers module (in a double block) -> BFL's FLUX.2 module: the inverse of diffusers'
#: ``FLUX2_TRANSFORMER_DOUBLE_BLOCK_KEY_MAP`` (q / k / v are fused separately)
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
           "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The student in Black Forest Labs' FLUX.2 layout (``flux2-dev.safetensors``: ``double_blocks.N.img_attn.qkv``,
    ``single_blocks.N.linear1``, ``double_stream_modulation_img.lin``, ...), no prefix.

    The exact inverse of diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``: q / k / v fused
    row-wise per stream (that converter splits in three equal chunks), the single blocks' fused
    ``to_qkv_mlp_proj`` / ``to_out`` renamed to ``linear1`` / ``linear2``, RMS-norm weights as
    ``.scale``, and the final ``norm_out`` modulation swapped back to BFL's (shift, scale) order.  A
    student without a guidance embedder (klein, or dev with the guidance folded in) has no ``guidance_in``.
    A bias on the final modulation is refused: that converter swaps the weight only.
    """
    from ..original_layout import KeyMap, block_ids, swap_halves

    m = KeyMap(state, "FLUX.2 single-file export")
    for emb, dst in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in")):
        src = f"time_guidance_embed.{emb}."
        if emb == "timestep_embedder" or m.has(src + "linear_1.weight"):
            m.move(src + "linear_1", dst + ".in_layer")
            m.move(src + "linear_2", dst + ".out_layer")
    for mod in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        m.move(f"{mod}.linear", f"{mod}.lin")
    m.move("x_embedder", "img_in")
    m.move("context_embedder", "txt_in")
    for i in block_ids(state, "transformer_blocks"):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        m.fuse([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], o + "img_attn.qkv")
        m.fuse([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], o + "txt_attn.qkv")
        for src, dst in _DOUBLE_NORMS.items():
            m.move(d + src + ".weight", o + dst + ".scale")
        for src, dst in _DOUBLE.items():
            m.move(d + src, o + dst)
    for i in block_ids(state, "single_transformer_blocks"):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        m.move(d + "attn.to_qkv_mlp_proj", o + "linear1")
        m.move(d + "attn.to_out", o + "linear2")
        m.move(d + "attn.norm_q.weight", o + "norm.query_norm.scale")
        m.move(d + "attn.norm_k.weight", o + "norm.key_norm.scale")
    m.move("proj_out", "final_layer.linear")
    m.put("final_layer.adaLN_modulation.1.weight", swap_halves(m.take("norm_out.linear.weight")))
    return m.finish()


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader=TRANSFORMER_CLASS,
    where="ComfyUI: models/diffusion_models (Load Diffusion Model), with the FLUX.2 text encoder (Mistral-3 for "
          "dev, Qwen3 for klein) and the FLUX.2 VAE loaded separately")


#: fused BFL module (in a double block) -> its diffusers parts, for the kohya layout
_KOHYA_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_KOHYA_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
#: the modules outside the blocks that diffusers' kohya FLUX.2 converter files under the transformer
_KOHYA_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer", "proj_out": "final_layer.linear"}


def to_kohya(pairs: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapters in kohya-ss sd-scripts' FLUX.2 layout (``lora_unet_double_blocks_0_img_attn_qkv``,
    ``lora_unet_single_blocks_0_linear1``, ...), BFL's module names as in the single file.

    q / k / v are one linear in BFL's layout, so their adapters become one block-sparse adapter of the
    summed rank (:func:`~senseflow.original_layout.fuse_lora`), which diffusers'
    ``_convert_kohya_flux2_lora_to_diffusers`` (``Flux2Pipeline.load_lora_weights``) splits back exactly.
    That converter only warns about a key it does not know, so any adapter outside its table (the
    modulations, the guidance embedder, ``norm_out``) is refused here instead of being silently dropped.
    """
    from ..original_layout import fuse_lora, kohya_name, put_kohya

    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out: dict[str, Tensor] = {}
    left = dict(pairs)
    ids = sorted({int(k.split(".")[1]) for k in pairs if k.startswith("transformer_blocks.")})
    for i in ids:
        for fused, parts in _KOHYA_FUSED.items():
            names = [f"transformer_blocks.{i}.{p}" for p in parts]
            if any(n in left for n in names):
                down, up, scale = fuse_lora([left.pop(n, None) for n in names], [inner] * 3, inner,
                                            f"FLUX.2 kohya export, transformer_blocks.{i}")
                put_kohya(out, kohya_name(f"double_blocks.{i}.{fused}"), down, up, scale)
    for name, (down, up, scale) in left.items():
        head, _, rest = name.partition(".")
        index, _, sub = rest.partition(".")
        table = {"transformer_blocks": (_DOUBLE, "double_blocks"),
                 "single_transformer_blocks": (_KOHYA_SINGLE, "single_blocks")}.get(head)
        if table is None:
            original = _KOHYA_TOP.get(name)
        else:
            original = f"{table[1]}.{index}.{table[0][sub]}" if sub in table[0] else None
        if not original:
            raise SenseflowError(f"FLUX.2 kohya export: no kohya module diffusers reads back for the adapter on "
                                 f"{name!r} (its kohya FLUX.2 converter covers the blocks' attention / MLP and the "
                                 f"embedders; retrain with generator.lora.target_modules = auto or use --format "
                                 f"diffusers)")
        put_kohya(out, kohya_name(original), down, up, scale)
    return out


KOHYA_LORA = registry.KohyaLoraRecipe(
    to_kohya, where="ComfyUI: models/loras (LoraLoaderModelOnly) on the student base; diffusers: "
                    "Flux2Pipeline / Flux2KleinPipeline.load_lora_weights")


FAMILY = registry.FamilyDescriptor(
    name="flux2",
    label="FLUX.2 (dev, klein)",
    load=load_from_config,
    backbone_classes=(TRANSFORMER_CLASS,),
    pipeline_class="Flux2Pipeline",
    pipeline_prefixes=("Flux2",),     # longer than FLUX.1's "Flux": Flux2Pipeline / Flux2KleinPipeline are ours
    # the pipelines draw the latents AND the scheduler's re-noise from the global RNG when no generator is given;
    # the latents in the patchified [C, h, w] layout (the adapter's own), the re-noise in the token layout
    noise=registry.NoiseRecipe("global", renoise=draw_token_renoise),
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, single_file=SINGLE_FILE,
                                 kohya_lora=KOHYA_LORA),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs,
                               student_config=_bench_student_config, conditioning=_bench_conditioning,
                               method_defaults=BENCH_METHOD_DEFAULTS),
    # diffusers examples/dreambooth/train_dreambooth_lora_flux2.py / _flux2_klein.py with --lora_layers unset:
    # the double blocks' attention, the single blocks' fused qkv+mlp projection and (by index: a bare "to_out"
    # would also match the double blocks' ModuleList) the first 24 single blocks' output projection
    lora_targets=("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                  *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24))),
)
