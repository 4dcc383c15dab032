"""OFT through PEFT (`peft.OFTConfig`): each targeted linear's input is rotated by a block-diagonal
orthogonal matrix, each block R = cay(Q) of a skew Q, computed with PEFT's truncated Cayley–Neumann
series (OFTv2) unless `use_cayley_neumann` is off (then the exact Cayley inverse)."""

from __future__ import annotations

from dataclasses import dataclass

from peft import OFTConfig
from peft.tuners.oft import OFTLayer

from studio.adapters.base import AdapterConfig, AdapterError, register
from studio.adapters.lora.config import ATTENTION_FF
from studio.adapters.peft_tuner import PeftTunerMethod
from studio.utils.settings import setting


@dataclass
class OftConfig(AdapterConfig):
    """Orthogonal fine-tuning: block-diagonal rotations of `block_size` of each targeted linear's input."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) Linear modules that OFT rotates: regexes matching a module path or a "
             "dotted suffix of it")
    block_size: int = setting(32, help="size of each orthogonal block of the rotation (>= 2; divides the input width)")
    use_cayley_neumann: bool = setting(True, help="OFTv2's Cayley–Neumann series instead of an exact matrix inverse",
                                       advanced=True)
    num_cayley_neumann_terms: int = setting(5, help="terms of the Cayley–Neumann series (>= 1)", advanced=True)
    coft: bool = setting(False, help="constrained OFT: keep ‖Q‖ below eps", advanced=True)
    eps: float = setting(6e-5, help="with coft: the bound on ‖Q‖ (how far the rotation may move)", advanced=True)

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
