"""LoRA settings."""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters.base import AdapterConfig
from studio.utils.settings import setting

# module-name regexes, matched against the end of each module path inside the component (base.matches_target:
# a whole path or a suffix starting after a dot, so the UNet's attn1/attn2 patterns match nothing on a diffusion
# transformer and the transformers' patterns nothing on a UNet)
ATTENTION_FF = [
    # UNet (SD 1.x / 2.x / SDXL) transformer blocks: self- and cross-attention
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    # SD3 / Flux joint blocks: the image stream's attention and the text stream's (add_*, to_add_out)
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    # the feed-forwards: the UNet's and the joint blocks' `ff`, and the joint blocks' text-stream `ff_context`
    r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)",
    # Flux's single-stream blocks
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)",
]
UNET_ATTENTION_FF = ATTENTION_FF  # the name it had when only UNets were adapted
UNET_RESNET_CONVS = [r"resnets\.\d+\.conv[12]"]  # the 3x3 convolutions (LoCon-style)
TEXT_ENCODER_ATTENTION = [r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"]


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank update `W + (alpha / rank) * B A` on the targeted linears (through PEFT)."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) modules that get a LoRA: regexes matching a module path or a dotted "
             "suffix of it")
    resnet_convs: bool = setting(False, help="also put LoRA on the UNet's ResNet 3x3 convolutions (LoCon-style; "
                                             "a UNet only: diffusion transformers have none)")
    rank: int = setting(4, help="rank of the low-rank update B·A (>= 1; larger learns more, file grows linearly)")
    alpha: float | None = setting(None, help="scale numerator: the update is (alpha / rank)·B·A; empty: alpha = rank")
    dora: bool = setting(False, help="DoRA (Liu et al. 2024): a trained magnitude per output beside the low-rank "
                                     "direction update, W' = m·(W + s·BA)/‖W + s·BA‖ (through PEFT's use_dora)")
    dropout: float = setting(0.0, help="dropout on the LoRA branch's input while training, in [0, 1)", advanced=True)
    text_encoder: bool = setting(
        False, help="also train a LoRA on the text encoder's attention projections (both encoders on SDXL)")
    text_encoder_target_modules: list[str] = setting(
        default_factory=lambda: list(TEXT_ENCODER_ATTENTION), advanced=True,
        help="text-encoder modules that get a LoRA (with text_encoder): regexes as for target_modules")
    alpha_pattern: dict[str, float] = setting(
        default_factory=dict, advanced=True,
        help="per-module alpha, '<component>.<module path>' -> alpha (set when importing kohya/diffusers files)")

    def __post_init__(self) -> None:
        from studio.adapters.base import AdapterError

        if int(self.rank) < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
