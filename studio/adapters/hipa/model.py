"""The HiPA adaptor is a LoRA (through PEFT) on the attention projections; what makes it one-step is how it
is trained (distill.py) and that it is called once, at the last training timestep (schedule.py)."""

from __future__ import annotations

from studio.adapters.base import register
from studio.adapters.hipa.config import HipaConfig
from studio.adapters.lora.config import LoraConfig
from studio.adapters.lora.model import LoraMethod


def lora_config(config: HipaConfig) -> LoraConfig:
    return LoraConfig(target_modules=list(config.target_modules), rank=config.rank)


@register
class HipaMethod(LoraMethod):
    name = "hipa"
    config_class = HipaConfig
    kind = "one-step"
    trained_by = "studio distill"
    presets = {}  # trained by `studio distill` (studio/adapters/hipa/distill.py), not the concept engine

    def attach(self, pipe, config: HipaConfig, adapter: str) -> None:
        super().attach(pipe, lora_config(config), adapter)

    def load_state_dict(self, pipe, adapter, tensors, config: HipaConfig | None = None, base=None,
                        source: str = "one-step adaptor") -> None:
        super().load_state_dict(pipe, adapter, tensors, config=lora_config(config or HipaConfig()), base=base,
                                source=source)
