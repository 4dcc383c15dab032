"""The attention backend: PyTorch SDPA (diffusers' default processor), xformers when installed on CUDA."""

from __future__ import annotations

import importlib.util
import os

import torch

ENV = "STUDIO_ATTENTION"  # auto (default) | sdpa | xformers


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def attention_backend(device: str | torch.device = "cpu") -> str:
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"{ENV}={forced!r} is not one of auto, sdpa, xformers")
    on_cuda = torch.device(device).type == "cuda"
    if forced == "xformers" and not (on_cuda and xformers_available()):
        raise RuntimeError(f"{ENV}=xformers needs CUDA and the xformers package (pip install 'studio[xformers]')")
    if forced != "auto":
        return forced
    return "xformers" if on_cuda and xformers_available() else "sdpa"


def apply_attention_backend(pipe, device: str | torch.device = "cpu") -> str:
    """Switch `pipe` to the best backend for `device` and return its name (SDPA is diffusers' default)."""
    backend = attention_backend(device)
    if backend == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    return backend
