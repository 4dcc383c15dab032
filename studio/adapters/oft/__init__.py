"""OFT v2 (Qiu et al. 2023; Cayley–Neumann, input-centric, 2025) through PEFT: a comparison row for SODA."""

from studio.adapters.oft.model import OftConfig, OftMethod

__all__ = ["OftConfig", "OftMethod"]
