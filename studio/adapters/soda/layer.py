"""The SODA layer: a Linear whose weight, per adapter, is W' = R_out (W + U diag(Δs) Vᵀ) R_inᵀ with
Δs = ReLU(S + δ) − S, from the thin SVD W = U diag(S) Vᵀ of its frozen weight.

That is the paper's U diag(ReLU(S+δ)) Vᵀ Rᵀ (SODA-SVD), written around W itself rather than its SVD
reconstruction: the two differ by the SVD's fp32 residual W − U diag(S) Vᵀ (~1e-7 relative), and this
form makes the layer at δ = 0, R = I compute exactly the base layer's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.adapters.base import thin_svd
from studio.adapters.soda.kron import KroneckerRotation
from studio.adapters.wrapped import WrappedLayer


class SodaAdapter(torch.nn.Module):
    """One adapter's parameters on one layer: δ (one per singular value) and the rotations."""

    def __init__(self, out_features: int, in_features: int, rank: int, *, count: int, max_factor: int,
                 both: bool, delta_init: float, dtype, device) -> None:
        super().__init__()
        self.delta = torch.nn.Parameter(torch.full((rank,), float(delta_init), dtype=dtype, device=device))
        self.rot_in = KroneckerRotation(in_features, count, max_factor, dtype=dtype, device=device)
        self.rot_out = KroneckerRotation(out_features, count, max_factor, dtype=dtype, device=device) if both else None

    def factors(self) -> list[torch.nn.Parameter]:
        return list(self.rot_in.factors) + (list(self.rot_out.factors) if self.rot_out is not None else [])


class SodaLayer(WrappedLayer):
    """Wraps the original Linear (kept as `base_layer`, frozen). The SVD factors are buffers (moved with
    the module, not saved in the model's state dict). A training adapter runs on the activations:
    z = R_inᵀx by mode products, h = Wz + U(Δs ⊙ Vᵀz) (see `adapted`), y = R_out h + b; inference uses the
    summed dense weight, cached while nothing changes."""

    label = "SODA"

    def __init__(self, base_layer: torch.nn.Linear) -> None:
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"SODA wraps Linear layers, not {type(base_layer).__name__}")
        super().__init__(base_layer)
        w = base_layer.weight.detach()
        u, s, vh = thin_svd(w)
        self.register_buffer("U", u.to(w.dtype), persistent=False)
        self.register_buffer("S", s.to(w.dtype), persistent=False)
        self.register_buffer("Vh", vh.to(w.dtype), persistent=False)
        self.adapters = torch.nn.ModuleDict()
        self.merged: dict[str, torch.Tensor] = {}  # adapter -> the weight delta folded into base_layer.weight

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def add_adapter(self, name: str, *, count: int, max_factor: int, both: bool, delta_init: float) -> None:
        w = self.base_layer.weight
        self.adapters[name] = SodaAdapter(w.shape[0], w.shape[1], self.rank, count=count, max_factor=max_factor,
                                          both=both, delta_init=delta_init, dtype=w.dtype, device=w.device)
        self.weights[name] = 1.0

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return list(self.adapters[name].parameters())

    def _drop(self, name: str) -> None:
        del self.adapters[name]

    def shift(self, name: str) -> torch.Tensor:
        """Δs = ReLU(S + δ) − S: the change of each singular value (singular values stay ≥ 0)."""
        return F.relu(self.S + self.adapters[name].delta) - self.S

    def adapted(self, name: str, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W'x (no bias), W' around `weight` (the base weight unless given). The rotations always act on the
        activations (mode products). The spectral term U(Δs ⊙ Vᵀz) costs 2·rows·k(m+n) multiply-adds on
        the activations and m·n·k as a matrix W + U diag(Δs) Vᵀ (one GEMM then serves all rows): the
        cheaper of the two is taken per call (the same product either way; many tokens, as in a UNet's
        self-attention, favour the matrix; few, as in cross-attention on 77 text tokens, the activations)."""
        a = self.adapters[name]
        w = self.base_layer.weight if weight is None else weight
        z = a.rot_in.rotate_t(x)
        out_f, in_f = w.shape
        rows = z.numel() // in_f
        if rows * (out_f + in_f) < out_f * in_f:
            h = F.linear(z, w) + F.linear(F.linear(z, self.Vh) * self.shift(name), self.U)
        else:
            h = F.linear(z, w + (self.U * self.shift(name)) @ self.Vh)
        return a.rot_out.rotate(h) if a.rot_out is not None else h

    def dense_weight(self, name: str) -> torch.Tensor:
        """W' as a matrix (rows rotated by R_in, columns by R_out): for merging and the tests."""
        a = self.adapters[name]
        m = self.base_layer.weight + (self.U * self.shift(name)) @ self.Vh
        m = a.rot_in.rotate(m)                  # (M R_inᵀ) row r = R_in m_r
        if a.rot_out is not None:
            m = a.rot_out.rotate(m.t()).t()    # R_out M: each column rotated
        return m

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.dense_weight(name) - self.base_layer.weight

    def add_update(self, weight: torch.Tensor, name: str, scale: float) -> None:
        weight += scale * self.delta_weight(name)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def training_forward(self, x: torch.Tensor, name: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
        y = self.adapted(name, x, weight)
        if scale != 1:  # W + w·(W' − W) on the activations
            y = scale * y + (1 - scale) * F.linear(x, weight)
        bias = self.base_layer.bias
        return y + bias if bias is not None else y

    @torch.no_grad()
    def merge(self, name: str, weight: float) -> None:
        delta = weight * self.delta_weight(name)
        self.base_layer.weight += delta
        self.merged[name] = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        for delta in self.merged.values():
            self.base_layer.weight -= delta
        self.merged.clear()
