"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara) through PEFT: a Hadamard product of two low-rank updates."""

from studio.adapters.loha.model import LohaConfig, LohaMethod

__all__ = ["LohaConfig", "LohaMethod"]
