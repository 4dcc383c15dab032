"""OFT through PEFT (`peft.OFTConfig`): each targeted linear's input is rotated by a block-diagonal
orthogonal matrix, each block R = cay(Q) of a skew Q, computed with PEFT's truncated Cayley–Neumann
series (OFTv2) unless `use_cayley_neumann` is off (then the exact Cayley inverse)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import OFTConfig
from peft.tuners.oft import OFTLayer

from studio.adapters.base import AdapterConfig, AdapterError, register
from studio.adapters.lora.config import UNET_ATTENTION_FF
from studio.adapters.peft_tuner import PeftTunerMethod


@dataclass
class OftConfig(AdapterConfig):
    """Orthogonal fine-tuning: block-diagonal rotations of `block_size` of each targeted linear's input."""

    target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_FF))
    block_size: int = 32
    use_cayley_neumann: bool = True    # OFTv2's Cayley–Neumann series instead of a matrix inverse
    num_cayley_neumann_terms: int = 5
    coft: bool = False                 # constrained OFT: ‖Q‖ kept below eps
    eps: float = 6e-5

    def __post_init__(self) -> None:
        if int(self.block_size) < 2:
            raise AdapterError(f"OFT block_size must be at least 2, got {self.block_size}")
        if int(self.num_cayley_neumann_terms) < 1:
            raise AdapterError(f"OFT num_cayley_neumann_terms must be at least 1, got {self.num_cayley_neumann_terms}")


@register
class OftMethod(PeftTunerMethod):
    name = "oft"
    config_class = OftConfig
    layer_class = OFTLayer
    presets = {"quick": {"lr": 2e-3, "adapter": {}}, "standard": {"lr": 1e-3, "adapter": {}}}

    def peft_config(self, config: OftConfig, targets) -> OFTConfig:
        return OFTConfig(r=0, oft_block_size=int(config.block_size), target_modules=targets,
                         use_cayley_neumann=config.use_cayley_neumann,
                         num_cayley_neumann_terms=int(config.num_cayley_neumann_terms), coft=config.coft,
                         eps=config.eps, init_weights=True)
