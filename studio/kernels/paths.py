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


def auto_path(on_cuda: bool, dtype: torch.dtype = torch.float32, op: str = "lora") -> str:
    """Measured on an H100 (BENCHMARKS.md, B7 on CUDA): at SD-sized layers in half precision a linear is
    bound by the host's kernel launches, not the GPU, and the plain path (no Triton launcher, no extra
    copies) costs least; in fp32 the LoRA kernel's 3×TF32 tensor-core products beat cuBLAS's fp32 GEMM.
    The sparse delta's SDDMM kernel lost to the plain dense product at every measured density (0.2-20%), so the
    sparse delta runs the fused path there too: it takes that dense product in row blocks and, unlike the
    reference, saves no merged weight for backward (SaRA's memory saving). On the CPU the fused path wins
    everywhere."""
    if not on_cuda or op == "sparse":
        return "fused"
    return "triton" if dtype == torch.float32 and triton_available() else "reference"


def kernel_path(x: torch.Tensor | None = None, op: str = "lora") -> str:
    """The path for `x` (`op`: "lora" or "sparse"): `STUDIO_KERNELS` when set, else `auto_path`."""
    forced = _forced()
    on_cuda = x is not None and x.is_cuda
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        if not (on_cuda or triton_interpreted()):
            raise RuntimeError(f"{ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run Triton on the CPU")
        return "triton"
    return forced if forced != "auto" else auto_path(on_cuda, x.dtype if x is not None else torch.float32, op)


def describe() -> str:
    """One line for `studio info`."""
    forced = _forced()
    if forced != "auto":
        path = f"{forced} (forced by {ENV})"
    elif torch.cuda.is_available():
        path = (f"LoRA {auto_path(True, torch.float32)} in fp32, {auto_path(True, torch.float16)} in fp16/bf16, "
                f"sparse delta {auto_path(True, op='sparse')} (CUDA)")
    else:
        path = auto_path(False)
    return f"{path}; triton {'installed' if triton_available() else 'absent'}"
