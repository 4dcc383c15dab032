"""Membranes are rank-1 LoRA adapters (through PEFT) on the transformer blocks' linears; what makes them
membranes is how they are trained (erase.py) and that their strength is set per prompt (transport.py)."""

from __future__ import annotations

from studio.adapters.base import register
from studio.adapters.lora.config import LoraConfig
from studio.adapters.lora.model import LoraMethod
from studio.adapters.spm.config import SpmConfig


def _lora_config(config: SpmConfig) -> LoraConfig:
    return LoraConfig(target_modules=list(config.target_modules), rank=config.rank)


def membranes(pipe) -> dict[str, list[str]]:
    """adapter name -> erased concepts, for every membrane attached to `pipe`."""
    if not hasattr(pipe, "_studio_membranes"):
        pipe._studio_membranes = {}
    return pipe._studio_membranes


@register
class SpmMethod(LoraMethod):
    name = "spm"
    config_class = SpmConfig
    kind = "erase"
    trained_by = "studio erase"
    presets = {}  # membranes are trained by `studio erase` (studio/adapters/spm/erase.py), not the concept engine

    def attach(self, pipe, config: SpmConfig, adapter: str) -> None:
        super().attach(pipe, _lora_config(config), adapter)
        membranes(pipe)[adapter] = list(config.concepts)

    def load_state_dict(self, pipe, adapter, tensors, config: SpmConfig | None = None, base=None,
                        source: str = "membrane") -> None:
        config = config or SpmConfig()
        super().load_state_dict(pipe, adapter, tensors, config=_lora_config(config), base=base, source=source)
        membranes(pipe)[adapter] = list(config.concepts)

    def remove(self, pipe, adapter: str) -> None:
        super().remove(pipe, adapter)
        membranes(pipe).pop(adapter, None)

    def unload(self, pipe) -> None:
        super().unload(pipe)
        membranes(pipe).clear()
