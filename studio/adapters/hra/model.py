"""HRA through PEFT (`peft.HRAConfig`): each targeted weight is multiplied by a chain of `rank` Householder
reflections, W' = W·∏(I − 2uᵢuᵢᵀ/‖uᵢ‖²), starting at the identity (pairs of equal vectors)."""

from __future__ import annotations

from dataclasses import dataclass

from peft import HRAConfig
from peft.tuners.hra import HRALayer

from studio.adapters.base import AdapterConfig, AdapterError, register
from studio.adapters.lora.config import ATTENTION_FF
from studio.adapters.peft_tuner import PeftTunerMethod
from studio.utils.settings import setting


@dataclass
class HraConfig(AdapterConfig):
    """Householder reflection adaptation of rank `rank` (even: the identity start pairs equal vectors)."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) Linear modules that HRA adapts: regexes matching a module path or a "
             "dotted suffix of it")
    rank: int = setting(8, help="number of Householder reflections per layer (even, >= 2)")
    apply_gs: bool = setting(False, help="Gram–Schmidt on the reflection vectors, so H = I − 2UUᵀ exactly",
                             advanced=True)

    def __post_init__(self) -> None:
        if int(self.rank) < 2 or int(self.rank) % 2:
            raise AdapterError(f"HRA rank must be an even number ≥ 2 (it starts at the identity with pairs of "
                               f"equal reflections), got {self.rank}")
        self.rank = int(self.rank)


@register
class HraMethod(PeftTunerMethod):
    name = "hra"
    config_class = HraConfig
    layer_class = HRALayer
    presets = {"quick": {"lr": 2e-3, "adapter": {"rank": 8}}, "standard": {"lr": 1e-3, "adapter": {"rank": 8}}}

    def peft_config(self, config: HraConfig, targets) -> HRAConfig:
        return HRAConfig(r=config.rank, apply_GS=config.apply_gs, target_modules=targets, init_weights=True)
