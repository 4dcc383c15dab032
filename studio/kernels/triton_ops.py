"""Triton kernels for the adapter linears (CUDA; on the CPU only under TRITON_INTERPRET=1, for checking)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_matmul_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R,
                        sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # Y[m, n] = Σ_k X[m, k] W[n, k] + Σ_r (Σ_k X[m, k] A[r, k]) B[n, r] (+ bias[n]): one pass over X serves both
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w_t = tl.load(w_ptr + offs_n[None, :] * swn + offs_k[:, None] * swk,
                      mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * sar + offs_k[:, None] * sak,
                      mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        acc_h = tl.dot(x, a_t, acc_h, input_precision=PRECISION)
    b_t = tl.load(b_ptr + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                  mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
    acc = tl.dot(acc_h.to(b_t.dtype), b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# Tile shapes tried once per (M, N, K, R, dtype) on a GPU: big tiles for the compute-bound shapes, small
# ones so that narrow layers still fill the SMs.
_TUNED = triton.autotune(configs=[
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3)]
], key=["M", "N", "K", "R", "PRECISION"])(_lora_matmul_kernel)


def _precision(dtype: torch.dtype, interpreted: bool) -> str:
    # fp32 in: three TF32 tensor-core products (≈ fp32 accuracy) on a GPU, plain FMAs in the interpreter;
    # half precision in: tensor cores with fp32 accumulation (the precision flag only concerns fp32)
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if interpreted else "tf32x3"


def lora_matmul(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + (x Aᵀ) Bᵀ + bias for 2-D x (M × K), W (N × K), A (R × K), B (N × R); any strides."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    interpreted = not x.is_cuda
    args = (x, weight, lora_a, lora_b, bias if bias is not None else x, y, M, N, K, R,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1))
    meta = dict(HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype, interpreted),
                BLOCK_R=max(16, triton.next_power_of_2(R)))
    if interpreted:  # the interpreter checks the arithmetic; one tile shape is enough there
        _lora_matmul_kernel[(triton.cdiv(M, 64), triton.cdiv(N, 64))](*args, **meta, BLOCK_M=64, BLOCK_N=64,
                                                                        BLOCK_K=32)
    else:
        _TUNED[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](*args, **meta)
    return y


@triton.jit
def _sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, T, NNZ, sgt, sgn, sxt, sxn,
                  BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    # out[e] = Σ_t G[t, rows[e]] · X[t, cols[e]]: the weight gradient at the trained entries only
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = offs_e < NNZ
    rows = tl.load(rows_ptr + offs_e, mask=live, other=0)
    cols = tl.load(cols_ptr + offs_e, mask=live, other=0)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        keep = (offs_t[:, None] < T) & live[None, :]
        g = tl.load(g_ptr + offs_t[:, None] * sgt + rows[None, :] * sgn, mask=keep, other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * sxt + cols[None, :] * sxn, mask=keep, other=0.0)
        acc += tl.sum(g.to(tl.float32) * x.to(tl.float32), axis=0)
    tl.store(out_ptr + offs_e, acc.to(out_ptr.dtype.element_ty), mask=live)


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(grad_yᵀ x)[rows, cols] for grad_y (T × out), x (T × in)."""
    nnz = rows.numel()
    out = torch.empty(nnz, device=x.device, dtype=x.dtype)
    if nnz:
        _sddmm_kernel[(triton.cdiv(nnz, 128),)](grad_y, x, rows, cols, out, x.shape[0], nnz,
                                                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
                                                BLOCK_E=128, BLOCK_T=32)
    return out
