"""The sparse-delta linear y = (W + ΔW) x + b, with ΔW stored as flat indices + values (SaRA-style updates).

Forward scatters the values into a transient copy of W (one matmul, nothing kept). Backward needs the
values' gradient only at the trained entries, (dYᵀX)[M]: a sampled dense-dense product (SDDMM) over the
mask. On the CPU that is `torch.sparse.sampled_addmm` below `SAMPLED_BELOW` density and the dense product
plus a gather above it (measured: the dense GEMM wins once ~5% of the entries are trained), the product taken
in blocks of output rows so that no weight-sized gradient is ever held (`CHUNK_ELEMENTS`). The fused path saves
only the input, the frozen weight (the parameter itself, not a copy) and the values; the merged weight is rebuilt
where it is needed. It is the default on CUDA too (`paths.auto_path`); the Triton SDDMM kernel runs when forced.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from studio.kernels.paths import kernel_path

SAMPLED_BELOW = 0.05
CHUNK_ELEMENTS = 1 << 20  # the largest block of a weight gradient formed at once (4 MB in fp32)


class SparsePattern:
    """Which entries of an (out, in) weight are trained: sorted unique flat indices. Row, column and CSR
    forms are derived when a gradient needs them (kept as int64 they would cost 3× the index)."""

    def __init__(self, index: torch.Tensor, shape: tuple[int, int]):
        self.index, self.shape = index, (int(shape[0]), int(shape[1]))

    @classmethod
    def from_index(cls, index: torch.Tensor, shape: tuple[int, int]) -> "SparsePattern":
        index = torch.unique(index.reshape(-1).long())  # sorted: CSR order
        out_features, in_features = shape
        if index.numel() and (index[0] < 0 or index[-1] >= out_features * in_features):
            raise ValueError(f"sparse indices fall outside a {out_features}×{in_features} weight")
        return cls(index, (out_features, in_features))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparsePattern":
        return cls.from_index(mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape))

    @property
    def rows(self) -> torch.Tensor:
        return torch.div(self.index, self.shape[1], rounding_mode="floor")

    @property
    def cols(self) -> torch.Tensor:
        return self.index % self.shape[1]

    @property
    def crow(self) -> torch.Tensor:
        return torch._convert_indices_from_coo_to_csr(self.rows, self.shape[0])

    @property
    def density(self) -> float:
        return self.index.numel() / (self.shape[0] * self.shape[1])


def dense_delta(values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    flat = values.new_zeros(pattern.shape[0] * pattern.shape[1]).index_put((pattern.index,), values)
    return flat.view(pattern.shape)


def sparse_delta_linear_reference(x, weight, bias, values, pattern: SparsePattern) -> torch.Tensor:
    return F.linear(x, weight + dense_delta(values, pattern), bias)


class _SparseDeltaConv2d(torch.autograd.Function):
    """conv2d with weight W + ΔW (ΔW at `index`): the merged weight is rebuilt in backward, not kept, and
    the values' gradient is the weight gradient read at the trained entries."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, index, conv):
        merged = weight.reshape(-1).index_add(0, index, values).view_as(weight)
        ctx.conv, ctx.index = conv, index
        ctx.save_for_backward(x, weight, values)
        return F.conv2d(x, merged, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, values = ctx.saved_tensors
        conv, index = ctx.conv, ctx.index
        need_x, _, need_b, need_v, _, _ = ctx.needs_input_grad
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        grad_x = grad_b = grad_v = None
        if need_x:
            merged = weight.reshape(-1).index_add(0, index, values).view_as(weight)
            grad_x = torch.nn.grad.conv2d_input(x.shape, merged, grad_y, *args)
        if need_b:
            grad_b = grad_y.sum((0, 2, 3))
        if need_v:
            grad_v = _conv_values_grad(x, weight, grad_y, index, conv)
        return grad_x, None, grad_b, grad_v, None, None


def _conv_values_grad(x, weight, grad_y, index, conv) -> torch.Tensor:
    """The conv weight's gradient at `index`, formed a block of output channels at a time (groups = 1)."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.groups != 1:
        return torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, *args).reshape(-1)[index]
    pattern = SparsePattern(index, (weight.shape[0], weight[0].numel()))
    return _blockwise_sampled(lambda r0, r1: torch.nn.grad.conv2d_weight(
        x, (r1 - r0, *weight.shape[1:]), grad_y[:, r0:r1], *args), pattern, x)


def sparse_delta_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, values: torch.Tensor, index: torch.Tensor,
                        path: str | None = None) -> torch.Tensor:
    """`conv` with its weight plus `values` at the flat `index` (padding mode "zeros")."""
    if (path or kernel_path(x, op="sparse")) == "reference":
        merged = conv.weight.reshape(-1).index_add(0, index, values).view_as(conv.weight)
        return conv._conv_forward(x, merged, conv.bias)
    return _SparseDeltaConv2d.apply(x, conv.weight, conv.bias, values, index, conv)


def sampled_grad(grad_y: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, use_triton: bool) -> torch.Tensor:
    """(grad_yᵀ x) at the pattern's entries, for 2-D grad_y (T × out) and x (T × in)."""
    if use_triton:
        from studio.kernels.triton_ops import sddmm
        return sddmm(grad_y, x, pattern.rows, pattern.cols)
    if pattern.density < SAMPLED_BELOW and not grad_y.is_cuda:
        rows = pattern.rows
        with warnings.catch_warnings():  # "CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            crow = torch._convert_indices_from_coo_to_csr(rows, pattern.shape[0])
            columns = pattern.index - rows * pattern.shape[1]
            mask = torch.sparse_csr_tensor(crow, columns, x.new_zeros(pattern.index.numel()), pattern.shape,
                                           check_invariants=False)
        return torch.sparse.sampled_addmm(mask, grad_y.t().contiguous(), x, beta=0.0).values()
    return _blockwise_sampled(lambda r0, r1: grad_y[:, r0:r1].t() @ x, pattern, x)


def _row_blocks(pattern: SparsePattern) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first entry, end entry) of each block of output rows holding trained entries, a block
    being at most `CHUNK_ELEMENTS` of the weight."""
    out_features, row = pattern.shape
    step = max(1, CHUNK_ELEMENTS // row)
    bounds = torch.arange(0, out_features + step, step).clamp(max=out_features)
    starts = torch.searchsorted(pattern.index, bounds.to(pattern.index.device) * row).tolist()
    rows = bounds.tolist()
    return [(rows[i], rows[i + 1], starts[i], starts[i + 1]) for i in range(len(rows) - 1)
            if starts[i + 1] > starts[i]]


def _blockwise_sampled(block_grad, pattern: SparsePattern, like: torch.Tensor) -> torch.Tensor:
    """The weight gradient at the pattern's entries, `block_grad(r0, r1)` giving rows r0..r1 of it."""
    row = pattern.shape[1]
    parts = []
    for r0, r1, e0, e1 in _row_blocks(pattern):
        block = block_grad(r0, r1).reshape(-1)
        parts.append(block[pattern.index[e0:e1] - r0 * row])
    return torch.cat(parts) if parts else like.new_zeros(0)


class _FusedSparseDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, pattern: SparsePattern, use_triton: bool):
        x2 = x.reshape(-1, x.shape[-1])
        merged = weight.reshape(-1).index_add(0, pattern.index, values).view_as(weight)
        y = torch.addmm(bias, x2, merged.t()) if bias is not None else x2 @ merged.t()
        ctx.pattern, ctx.use_triton = pattern, use_triton
        ctx.save_for_backward(x2, weight, values)  # the merged weight is rebuilt, not kept
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, values = ctx.saved_tensors
        pattern = ctx.pattern
        need_x, need_w, need_b, need_v, _, _ = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_bias = grad_v = None
        if need_x:
            merged = weight.reshape(-1).index_add(0, pattern.index, values).view_as(weight)
            grad_x = (g2 @ merged).view(*grad_y.shape[:-1], weight.shape[1])
        if need_w:
            grad_w = g2.t() @ x2
        if need_b:
            grad_bias = g2.sum(0)
        if need_v:
            grad_v = sampled_grad(g2, x2, pattern, ctx.use_triton)
        return grad_x, grad_w, grad_bias, grad_v, None, None


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                        pattern: SparsePattern, path: str | None = None) -> torch.Tensor:
    """(W + ΔW) x + b where ΔW holds `values` at `pattern`'s entries and zero elsewhere."""
    path = path or kernel_path(x, op="sparse")
    if path == "reference":
        return sparse_delta_linear_reference(x, weight, bias, values, pattern)
    return _FusedSparseDelta.apply(x, weight, bias, values, pattern, path == "triton")
