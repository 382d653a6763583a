"""Architecture presets for ``senseflow bench``: tiny models that run on a CPU, and REAL shapes.

A preset is a backbone config (the diffusers class and its ``config.json`` values), the latent
geometry (VAE factor, latent channels) and the shapes of the text conditioning.  Models are built
with RANDOM weights -- throughput, FLOPs and memory do not depend on the weight values -- and, for
the memory estimate, on the ``meta`` device (no memory, no compute).  Prompt conditioning is a
random tensor of the right shape: no text encoder is ever loaded.

Real shapes (the public ``transformer/config.json`` / ``unet/config.json`` of each release,
values that matter for shapes; anything not listed is the diffusers class default):

* ``sd35-medium`` -- ``stabilityai/stable-diffusion-3.5-medium``, ``SD3Transformer2DModel``
  (MMDiT-X): ``num_layers=24``, ``num_attention_heads=24``, ``attention_head_dim=64`` (width
  1536), ``caption_projection_dim=1536``, ``joint_attention_dim=4096``,
  ``pooled_projection_dim=2048``, ``in_channels=out_channels=16``, ``patch_size=2``,
  ``pos_embed_max_size=384``, ``sample_size=128``, ``qk_norm="rms_norm"``,
  ``dual_attention_layers=(0, ..., 12)`` (extra image self-attention in the first 13 blocks);
* ``sd35-large`` -- ``stabilityai/stable-diffusion-3.5-large``: ``num_layers=38``,
  ``num_attention_heads=38``, ``attention_head_dim=64`` (width 2432), ``caption_projection_dim=2432``,
  ``joint_attention_dim=4096``, ``pooled_projection_dim=2048``, ``in_channels=16``,
  ``pos_embed_max_size=192``, ``qk_norm="rms_norm"``, no dual attention;
  SD3.x text conditioning: 77 CLIP + 256 T5 tokens x 4096, pooled 2048 (CLIP-L 768 + CLIP-G 1280);
  VAE: 16 latent channels, factor 8;
* ``flux-dev`` -- ``black-forest-labs/FLUX.1-dev``, ``FluxTransformer2DModel``: ``num_layers=19``
  (double-stream) + ``num_single_layers=38``, ``num_attention_heads=24``, ``attention_head_dim=128``
  (width 3072), ``joint_attention_dim=4096``, ``pooled_projection_dim=768``, ``in_channels=64``
  (16 VAE channels x 2x2 packing), ``patch_size=1``, ``guidance_embeds=True``,
  ``axes_dims_rope=(16, 56, 56)``; text: 512 T5 tokens x 4096, CLIP-L pooled 768; the student and
  fake score drop the guidance embedder (the adapter's default);
* ``qwen-image`` -- ``Qwen/Qwen-Image``, ``QwenImageTransformer2DModel``: ``num_layers=60`` (double-stream),
  ``num_attention_heads=24``, ``attention_head_dim=128`` (width 3072), ``joint_attention_dim=3584``
  (Qwen2.5-VL-7B), ``in_channels=64`` (16 VAE channels x 2x2 packing), ``out_channels=16``,
  ``patch_size=2``, ``axes_dims_rope=(16, 56, 56)``, no guidance embedding; text: 512 tokens x 3584 (the
  pipeline's ``max_sequence_length`` cap), true CFG with a negative prompt; 20.430B parameters;
* ``sdxl`` -- ``stabilityai/stable-diffusion-xl-base-1.0``, ``UNet2DConditionModel``:
  ``block_out_channels=(320, 640, 1280)``, ``layers_per_block=2``,
  ``down_block_types=(DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D)``,
  ``up_block_types=(CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D)``,
  ``transformer_layers_per_block=(1, 2, 10)``, ``attention_head_dim=(5, 10, 20)``,
  ``cross_attention_dim=2048``, ``addition_embed_type="text_time"``,
  ``addition_time_embed_dim=256``, ``projection_class_embeddings_input_dim=2816``,
  ``use_linear_projection=True``, ``in_channels=out_channels=4``, ``sample_size=128``; text: 77 tokens
  x 2048 (CLIP-L 768 + CLIP-G 1280), pooled 1280, 6 time ids; VAE: 4 channels, factor 8.

* ``zimage`` -- ``Tongyi-MAI/Z-Image`` (Z-Image-Turbo has the same config), ``ZImageTransformer2DModel``
  (S3-DiT): ``dim=3840``, ``n_layers=30`` single-stream blocks + ``n_refiner_layers=2`` noise and 2
  context refiners, ``n_heads=n_kv_heads=30``, ``cap_feat_dim=2560`` (Qwen3-4B), ``in_channels=16``,
  patch 2, ``axes_dims=(32, 48, 48)``, ``axes_lens=(1536, 512, 512)``, ``rope_theta=256``; text: up to
  512 Qwen3 tokens x 2560 (all unmasked here: the upper bound); VAE: 16 channels, factor 8; scheduler:
  static shift 6.0.  6.155B parameters.

Parameter counts of these configs (counted on the meta device, see ``senseflow bench
--estimate-memory``): sd35-medium 2.24B, sd35-large 8.06B, flux-dev 11.90B (11.89B without the
guidance embedder), sdxl 2.57B -- the published sizes of those models.

Tiny presets (run anywhere in well under a second per step on a CPU): ``tiny`` (an SD3.5-style
``SD3Transformer2DModel``: 2 layers, width 32, qk_norm, one dual-attention layer), ``tiny-flux``,
``tiny-sdxl``, ``tiny-zimage`` and ``tiny-custom`` (the pure-PyTorch :func:`senseflow.teachers.custom.tiny_example`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..teachers.base import Conditioning, ModelAdapter, SenseflowError


class LatentSpace(nn.Module):
    """Stands in for a VAE: carries the VAE config (latent channels, downsampling), no weights.

    The adapters read the latent geometry from ``vae.config``; a benchmark never decodes.
    """

    def __init__(self, latent_channels: int, factor: int, scaling_factor: float = 1.0,
                 shift_factor: float | None = None) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        levels = max(1, factor.bit_length())  # 2 ** (levels - 1) == factor
        self.config = FrozenDict(latent_channels=latent_channels, block_out_channels=[1] * levels,
                                 scaling_factor=scaling_factor, shift_factor=shift_factor)

    def decode(self, *args, **kwargs):  # pragma: no cover - never called by the benchmark
        raise SenseflowError("the benchmark presets have no VAE (latent-space only)")

    encode = decode


@dataclass(frozen=True)
class Preset:
    """One architecture (see module docstring)."""

    name: str
    family: str                      # "sd3" | "flux" | "sdxl" | "custom"
    model_class: str                 # diffusers class name (or "TinyConditionalNet")
    config: dict[str, Any]
    latent_channels: int             # VAE latent channels (FLUX: before 2x2 packing)
    vae_factor: int                  # pixels per latent pixel
    text_tokens: int                 # prompt_embeds sequence length
    text_dim: int                    # prompt_embeds width
    pooled_dim: int                  # pooled_prompt_embeds width (0: none)
    default_resolution: int
    description: str
    real: bool = False               # real shapes (random weights) vs a tiny test model
    scheduler: dict[str, Any] = field(default_factory=dict)

    # -- geometry --------------------------------------------------------------------------------
    def check_resolution(self, resolution: int) -> None:
        mult = self.resolution_multiple
        if resolution <= 0 or resolution % mult:
            raise SenseflowError(f"preset {self.name}: resolution {resolution} is not a multiple of {mult}")

    @property
    def bench(self):
        """The family's :class:`~senseflow.teachers.registry.BenchRecipe` (``teachers/<family>.py``)."""
        from ..teachers import registry

        recipe = registry.get(self.family).bench
        if recipe is None:
            raise SenseflowError(f"preset {self.name}: family {self.family!r} has no benchmark recipe")
        return recipe

    @property
    def resolution_multiple(self) -> int:
        return self.bench.resolution_multiple(self)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae_factor
        return (self.latent_channels, side, side)

    def image_tokens(self, resolution: int) -> int:
        """Tokens the backbone's attention sees for the image (UNet: latent pixels at full resolution)."""
        return self.bench.image_tokens(self, resolution)

    # -- building ----------------------------------------------------------------------------------
    def model_cls(self) -> type[nn.Module]:
        if self.bench.model_cls is not None:
            return self.bench.model_cls()
        import diffusers
        return getattr(diffusers, self.model_class)

    def build_backbone(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0, config: dict[str, Any] | None = None) -> nn.Module:
        """The backbone with random weights (``device="meta"``: shapes only, nothing allocated).

        ``config`` replaces the preset's (e.g. :meth:`student_config`).
        """
        torch.manual_seed(seed)
        cls = self.model_cls()
        config = dict(self.config if config is None else config)
        with torch.device(device):
            model = cls.from_config(config) if self.bench.from_config else cls(**config)
        if dtype != torch.float32:
            model = _cast(model, dtype)
        return model.eval()

    def make_adapter(self, resolution: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> ModelAdapter:
        """The family's real adapter, configured for latent-space inputs and cached (random) prompts."""
        self.check_resolution(resolution)
        return self.bench.make_adapter(self, resolution, torch.device(device), dtype)

    def conditioning(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> Conditioning:
        """Random prompt conditioning of the right shapes (what a prompt cache would hold)."""
        g = torch.Generator().manual_seed(seed)
        if self.bench.conditioning is not None:   # a family with its own conditioning layout (custom)
            return self.bench.conditioning(self, batch, g, device, dtype)
        tensors = {"prompt_embeds": torch.randn(batch, self.text_tokens, self.text_dim, generator=g),
                   "pooled_prompt_embeds": torch.randn(batch, self.pooled_dim, generator=g)}
        cond = Conditioning({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()})
        return cond

    def backbone_inputs(self, batch: int, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments of one backbone forward, exactly as the family's adapter builds them.

        The first entry is the image input (the one that gets gradients in SiD's teacher pass).
        """
        config = self.config if config is None else config
        c, h, w = self.latent_shape(resolution)
        cond = self.conditioning(batch, device, dtype)
        x = torch.zeros(batch, c, h, w, device=device, dtype=dtype)
        t = torch.full((batch,), 0.5, device=device, dtype=torch.float32)
        return self.bench.backbone_inputs(self, x, t, cond, resolution, device, dtype, config)

    def student_config(self) -> dict[str, Any]:
        """Config of the trainable copies (FLUX: no guidance embedder, as the adapter builds them)."""
        if self.bench.student_config is not None:
            return self.bench.student_config(self)
        return dict(self.config)

    def block_names(self, backbone: nn.Module) -> list[str]:
        return self.make_adapter(self.default_resolution).block_names(backbone)


# -------------------------------------------------------------------------------------------------
# the presets
# -------------------------------------------------------------------------------------------------
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13)),
}
SD35_LARGE = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "qk_norm": "rms_norm", "dual_attention_layers": (),
}
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                  "use_dynamic_shifting": True}
#: Qwen/Qwen-Image transformer/config.json (= QwenImageTransformer2DModel's defaults in diffusers 0.42)
QWEN_IMAGE = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}
#: Qwen/Qwen-Image scheduler/scheduler_config.json (shift settings; mu = 0.694 at 1024 px)
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                        "use_dynamic_shifting": True}
TINY_QWEN_IMAGE = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6),
}
#: FLUX.2 (diffusers scripts/convert_flux2_to_diffusers.py configs; dev = the Flux2Transformer2DModel defaults)
FLUX2_DEV = {
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": True,
}
FLUX2_KLEIN_4B = {**FLUX2_DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                  "joint_attention_dim": 7680, "guidance_embeds": False}
FLUX2_KLEIN_9B = {**FLUX2_DEV, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                  "joint_attention_dim": 12288, "guidance_embeds": False}
FLUX2_SCHEDULER = {"use_dynamic_shifting": True, "time_shift_type": "exponential"}   # mu: compute_empirical_mu
SDXL_BASE = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu",
}

#: Tongyi-MAI/Z-Image transformer/config.json (Z-Image-Turbo publishes the same keys); diffusers' defaults otherwise
ZIMAGE = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}
#: Z-Image's scheduler: static shift 6 (Z-Image-Turbo: 3), no dynamic shifting
ZIMAGE_SCHEDULER = {"shift": 6.0, "use_dynamic_shifting": False}
TINY_ZIMAGE = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 4, "dim": 32, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32, "axes_dims": [4, 6, 6],
    "axes_lens": [1024, 64, 64],
}

TINY_SD3 = {
    "sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 32,
    "pooled_projection_dim": 32, "pos_embed_max_size": 32, "qk_norm": "rms_norm", "dual_attention_layers": (0,),
}
TINY_FLUX = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_FLUX2 = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 24, "timestep_guidance_channels": 16, "mlp_ratio": 2.0,
    "axes_dims_rope": (2, 2, 2, 2), "guidance_embeds": True,
}
TINY_SDXL = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (16, 32),
    "norm_num_groups": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 6 * 4 + 16, "transformer_layers_per_block": 1,
}
TINY_CUSTOM = {"channels": 3, "width": 32, "text_dim": 32, "depth": 3}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", "sd3", "SD3Transformer2DModel", TINY_SD3, latent_channels=4, vae_factor=8, text_tokens=16,
           text_dim=32, pooled_dim=32, default_resolution=128,
           description="tiny SD3.5-style MMDiT (2 layers, width 32, qk_norm, 1 dual-attention layer)"),
    Preset("tiny-flux", "flux", "FluxTransformer2DModel", TINY_FLUX, latent_channels=4, vae_factor=8,
           text_tokens=16, text_dim=32, pooled_dim=16, default_resolution=128,
           scheduler={"base_image_seq_len": 16, "max_image_seq_len": 256, "base_shift": 0.5, "max_shift": 1.15},
           description="tiny FLUX.1-style transformer (1 double + 2 single blocks, width 32, guidance embedding)"),
    Preset("tiny-sdxl", "sdxl", "UNet2DConditionModel", TINY_SDXL, latent_channels=4, vae_factor=8, text_tokens=16,
           text_dim=32, pooled_dim=16, default_resolution=128,
           description="tiny SDXL-style UNet (2 levels, text_time conditioning)"),
    Preset("tiny-custom", "custom", "TinyConditionalNet", TINY_CUSTOM, latent_channels=3, vae_factor=1,
           text_tokens=1, text_dim=32, pooled_dim=0, default_resolution=16,
           description="the pure-PyTorch tiny_example conv net (pixel space)"),
    Preset("sd35-medium", "sd3", "SD3Transformer2DModel", SD35_MEDIUM, latent_channels=16, vae_factor=8,
           text_tokens=77 + 256, text_dim=4096, pooled_dim=2048, default_resolution=1024, real=True,
           description="Stable Diffusion 3.5 Medium (MMDiT-X, 24 layers, width 1536)"),
    Preset("sd35-large", "sd3", "SD3Transformer2DModel", SD35_LARGE, latent_channels=16, vae_factor=8,
           text_tokens=77 + 256, text_dim=4096, pooled_dim=2048, default_resolution=1024, real=True,
           description="Stable Diffusion 3.5 Large (MMDiT, 38 layers, width 2432)"),
    Preset("flux-dev", "flux", "FluxTransformer2DModel", FLUX_DEV, latent_channels=16, vae_factor=8,
           text_tokens=512, text_dim=4096, pooled_dim=768, default_resolution=1024, real=True,
           scheduler=FLUX_SCHEDULER,
           description="FLUX.1-dev (19 double + 38 single blocks, width 3072)"),
    Preset("tiny-qwenimage", "qwenimage", "QwenImageTransformer2DModel", TINY_QWEN_IMAGE, latent_channels=4,
           vae_factor=8, text_tokens=16, text_dim=32, pooled_dim=0, default_resolution=128,
           scheduler={"base_image_seq_len": 16, "max_image_seq_len": 256, "base_shift": 0.5, "max_shift": 0.9},
           description="tiny Qwen-Image-style MMDiT (2 blocks, width 32)"),
    Preset("qwen-image", "qwenimage", "QwenImageTransformer2DModel", QWEN_IMAGE, latent_channels=16, vae_factor=8,
           text_tokens=512, text_dim=3584, pooled_dim=0, default_resolution=1024, real=True,
           scheduler=QWEN_IMAGE_SCHEDULER,
           description="Qwen-Image (60 double-stream blocks, width 3072; 512 Qwen2.5-VL tokens, the pipeline's cap)"),
    # FLUX.2: latent_channels / vae_factor describe the PATCHIFIED latent (4 x 32 channels, 8 x 2 pixels per token)
    Preset("tiny-flux2", "flux2", "Flux2Transformer2DModel", TINY_FLUX2, latent_channels=16, vae_factor=16,
           text_tokens=16, text_dim=24, pooled_dim=0, default_resolution=128, scheduler=FLUX2_SCHEDULER,
           description="tiny FLUX.2-style transformer (1 double + 2 single blocks, width 16, guidance embedding)"),
    Preset("flux2-dev", "flux2", "Flux2Transformer2DModel", FLUX2_DEV, latent_channels=128, vae_factor=16,
           text_tokens=512, text_dim=15360, pooled_dim=0, default_resolution=1024, real=True,
           scheduler=FLUX2_SCHEDULER, description="FLUX.2-dev (8 double + 48 single blocks, width 6144)"),
    Preset("flux2-klein-4b", "flux2", "Flux2Transformer2DModel", FLUX2_KLEIN_4B, latent_channels=128,
           vae_factor=16, text_tokens=512, text_dim=7680, pooled_dim=0, default_resolution=1024, real=True,
           scheduler=FLUX2_SCHEDULER, description="FLUX.2-klein 4B (5 double + 20 single blocks, width 3072)"),
    Preset("flux2-klein-9b", "flux2", "Flux2Transformer2DModel", FLUX2_KLEIN_9B, latent_channels=128,
           vae_factor=16, text_tokens=512, text_dim=12288, pooled_dim=0, default_resolution=1024, real=True,
           scheduler=FLUX2_SCHEDULER, description="FLUX.2-klein 9B (8 double + 24 single blocks, width 4096)"),
    Preset("tiny-zimage", "zimage", "ZImageTransformer2DModel", TINY_ZIMAGE, latent_channels=4, vae_factor=8,
           text_tokens=16, text_dim=32, pooled_dim=0, default_resolution=128, scheduler=ZIMAGE_SCHEDULER,
           description="tiny Z-Image-style single-stream DiT (1+1 refiner, 2 main blocks, width 32)"),
    Preset("zimage", "zimage", "ZImageTransformer2DModel", ZIMAGE, latent_channels=16, vae_factor=8, text_tokens=512,
           text_dim=2560, pooled_dim=0, default_resolution=1024, real=True, scheduler=ZIMAGE_SCHEDULER,
           description="Z-Image 6B (S3-DiT: 2+2 refiner + 30 single-stream blocks, width 3840; 512 caption tokens)"),
    Preset("sdxl", "sdxl", "UNet2DConditionModel", SDXL_BASE, latent_channels=4, vae_factor=8, text_tokens=77,
           text_dim=2048, pooled_dim=1280, default_resolution=1024, real=True,
           description="Stable Diffusion XL base 1.0 UNet"),
)}


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` without diffusers' from_pretrained-oriented warning."""
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:  # pragma: no cover
        return model.to(dtype=dtype)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return model.to(dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SenseflowError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def count_parameters(module: nn.Module, predicate: Callable[[str], bool] | None = None) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for n, p in module.named_parameters() if predicate is None or predicate(n))


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())




# -------------------------------------------------------------------------------------------------
# method settings per family
# -------------------------------------------------------------------------------------------------
def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def method_config(name: str, family: str, overrides: dict[str, Any] | None = None):
    """The method's config (library defaults, the family's BenchRecipe.method_defaults, then ``overrides``; dotted keys nest)."""
    from pydantic import ValidationError

    from ..methods import DMD2Config, SenseFlowConfig, SiDConfig

    classes = {"dmd2": DMD2Config, "senseflow": SenseFlowConfig, "sid": SiDConfig}
    if name not in classes:
        raise SenseflowError(f"unknown method {name!r}; available: {', '.join(classes)}")
    from ..teachers import registry

    bench = registry.get(family).bench     # the family's method defaults (FLUX: embedded guidance)
    data: dict[str, Any] = dict(bench.method_defaults.get(name, {})) if bench is not None else {}
    for key, value in _nest(overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return classes[name].model_validate(data)
    except ValidationError as exc:
        raise SenseflowError(f"method setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


__all__ = ["LatentSpace", "PRESETS", "Preset", "count_parameters", "get_preset",
           "method_config", "parameter_bytes"]
