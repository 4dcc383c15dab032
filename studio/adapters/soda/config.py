"""SODA settings."""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters.base import AdapterConfig, AdapterError
from studio.adapters.lora.config import ATTENTION_FF, TEXT_ENCODER_ATTENTION
from studio.utils.settings import setting

ROTATE = ("input", "both")


@dataclass
class SodaConfig(AdapterConfig):
    """Spectrum-aware orthogonal fine-tuning (Zhang et al. 2024, SODA-SVD) of the targeted denoiser linears.

    Each weight W = U diag(S) Vᵀ (thin SVD, once, fp32) becomes W' = R_out (W + U diag(ReLU(S+δ)−S) Vᵀ) R_inᵀ:
    a trained shift δ of the singular values and rotations R = Q₁⊗…⊗Q_f of the singular bases, Kronecker
    products of `kron_factors` small orthogonal factors (sizes chosen per width, none above `max_factor`;
    see kron.kron_plan). `rotate` = "input" rotates the right (input) basis only, as the official code
    does; "both" also rotates the left (output) basis. The factors train with StiefelAdam at
    lr·`rotation_lr_scale`, δ with AdamW at lr. With `text_encoder` the CLIP encoders' attention projections are
    tuned too (the official recipe's `--train_text_encoder`), at lr·`text_encoder_lr_scale`."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) Linear modules that SODA tunes: regexes matching a module path or a "
             "dotted suffix of it")
    kron_factors: int = setting(3, help="orthogonal factors in each Kronecker rotation (>= 1)")
    max_factor: int = setting(64, help="largest size of one rotation factor (>= 2)", advanced=True)
    rotate: str = setting("input", choices=ROTATE,
                          help="which singular basis rotates: the input one (as the official code) or both")
    rotation_lr_scale: float = setting(1.0, help="learning rate of the rotations as a multiple of lr (> 0)")
    delta_init: float = setting(0.0, advanced=True,
                                help="start of the singular-value shifts δ (0 starts exactly on the base; "
                                     "the official code: 1e-3)")

    text_encoder: bool = setting(False, help="also tune the text encoders' attention projections (CLIP; SDXL: both), "
                                              "as the official recipe does")
    text_encoder_target_modules: list[str] = setting(
        default_factory=lambda: list(TEXT_ENCODER_ATTENTION), advanced=True,
        help="text-encoder Linear modules that SODA tunes (with text_encoder): regexes as for target_modules")
    text_encoder_lr_scale: float = setting(0.1, advanced=True,
                                           help="learning rate of the text encoders' δ and rotations as a multiple "
                                                "of the denoiser's (the official recipe: 5e-6 against 5e-5)")

    def __post_init__(self) -> None:
        if int(self.kron_factors) < 1:
            raise AdapterError(f"SODA kron_factors must be at least 1, got {self.kron_factors}")
        if int(self.max_factor) < 2:
            raise AdapterError(f"SODA max_factor must be at least 2, got {self.max_factor}")
        if self.rotate not in ROTATE:
            raise AdapterError(f"SODA rotate must be {' or '.join(ROTATE)}, got {self.rotate!r}")
        if not float(self.rotation_lr_scale) > 0:
            raise AdapterError(f"SODA rotation_lr_scale must be positive, got {self.rotation_lr_scale}")
        if not float(self.text_encoder_lr_scale) > 0:
            raise AdapterError(f"SODA text_encoder_lr_scale must be positive, got {self.text_encoder_lr_scale}")
        self.kron_factors, self.max_factor = int(self.kron_factors), int(self.max_factor)
        self.rotation_lr_scale, self.delta_init = float(self.rotation_lr_scale), float(self.delta_init)
        self.text_encoder_lr_scale = float(self.text_encoder_lr_scale)
