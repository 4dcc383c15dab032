"""Which implementation of the adapter linears runs: the plain reference, fused torch, or Triton."""

from __future__ import annotations

import importlib.util
import os

import torch

PATHS = ("reference", "fused", "triton")
ENV = "STUDIO_KERNELS"  # auto (default) | reference | fused | triton


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _forced() -> str:
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", *PATHS):
        raise ValueError(f"{ENV}={forced!r} is not one of auto, {', '.join(PATHS)}")
    return forced


def _auto(on_cuda: bool) -> str:
    return "triton" if on_cuda and triton_available() else "fused"


def kernel_path(x: torch.Tensor | None = None) -> str:
    """The path for a tensor on `x`'s device: `STUDIO_KERNELS` when set, else Triton on CUDA, fused elsewhere."""
    forced = _forced()
    on_cuda = x is not None and x.is_cuda
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        if not (on_cuda or triton_interpreted()):
            raise RuntimeError(f"{ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run Triton on the CPU")
        return "triton"
    return forced if forced != "auto" else _auto(on_cuda)


def describe() -> str:
    """One line for `studio info`."""
    forced = _forced()
    path = _auto(torch.cuda.is_available()) if forced == "auto" else f"{forced} (forced by {ENV})"
    return f"{path}; triton {'installed' if triton_available() else 'absent'}"
