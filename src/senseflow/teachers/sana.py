"""SANA / SANA-Sprint (``SanaTransformer2DModel`` + ``AutoencoderDC`` + Gemma-2) teacher adapter.

Two parameterisations, both reproduced from the stock diffusers 0.42 pipelines:

**Rectified flow** (``prediction="flow"``; SANA / SANA-1.5 folders, ``SanaPipeline``): the scheduler is
``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3)`` or ``FlowMatchEulerDiscreteScheduler
(shift=...)``; the schedule is ``RectifiedFlow(shift=flow_shift)``.  The transformer gets
``timestep = 1000 t * config.timestep_scale`` (the pipeline multiplies the scheduler's ``1000 sigma``
by ``timestep_scale``, 1.0 for SANA) in float32, the prompt embeddings AND their attention mask
(``encoder_attention_mask``), and predicts the velocity ``v = eps - x0``.

**TrigFlow** (``prediction="trigflow"``; SANA-Sprint folders with an ``SCMScheduler``, or any checkpoint
trained in TrigFlow, selected explicitly): the schedule is :class:`~senseflow.schedules.TrigFlow`
with native time the angle ``s`` and state ``x = cos(s) x0 + sin(s) eps`` in UNIT noise scale (the
pipeline's state is ``sigma_data`` times this one; ``sigma_data`` cancels out of every prediction).
As ``SanaSprintPipeline`` does, the network is a flow model evaluated at the mapped state
(:func:`~senseflow.schedules.trigflow_to_flow`): ``t = sin s / (sin s + cos s)``,
``x_t = x / (sin s + cos s)``, ``timestep = t`` itself (SANA-Sprint's dense time embedding, no 1000),
and its velocity ``v`` is turned into TrigFlow's ``F`` (``schedule.prediction == "v"``):
``F = ((1 - 2t) x_t + (1 - 2t + 2t^2) v) / sqrt(t^2 + (1 - t)^2)``, so that ``x0 = cos(s) x - sin(s) F``
(``SCMScheduler.step``'s ``pred_original_sample``).

Common to both:

* prompts (``SanaPipeline.encode_prompt``): lower-cased and stripped (``clean_caption=False``); with
  the complex human instruction (CHI, the pipelines' ``__call__`` default, kept here as
  :data:`DEFAULT_COMPLEX_HUMAN_INSTRUCTION`) the instruction is prepended and the tokenizer pads to
  ``len(tokens(CHI)) + max_sequence_length - 2``; Gemma-2's last hidden states and the mask are cut
  to token 0 (BOS) plus the last ``max_sequence_length - 1`` positions.  ``complex_human_instruction=None``
  disables the CHI (as ``encode_prompt``'s own default); pick the setting the checkpoint was trained with;
* the unconditional branch (CFG) is the encoded ``negative_prompt`` (``""``) WITHOUT the CHI, as the pipeline;
* guidance embedding (``guidance_embeds=True``, SANA-Sprint): the value ``g`` is passed as
  ``guidance = g * guidance_embeds_scale`` (0.1); a backbone with the embedding that gets no value uses
  ``default_embedded_guidance`` (4.5, ``SanaSprintPipeline``'s default); both CFG and the embedding are offered;
* VAE (``AutoencoderDC``, no shift): ``decode(z) = vae.decode(z / scaling_factor)``,
  ``encode(x) = vae.encode(x) * scaling_factor``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..schedules import NoiseSchedule, RectifiedFlow, TrigFlow, as_time, expand_like, trigflow_to_flow
from . import loading, registry
from .base import Conditioning, FeatureTap, SenseflowError
from .common import (DiffusersFolderAdapter, SingleTextEncoder, flow_export_scheduler, flow_step_kwargs,
                     max_sequence_length_kwarg)

TRANSFORMER_CLASS = "SanaTransformer2DModel"
TEXT_ENCODER_CLASSES: tuple[str, ...] = ("Gemma2Model", "Gemma2ForCausalLM")
VAE_CLASS = "AutoencoderDC"
DEFAULT_SHIFT = 3.0
DEFAULT_MAX_SEQUENCE_LENGTH = 300
#: SanaSprintPipeline's default guidance_scale (fed through the guidance embedding)
DEFAULT_EMBEDDED_GUIDANCE = 4.5
PREDICTIONS: tuple[str, ...] = ("flow", "trigflow")

#: ``SanaPipeline.__call__`` / ``SanaSprintPipeline.__call__``'s default ``complex_human_instruction``
DEFAULT_COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


@dataclass
class TextEncoder:
    """The Gemma-2 text encoder with its tokenizer."""

    name: str
    tokenizer: Any
    model: nn.Module


def schedule_from_config(sched: Mapping[str, Any], prediction: str | None = None, shift: float | None = None,
                         where: str = "the SANA folder") -> tuple[str, NoiseSchedule]:
    """``(prediction, schedule)``: TrigFlow for an ``SCMScheduler`` / explicit ``"trigflow"``, else the flow shift."""
    cls = str(sched.get("_class_name") or "")
    if prediction is None:
        prediction = "trigflow" if (cls == "SCMScheduler" or sched.get("prediction_type") == "trigflow") else "flow"
    if prediction not in PREDICTIONS:
        raise SenseflowError(f"prediction={prediction!r}: SANA checkpoints are 'flow' (SANA) or 'trigflow' "
                             f"(SANA-Sprint)")
    if prediction == "trigflow":
        if shift is not None:
            raise SenseflowError("a shift does not apply to a TrigFlow (SANA-Sprint) teacher: remove it")
        return prediction, TrigFlow(prediction="v")
    if shift is None:
        if sched.get("use_dynamic_shifting"):
            raise SenseflowError(f"{where}/scheduler uses dynamic shifting, which SANA does not: pass an explicit "
                                 f"shift (SANA: 3.0)")
        if "flow_shift" in sched:                              # DPMSolverMultistepScheduler (SANA's own)
            if not sched.get("use_flow_sigmas", True) or sched.get("prediction_type") not in (None, "flow_prediction"):
                raise SenseflowError(f"{where}/scheduler is not a flow scheduler (use_flow_sigmas / "
                                     f"prediction_type=flow_prediction): pass prediction='trigflow' or fix it")
            shift = float(sched["flow_shift"])
        else:
            shift = float(sched.get("shift", DEFAULT_SHIFT))
    return prediction, RectifiedFlow(shift=float(shift), prediction="velocity")


def check_dims(transformer: Mapping[str, Any], *, resolution: int, text: Mapping[str, Any] | None = None,
               max_text_tokens: int | None = None, vae: Mapping[str, Any] | None = None,
               where: str = "the SANA folder") -> None:
    """Check that text encoder, VAE, resolution and transformer fit together (config dicts); one-line errors."""
    caption = int(transformer["caption_channels"])
    in_ch = int(transformer["in_channels"])
    patch = int(transformer.get("patch_size", 1))
    if text is not None:
        hidden = int(text["hidden_size"])
        if hidden != caption:
            raise SenseflowError(f"caption_channels mismatch in {where}: the text encoder has hidden_size={hidden} but "
                                 f"the transformer's caption_channels={caption}; the text encoder does not belong to "
                                 f"this transformer")
        n_pos = text.get("max_position_embeddings")
        if max_text_tokens is not None and n_pos is not None and max_text_tokens > int(n_pos):
            raise SenseflowError(f"prompts are encoded with {max_text_tokens} tokens (instruction + "
                                 f"max_sequence_length) but the text encoder has max_position_embeddings={n_pos} in "
                                 f"{where}: lower max_sequence_length or disable the complex human instruction")
    scale = 32         # the pipeline's default DC-AE factor when there is no vae/
    if vae is not None:
        lat = int(vae["latent_channels"])
        if lat != in_ch:
            raise SenseflowError(f"the VAE has latent_channels={lat} but the transformer's in_channels={in_ch} in "
                                 f"{where}: the vae/ does not belong to this transformer")
        scale = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    if resolution <= 0 or resolution % (scale * patch) != 0:
        raise SenseflowError(f"resolution {resolution} is not a multiple of {scale * patch} (VAE factor {scale} x "
                             f"patch size {patch}): pick a resolution divisible by {scale * patch}")


def has_guidance_embedding(backbone: nn.Module) -> bool:
    cfg = getattr(backbone, "config", None)
    if isinstance(cfg, Mapping) and "guidance_embeds" in cfg:
        return bool(cfg["guidance_embeds"])
    return loading.find_module_name(backbone, "guidance_embedder") is not None


class SanaAdapter(SingleTextEncoder, DiffusersFolderAdapter):
    """SANA / SANA-Sprint family adapter (see module docstring)."""

    family = "sana"
    label = "SANA"

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int,
                 vae: nn.Module | Mapping[str, Any] | None = None, prediction: str = "flow",
                 shift: float | None = None, text_encoder: TextEncoder | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 complex_human_instruction: Sequence[str] | None = DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
                 negative_prompt: str = "", default_embedded_guidance: float | None = DEFAULT_EMBEDDED_GUIDANCE,
                 sigma_data: float | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str | None = None) -> None:
        self.config = loading.config_of(transformer_config)
        self.resolution = int(resolution)
        self.source = source or "the SANA model"
        sched = {"_class_name": "SCMScheduler"} if prediction == "trigflow" else {}
        self.prediction, self.schedule = schedule_from_config(sched, prediction, shift, where=self.source)
        self.sigma_data = sigma_data
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = None if vae is None else loading.config_of(vae)
        self.text_encoder = text_encoder
        if max_sequence_length < 2:
            raise SenseflowError(f"max_sequence_length={max_sequence_length} is too small: SANA keeps BOS + the last "
                                 f"max_sequence_length - 1 tokens (SANA: 300)")
        self.max_sequence_length = int(max_sequence_length)
        self.complex_human_instruction = tuple(complex_human_instruction or ())
        self.negative_prompt = negative_prompt
        self.default_embedded_guidance = None if default_embedded_guidance is None else float(default_embedded_guidance)
        self.guidance_kinds = frozenset({"cfg", "embedded"} if self.config.get("guidance_embeds") else {"cfg"})
        self.device = torch.device(device)
        self.dtype = dtype
        max_tokens = None
        if text_encoder is not None:
            tok = text_encoder.tokenizer
            if getattr(tok, "pad_token", None) is None:
                raise SenseflowError(f"the tokenizer of {self.source} has no pad token, but SANA pads every prompt to a "
                                     f"fixed length: set pad_token in its tokenizer_config.json")
            max_tokens = self._padded_length(with_instruction=bool(self.complex_human_instruction))
        check_dims(self.config, resolution=self.resolution,
                   text=None if text_encoder is None else loading.config_of(text_encoder.model),
                   max_text_tokens=max_tokens, vae=self.vae_config, where=self.source)
        self._uncond: Conditioning | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        prediction: str | None = None, shift: float | None = None,
                        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                        complex_human_instruction: Sequence[str] | None = DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
                        **options: Any) -> tuple["SanaAdapter", nn.Module]:
        """Load ``(adapter, SanaTransformer2DModel teacher)`` from a local SANA / SANA-Sprint folder (nothing is downloaded).

        ``prediction``: ``"flow"`` / ``"trigflow"`` (default: ``"trigflow"`` for an ``SCMScheduler`` folder,
        else ``"flow"``).  ``shift`` overrides the scheduler's ``flow_shift`` (flow only).
        ``options``: ``negative_prompt``, ``default_embedded_guidance``.
        """
        from diffusers import AutoencoderDC, SanaTransformer2DModel

        folder = loading.as_folder(folder, "SANA teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "sana")
        tdir = loading.require_subfolder(
            folder, "transformer", hint="a SANA diffusers folder needs transformer/ (SanaTransformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="SANA")
        loading.require_keys(tcfg, ("caption_channels", "in_channels"), tdir)
        sched = loading.read_scheduler_config(folder)
        prediction, schedule = schedule_from_config(sched, prediction, shift, where=str(folder))
        shift = schedule.shift if isinstance(schedule, RectifiedFlow) else None

        vae_dir = folder / "vae"
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="SANA") \
            if loading.component_present(folder, index, "vae") else None
        text_cfg, tokenizer = None, None
        if load_text_encoders:
            if not loading.component_present(folder, index, "text_encoder"):
                raise SenseflowError(f"{folder} has no text_encoder/: SANA needs its Gemma-2 encoder; add it, or pass "
                                     f"load_text_encoders=False and use a prompt cache")
            text_cfg = loading.check_model_class(folder / "text_encoder", TEXT_ENCODER_CLASSES, adapter="SANA")
            text_cfg = dict(text_cfg.get("text_config") or text_cfg)
            tokenizer = loading.load_tokenizer(folder / "tokenizer")
        check_dims(tcfg, resolution=resolution, text=text_cfg, vae=vae_cfg, where=str(folder))

        transformer = loading.load_model(SanaTransformer2DModel, tdir, dtype=dtype, device=device, adapter="SANA")
        text_encoder = None
        if load_text_encoders:
            import transformers

            klass = getattr(transformers, loading.config_class_name(
                loading.read_config(folder / "text_encoder")) or "Gemma2Model")
            model = loading.load_model(klass, folder / "text_encoder", dtype=dtype, device=device, frozen=True,
                                       adapter="SANA")
            if hasattr(model, "get_decoder") and not type(model).__name__.endswith("Model"):
                model = model.get_decoder()      # Gemma2ForCausalLM: the pipeline uses its hidden states
            text_encoder = TextEncoder("text_encoder", tokenizer, model)
        vae = None
        if vae_cfg is not None:
            vae = loading.load_model(AutoencoderDC, vae_dir, dtype=dtype, device=device, frozen=True, adapter="SANA")
        adapter = cls(transformer.config, resolution=resolution, vae=vae, prediction=prediction,
                      shift=shift, text_encoder=text_encoder,
                      max_sequence_length=max_sequence_length, complex_human_instruction=complex_human_instruction,
                      sigma_data=sched.get("sigma_data"), device=device, dtype=dtype, source=str(folder), **options)
        return adapter, transformer

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
        except KeyError:
            raise SenseflowError(f"SANA conditioning needs 'prompt_embeds' (+ 'prompt_attention_mask'), got "
                                 f"{sorted(cond.tensors)}: encode prompts with the SANA adapter") from None
        mask = cond.tensors.get("prompt_attention_mask")
        n = x_t.shape[0]
        caption = int(self.config["caption_channels"])
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != caption or prompt_embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the SANA transformer needs "
                                 f"[{n}, tokens, {caption}]: the prompt cache was built for another model")
        if mask is not None and tuple(mask.shape) != tuple(prompt_embeds.shape[:2]):
            raise SenseflowError(f"prompt_attention_mask has shape {tuple(mask.shape)} but prompt_embeds has "
                                 f"{tuple(prompt_embeds.shape[:2])} tokens")
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        dtype = loading.module_dtype(backbone)
        kwargs: dict[str, Any] = {}
        guidance = self._guidance_for(backbone, embedded_guidance, n, x_t.device)
        if guidance is not None:
            kwargs["guidance"] = guidance
        if self.prediction == "trigflow":
            x_in, t_flow = trigflow_to_flow(x_t, t)
            timestep = t_flow
        else:
            x_in, t_flow = x_t, t
            timestep = t * (1000.0 * float(self.config.get("timestep_scale", 1.0)))
        out = backbone(
            x_in.to(dtype),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            encoder_attention_mask=None if mask is None else mask.to(x_t.device),
            timestep=timestep.to(torch.float32),
            return_dict=False,
            **kwargs,
        )[0]
        if int(self.config.get("out_channels") or self.config["in_channels"]) // 2 == int(self.config["in_channels"]):
            out = out.chunk(2, dim=1)[0]            # learned sigma (the pipeline's rule)
        v = out.to(x_t.dtype)
        if self.prediction != "trigflow":
            return v
        # SanaSprintPipeline: flow velocity -> TrigFlow F (unit sigma_data)
        tt = expand_like(t_flow, v)
        return ((1 - 2 * tt) * x_in.to(v.dtype) + (1 - 2 * tt + 2 * tt ** 2) * v) / torch.sqrt(tt ** 2 + (1 - tt) ** 2)

    def _guidance_for(self, backbone: nn.Module, embedded: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """``guidance = g * guidance_embeds_scale`` for a backbone with the embedding; nothing otherwise."""
        if not has_guidance_embedding(backbone):
            if embedded is not None:
                raise SenseflowError("this SANA transformer has no guidance embedding (guidance_embeds=False): use cfg "
                                     "guidance")
            return None
        if embedded is None:
            if self.default_embedded_guidance is None:
                raise SenseflowError("this SANA transformer has a guidance embedding and needs an embedded guidance "
                                     "value (e.g. 4.5): set the method's guidance 'embedded'")
            embedded = torch.tensor(self.default_embedded_guidance)
        g = torch.as_tensor(embedded, dtype=torch.float32, device=device)
        g = g.expand(n) if g.ndim == 0 else g.reshape(n)
        return g * float(self.config.get("guidance_embeds_scale", 0.1))

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.text_encoder is not None

    def _padded_length(self, with_instruction: bool) -> int:
        if not with_instruction:
            return self.max_sequence_length
        chi = "\n".join(self.complex_human_instruction)
        return len(self.text_encoder.tokenizer.encode(chi)) + self.max_sequence_length - 2

    def _encode(self, prompts: Sequence[str], with_instruction: bool) -> Conditioning:
        """``SanaPipeline._get_gemma_prompt_embeds`` + ``encode_prompt``'s token selection (no_grad)."""
        enc = self.text_encoder
        if enc is None:
            raise SenseflowError("the SANA adapter was loaded without its text encoder (load_text_encoders=False): use "
                                 "a prompt cache, or load the teacher with its text encoder")
        texts = [p.lower().strip() for p in prompts]
        if with_instruction:
            chi = "\n".join(self.complex_human_instruction)
            texts = [chi + p for p in texts]
        enc.tokenizer.padding_side = "right"
        tokens = enc.tokenizer(texts, padding="max_length", max_length=self._padded_length(with_instruction),
                               truncation=True, add_special_tokens=True, return_tensors="pt")
        device = loading.module_device(enc.model)
        mask = tokens.attention_mask.to(device)
        with torch.no_grad():
            embeds = enc.model(tokens.input_ids.to(device), attention_mask=mask)[0]
        select = [0] + list(range(-self.max_sequence_length + 1, 0))
        return Conditioning({"prompt_embeds": embeds[:, select].to(device=self.device, dtype=self.dtype),
                             "prompt_attention_mask": mask[:, select].to(self.device)})

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``SanaPipeline.encode_prompt`` (with this adapter's instruction setting) for a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._encode(list(prompts), with_instruction=bool(self.complex_human_instruction))

    def unconditional(self, batch_size: int) -> Conditioning:
        """The encoded ``negative_prompt`` (``""``) without the instruction (cached), expanded to ``batch_size``."""
        if self._uncond is None:
            if self.text_encoder is None:
                raise SenseflowError("the SANA adapter has no text encoder and no cached empty-prompt embedding: call "
                                     "set_unconditional() with the prompt cache's entry for \"\"")
            self._uncond = self._encode([self.negative_prompt], with_instruction=False)
        return self._uncond.expand(batch_size)

    # -- latents -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        if self.vae_config is None:
            return 32
        return 2 ** (len(self.vae_config["encoder_block_out_channels"]) - 1)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (``vae.decode(z / scaling_factor)``); gradients flow."""
        vae = self._require_vae()
        z = latents.to(loading.module_dtype(vae)) / float(self.vae_config["scaling_factor"])
        return vae.decode(z, return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``vae.encode(x) * scaling_factor`` (deterministic: DC-AE has no posterior)."""
        vae = self._require_vae()
        z = vae.encode(images.to(loading.module_dtype(vae)), return_dict=False)[0]
        return (z * float(self.vae_config["scaling_factor"])).to(images.dtype)

    # -- structure -----------------------------------------------------------------------------
    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """DMD2's GAN head reads the image tokens of the middle transformer block (or ``layer``)."""
        patch = int(loading.config_of(backbone).get("patch_size", 1))
        return self.token_grid_tap(backbone, self.block_names(backbone), layer, patch=patch, index=0)

    # -- devices -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"SanaAdapter(source={self.source!r}, resolution={self.resolution}, prediction={self.prediction!r}, "
                f"schedule={self.schedule}, text_encoder={'yes' if self.text_encoder else 'no'}, "
                f"max_sequence_length={self.max_sequence_length}, "
                f"complex_human_instruction={'on' if self.complex_human_instruction else 'off'})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
#: SanaPipeline's default (the export snippet passes a value only where the student needs another one)
PIPELINE_MAX_SEQUENCE_LENGTH = 300


def export_call_kwargs(student, call: dict) -> None:
    """SanaPipeline arguments beyond the common ones (moved from ``export_diffusers.pipeline_call``)."""
    adapter = student.adapter
    max_sequence_length_kwarg(adapter, call, PIPELINE_MAX_SEQUENCE_LENGTH)
    call["use_resolution_binning"] = False
    chi = getattr(adapter, "complex_human_instruction", None)
    if not chi:
        call["complex_human_instruction"] = None
    elif tuple(chi) != tuple(DEFAULT_COMPLEX_HUMAN_INSTRUCTION):
        call["complex_human_instruction"] = list(chi)


def check_export(student) -> None:
    """Moved from ``export_diffusers.export_diffusers``."""
    if getattr(student.adapter, "prediction", "flow") == "trigflow":
        raise SenseflowError("SANA-Sprint (TrigFlow) students do not export to a stock pipeline yet: use "
                             "senseflow generate")


def load_from_config(config, device: torch.device) -> tuple[SanaAdapter, nn.Module]:
    """SANA / SANA-Sprint: flow or TrigFlow detected from the scheduler; ``teacher.shift`` overrides ``flow_shift``."""
    from ..build import loader_kwargs

    return SanaAdapter.from_pretrained(config.paths.teacher, **loader_kwargs(config, device, shift=config.teacher.shift))


# -------------------------------------------------------------------------------------------------
# the original single-file layout (``senseflow export --format single-file``)
# -------------------------------------------------------------------------------------------------
#: the original SANA's caption length (``model_max_length: 300``), the rows of ``y_embedder.y_embedding``
SANA_CAPTION_TOKENS = 300


def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The transformer in NVlabs/Sana's layout (``blocks.N.attn.qkv``, ``blocks.N.cross_attn.kv_linear``, ...).

    The inverse of diffusers' ``convert_sana_transformer_to_diffusers``, which also requires two
    tensors diffusers drops: ``pos_embed`` (written as the 2-D sin-cos table of the model's grid, what
    SANA computes at init; unused by ``use_pe=False`` models) and ``y_embedder.y_embedding`` (the
    caption-dropout embedding of training, written as zeros: a guidance-free student never uses an
    unconditional caption).  SANA-Sprint's guidance embedder / qk norms have no place in this layout
    and are refused.
    """
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from ..original_layout import KeyMap, block_ids

    m = KeyMap(state, "SANA single-file export")
    if m.has("patch_embed.pos_embed"):
        m.move("patch_embed.pos_embed", "pos_embed")
    else:
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        grid = int(config["sample_size"]) // int(config["patch_size"])
        table = get_2d_sincos_pos_embed(inner, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
        m.put("pos_embed", table.float().unsqueeze(0).to(state["patch_embed.proj.weight"].dtype))
    m.move("patch_embed.proj", "x_embedder.proj")
    m.move("time_embed.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
    m.move("time_embed.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
    m.move("time_embed.linear", "t_block.1")
    fc1 = m.take("caption_projection.linear_1.weight")
    m.put("y_embedder.y_proj.fc1.weight", fc1)
    m.move("caption_projection.linear_1.bias", "y_embedder.y_proj.fc1.bias")
    m.move("caption_projection.linear_2", "y_embedder.y_proj.fc2")
    m.put("y_embedder.y_embedding", torch.zeros(SANA_CAPTION_TOKENS, fc1.shape[1], dtype=fc1.dtype))
    m.move("caption_norm.weight", "attention_y_norm.weight")
    for i in block_ids(state, "transformer_blocks"):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        m.move(d + "scale_shift_table", o + "scale_shift_table")
        m.fuse([d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"], o + "attn.qkv", bias=False)
        m.move(d + "attn1.to_out.0", o + "attn.proj")
        m.move(d + "attn2.to_q", o + "cross_attn.q_linear")
        m.fuse([d + "attn2.to_k", d + "attn2.to_v"], o + "cross_attn.kv_linear", bias=True)
        m.move(d + "attn2.to_out.0", o + "cross_attn.proj")
        m.move(d + "ff.conv_inverted", o + "mlp.inverted_conv.conv")
        m.move(d + "ff.conv_depth", o + "mlp.depth_conv.conv")
        m.move(d + "ff.conv_point.weight", o + "mlp.point_conv.conv.weight")
    m.move("proj_out", "final_layer.linear")
    m.move("scale_shift_table", "final_layer.scale_shift_table")
    return m.finish()


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader="SanaTransformer2DModel",
    where="the NVlabs/Sana code base and UIs that load original SANA checkpoints (e.g. ComfyUI extensions); "
          "the Gemma-2 text encoder and DC-AE are loaded separately")


FAMILY = registry.FamilyDescriptor(
    name="sana",
    label="SANA",
    load=load_from_config,
    backbone_classes=("SanaTransformer2DModel",),
    pipeline_class="SanaPipeline",
    pipeline_prefixes=("Sana",),
    noise=registry.NoiseRecipe("generator"),
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, check=check_export,
                                 single_file=SINGLE_FILE),
    # target_modules: auto = the attention projections diffusers' LoRA training scripts target
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
