"""SaRA (Hu et al. 2024): sparse fine-tuning of the smallest weights, with a nuclear-norm penalty."""

from studio.adapters.sara import bake as _bake  # noqa: F401  (registers its baker)
from studio.adapters.sara.config import SaraConfig
from studio.adapters.sara.model import SaraMethod

__all__ = ["SaraConfig", "SaraMethod"]
