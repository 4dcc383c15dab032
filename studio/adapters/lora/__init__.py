"""LoRA (Hu et al. 2021) through PEFT: the baseline every other method is compared with."""

from studio.adapters.lora.config import LoraConfig
from studio.adapters.lora.model import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
