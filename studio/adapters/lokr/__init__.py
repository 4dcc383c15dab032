"""LoKr (LyCORIS; Yeh et al. 2024) through PEFT: a Kronecker product of a small full factor and a low-rank one."""

from studio.adapters.lokr.model import LokrConfig, LokrMethod

__all__ = ["LokrConfig", "LokrMethod"]
