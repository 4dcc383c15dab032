"""LoRA settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.adapters.base import AdapterConfig

# module-name regexes, matched against the end of each module path inside the component
UNET_ATTENTION_FF = [
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
]
UNET_RESNET_CONVS = [r"resnets\.\d+\.conv[12]"]  # the 3x3 convolutions (LoCon-style)
TEXT_ENCODER_ATTENTION = [r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"]


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank update `W + (alpha / rank) * B A` on the targeted linears (through PEFT)."""

    target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_FF))
    resnet_convs: bool = False        # also the UNet's ResNet 3x3 convolutions
    rank: int = 4
    alpha: float | None = None        # None: alpha = rank (scale 1)
    dropout: float = 0.0
    text_encoder: bool = False        # also train LoRA on the text encoder's attention
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_ATTENTION))
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # "<component>.<module>" -> alpha, for imports

    def __post_init__(self) -> None:
        from studio.adapters.base import AdapterError

        if int(self.rank) < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
