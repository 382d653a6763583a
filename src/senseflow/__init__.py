"""senseflow: few-step distillation of text-to-image diffusion and flow models.

SenseFlow (DMD2 + Implicit Distribution Alignment + Intra-Segment Guidance + a vision-foundation-model
discriminator) and Score identity Distillation for flow-matching DiTs (SiD-DiT, SiD2a).
"""

__version__ = "0.1.0"
