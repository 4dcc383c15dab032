"""LoKr through PEFT (`peft.LoKrConfig`): ΔW = (alpha / rank)·(W1 ⊗ W2), W1 a small full matrix and W2 a rank-`rank`
product (`decompose_both` factors W1 too), the shapes split by `decompose_factor` (−1: as square as possible),
starting at zero. Files keep LyCORIS's tensor names (`lokr_w1`, `lokr_w2_a` …), which the kohya export writes as
ComfyUI and A1111 read them."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoKrConfig
from peft.tuners.lokr import LoKrLayer

from studio.adapters.base import AdapterConfig, AdapterError, register
from studio.adapters.lora.config import ATTENTION_FF
from studio.adapters.peft_tuner import ScalablePeftTunerMethod
from studio.utils.settings import setting


@dataclass
class LokrConfig(AdapterConfig):
    """LoKr of rank `rank` on the targeted linears."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_FF), advanced=True,
        help="denoiser (UNet or transformer) Linear modules that get a LoKr: regexes matching a module path or a "
             "dotted suffix of it")
    rank: int = setting(8, help="rank of the low-rank Kronecker factor (>= 1)")
    alpha: float | None = setting(None, help="scale numerator: the update is (alpha / rank)·…; empty: alpha = rank")
    decompose_both: bool = setting(False, help="also write the small factor as a low-rank product", advanced=True)
    decompose_factor: int = setting(-1, help="the Kronecker split of each dimension (-1: as square as possible)",
                                    advanced=True)

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise AdapterError(f"LoKr rank must be at least 1, got {self.rank}")
        self.rank, self.decompose_factor = int(self.rank), int(self.decompose_factor)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)


@register
class LokrMethod(ScalablePeftTunerMethod):
    name = "lokr"
    config_class = LokrConfig
    layer_class = LoKrLayer
    presets = {"quick": {"lr": 5e-3, "adapter": {"rank": 8}}, "standard": {"lr": 1e-3, "adapter": {"rank": 8}}}

    def peft_config(self, config: LokrConfig, targets) -> LoKrConfig:
        return LoKrConfig(r=config.rank, alpha=config.alpha, target_modules=targets, init_weights=True,
                          decompose_both=config.decompose_both, decompose_factor=config.decompose_factor)
