"""LoHa through PEFT (`peft.LoHaConfig`): ΔW = (alpha / rank)·(W1a·W1b) ⊙ (W2a·W2b), two rank-`rank` products
multiplied element by element (rank² expressiveness for 2·rank parameters per side), starting at zero. Files keep
LyCORIS's tensor names (`hada_w1_a` …), which the kohya export writes as ComfyUI and A1111 read them."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoHaConfig
from peft.tuners.loha import LoHaLayer

from studio.adapters.base import AdapterConfig, AdapterError, register
from studio.adapters.lora.config import ATTENTION_FF
from studio.adapters.peft_tuner import ScalablePeftTunerMethod
from studio.utils.settings import setting


@dataclass
class LohaConfig(AdapterConfig):
    """LoHa of rank `rank` on the targeted linears."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) Linear modules that get a LoHa: regexes matching a module path or a "
             "dotted suffix of it")
    rank: int = setting(8, help="rank of each of the two factors (>= 1)")
    alpha: float | None = setting(None, help="scale numerator: the update is (alpha / rank)·…; empty: alpha = rank")

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise AdapterError(f"LoHa rank must be at least 1, got {self.rank}")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)


@register
class LohaMethod(ScalablePeftTunerMethod):
    name = "loha"
    config_class = LohaConfig
    layer_class = LoHaLayer
    presets = {"quick": {"lr": 5e-3, "adapter": {"rank": 8}}, "standard": {"lr": 1e-3, "adapter": {"rank": 8}}}

    def peft_config(self, config: LohaConfig, targets) -> LoHaConfig:
        return LoHaConfig(r=config.rank, alpha=config.alpha, target_modules=targets, init_weights=True)
