"""SODA (Zhang et al. 2024): spectrum-aware orthogonal fine-tuning — singular-value shifts and Kronecker-
factored rotations of the singular bases, trained with StiefelAdam."""

from studio.adapters.soda import bake as _bake  # noqa: F401  (registers its baker)
from studio.adapters.soda.config import SodaConfig
from studio.adapters.soda.model import SodaMethod

__all__ = ["SodaConfig", "SodaMethod"]
