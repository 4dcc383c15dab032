"""The LoRA-family linear y = W x + b + Σ sᵢ·Bᵢ(Aᵢ x), forward and backward, on three paths.

Several adapters on one layer are one adapter of the summed rank: `stack_adapters` concatenates the Aᵢ and
the sᵢ-scaled Bᵢ, so one pair of thin matmuls serves them all. The fused path writes the low-rank term into
the base output with `addmm_` (no T×out temporaries), or, where the call has many tokens for the layer's
size, adds B·A into a copy of W for this call and runs one GEMM (see `merge_pays`); the Triton kernel
computes both terms in one pass over x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.kernels.paths import kernel_path


def stack_adapters(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                   scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of summed rank with B·A = Σ sᵢ·Bᵢ·Aᵢ; gradients flow back to every Aᵢ, Bᵢ."""
    if len(lora_a) == 1:
        return lora_a[0], lora_b[0] * scales[0]
    return torch.cat(lora_a, 0), torch.cat([b * s for b, s in zip(lora_b, scales)], 1)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b)


# where merging starts to pay, in T·(in + out) / (in·out); measured on the CPU, both ways side by side at every
# B7 shape (2026-11-24): a forward gains from about 1.2; a training step keeps the four thin products that give
# A's and B's gradients and trades only the two accumulations for two merges, so it gains from about 3, and only
# at higher ranks (rank 64: merged faster at 11 of 12 such shapes; rank 16: even; rank 4: thin faster at 16 of 18)
MERGE_AT = {"inference": 1.5, "training": 3.0}
TRAINING_MERGE_MIN_RANK = 16


def merge_pays(tokens: int, fan_in: int, fan_out: int, rank: int, training: bool = False) -> bool:
    """Whether W + B·A, made afresh for this call, beats the thin products. Those read every token's
    activations to do 2·rank FLOPs per element, so they run at memory speed and cost T·(in + out) element
    reads; the merge touches the weight's in·out elements whatever T is, and the GEMM then costs what the bare
    linear does. Training the adapter keeps the thin products that give A's and B's gradients, so it needs
    more tokens and a higher rank (a frozen adapter in a graph that trains something else does not: its input
    gradient is one GEMM with the merged weight)."""
    if training and rank < TRAINING_MERGE_MIN_RANK:
        return False
    return tokens * (fan_in + fan_out) >= MERGE_AT["training" if training else "inference"] * fan_in * fan_out


def _merged_forward(x: torch.Tensor, weight, bias, lora_a, lora_b) -> torch.Tensor:
    return F.linear(x, torch.addmm(weight, lora_b, lora_a), bias)


# The unmerged form: the bare GEMM (bias included), then the low-rank term accumulated onto it from
# tokens × rank activations. Measured on this CPU (2026-11-24, ad hoc, 256–1024 tokens, rank 4–64) faster than
# the rank-leading products (A xᵀ) with the low-rank term written first, which an earlier torch/BLAS favoured,
# at all but one of 48 shapes.

def _thin_forward(x: torch.Tensor, weight, bias, lora_a, lora_b) -> tuple[torch.Tensor, torch.Tensor]:
    """W x + b + B(A x), and (A x)ᵀ for the backward (rank × tokens, a view)."""
    h = x.reshape(-1, x.shape[-1]) @ lora_a.t()
    y = F.linear(x, weight, bias)
    y.view(-1, weight.shape[0]).addmm_(h, lora_b.t())
    return y, h.t()


class _FusedLoraLinear(torch.autograd.Function):
    # results are written into tensors of their final shape: a returned view would be copied by autograd
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, path: str):
        x2 = x.reshape(-1, x.shape[-1])
        h_t = None
        if path == "triton":
            from studio.kernels.triton_ops import lora_matmul
            y = lora_matmul(x2, weight, lora_a, lora_b, bias).view(*x.shape[:-1], weight.shape[0])
        elif path == "merged":
            y = _merged_forward(x, weight, bias, lora_a, lora_b)
        else:
            y, h_t = _thin_forward(x, weight, bias, lora_a, lora_b)
        ctx.path = path
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h_t)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, h_t = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        merged = ctx.path == "merged"
        gh_t = lora_b.t() @ g2.t() if (need_a or (need_x and not merged)) else None
        if need_x:
            if ctx.path == "triton":  # dY·W + (dY·B)·A is the forward's shape with transposed operands
                from studio.kernels.triton_ops import lora_matmul
                grad_x = lora_matmul(g2, weight.t(), lora_b.t(), lora_a.t(), None)
                grad_x = grad_x.view(*grad_y.shape[:-1], weight.shape[1])
            elif merged:  # dY·(W + B·A), the merged weight made again rather than kept
                grad_x = (g2 @ torch.addmm(weight, lora_b, lora_a)).view(*grad_y.shape[:-1], weight.shape[1])
            else:
                grad_x = g2.new_empty(*grad_y.shape[:-1], weight.shape[1])
                torch.mm(gh_t.t(), lora_a, out=grad_x.view(-1, weight.shape[1])).addmm_(g2, weight)
        if need_w:
            grad_w = g2.t() @ x2
        if need_b:
            grad_bias = g2.sum(0)
        if need_a:
            grad_a = gh_t @ x2
        if need_lb:
            grad_lb = ((h_t if h_t is not None else lora_a @ x2.t()) @ g2).t()
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """W x + b + B(A x) with A (rank × in) and B (out × rank), the scale already in B (see `stack_adapters`).
    On the fused path, calls with many tokens for the layer's size run merged (`merge_pays`)."""
    path = path or kernel_path(x)
    if path == "reference":
        return lora_linear_reference(x, weight, bias, lora_a, lora_b)
    if path == "triton" and lora_a.shape[0] > 128:  # the kernel keeps A·x for a row block in registers
        path = "fused"
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b))
    trains_adapter = grads and (lora_a.requires_grad or lora_b.requires_grad)
    if path == "fused" and merge_pays(x.numel() // x.shape[-1], weight.shape[1], weight.shape[0], lora_a.shape[0],
                                      trains_adapter):
        path = "merged"
    if not grads:  # inference: no autograd node to build
        if path == "merged":
            return _merged_forward(x, weight, bias, lora_a, lora_b)
        if path == "triton":
            from studio.kernels.triton_ops import lora_matmul
            x2 = x.reshape(-1, x.shape[-1])
            return lora_matmul(x2, weight, lora_a, lora_b, bias).view(*x.shape[:-1], weight.shape[0])
        return _thin_forward(x, weight, bias, lora_a, lora_b)[0]
    return _FusedLoraLinear.apply(x, weight, bias, lora_a, lora_b, path)
