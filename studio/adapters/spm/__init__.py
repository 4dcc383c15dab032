"""SPM: concept-erasing semi-permeable membranes (rank-1 adapters, per-prompt permeability)."""

from studio.adapters.spm.config import SpmConfig
from studio.adapters.spm.model import SpmMethod

__all__ = ["SpmConfig", "SpmMethod"]
