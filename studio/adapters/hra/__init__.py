"""HRA (Yuan et al. 2024, Householder reflection adaptation) through PEFT: a comparison row for SODA."""

from studio.adapters.hra.model import HraConfig, HraMethod

__all__ = ["HraConfig", "HraMethod"]
