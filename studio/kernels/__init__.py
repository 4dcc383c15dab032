"""Fused adapter linears and the attention backend choice.

`lora_linear` and `sparse_delta_linear` run on one of three paths (`paths.kernel_path`): a plain-torch
reference, a fused torch path (the CPU default) and Triton kernels (the CUDA default). `STUDIO_KERNELS`
forces one.
"""

from studio.kernels.attention import apply_attention_backend, attention_backend
from studio.kernels.lora_linear import lora_linear, lora_linear_reference, stack_adapters
from studio.kernels.paths import kernel_path
from studio.kernels.sparse_delta import (SparsePattern, sparse_delta_conv2d, sparse_delta_linear,
                                        sparse_delta_linear_reference)

__all__ = ["SparsePattern", "apply_attention_backend", "attention_backend", "kernel_path", "lora_linear",
           "lora_linear_reference", "sparse_delta_conv2d", "sparse_delta_linear", "sparse_delta_linear_reference",
           "stack_adapters"]
