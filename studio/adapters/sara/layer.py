"""The SaRA layer: a Linear or Conv2d whose weight is W + Σ wᵢ·ΔWᵢ, each ΔWᵢ sparse (indices + values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.kernels import SparsePattern, sparse_delta_conv2d, sparse_delta_linear
from studio.adapters.wrapped import WrappedLayer
from studio.kernels.sparse_delta import dense_delta


class SaraLayer(WrappedLayer):
    """Wraps the original layer (kept as `base_layer`, frozen). Every adapter holds the flat indices of the
    weights it trains and a `values` parameter (the update, zero at the start). While an adapter trains,
    a Linear runs the sparse-delta kernel (its values' gradient is computed only at the trained entries)
    and a Conv2d scatters the values into a transient weight; in inference the summed weight is cached."""

    label = "SaRA"

    def __init__(self, base_layer: torch.nn.Module):
        if not isinstance(base_layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"SaRA wraps Linear and Conv2d layers, not {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.values = torch.nn.ParameterDict()
        self.patterns: dict[str, SparsePattern] = {}
        # progressive re-selection: entries frozen at their learned value (a mask over the values), and
        # those values, which gradients and the optimizer no longer move
        self.frozen: dict[str, torch.Tensor] = {}
        self._frozen_values: dict[str, torch.Tensor] = {}
        self.thresholds: dict[str, float] = {}  # θ each training adapter was selected with
        self.merged: dict[str, float] = {}    # adapters folded into base_layer.weight, at these weights

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base_layer.weight.shape)

    def add_adapter(self, name: str, index: torch.Tensor) -> None:
        w = self.base_layer.weight
        pattern = SparsePattern.from_index(index.to(w.device), (w.shape[0], w[0].numel()))
        self.patterns[name] = pattern
        values = torch.nn.Parameter(torch.zeros(pattern.index.numel(), dtype=w.dtype, device=w.device))
        self.values[name] = values
        self.frozen[name] = torch.zeros(values.shape, dtype=torch.bool, device=w.device)
        # the gradient of frozen entries is zeroed before it reaches .grad: clipping, DDP's all-reduce and
        # the optimizer's moments see only the entries still trained
        values.register_hook(lambda grad, name=name: grad.masked_fill(self.frozen[name], 0)
                             if name in self._frozen_values else grad)
        self.weights[name] = 1.0  # a new adapter is active (as PEFT does); set_weights decides afterwards

    def freeze(self, name: str, mask: torch.Tensor) -> None:
        """Freeze the entries under `mask` (added to those already frozen) at their current values."""
        self.frozen[name] = self.frozen[name] | mask.to(self.frozen[name].device)
        self._frozen_values[name] = self.values[name].detach()[self.frozen[name]].clone()

    def hold_frozen(self, name: str) -> None:
        """Put frozen entries back to their values (an optimizer with weight decay would shrink them)."""
        if name in self._frozen_values:
            with torch.no_grad():
                self.values[name][self.frozen[name]] = self._frozen_values[name]

    def adapter_names(self) -> list[str]:
        return list(self.values.keys())

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [self.values[name]]

    def _drop(self, name: str) -> None:
        del self.values[name]
        del self.patterns[name]
        self.frozen.pop(name, None)
        self._frozen_values.pop(name, None)
        self.thresholds.pop(name, None)

    def dense_delta(self, name: str) -> torch.Tensor:
        """ΔW of one adapter as a dense tensor of the weight's shape."""
        return dense_delta(self.values[name].detach(), self.patterns[name]).view(self.weight_shape)

    def add_update(self, weight: torch.Tensor, name: str, scale: float) -> None:
        weight.view(-1).index_add_(0, self.patterns[name].index, self.values[name].detach(), alpha=scale)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, torch.nn.Linear):
            return F.linear(x, weight, base.bias)
        return base._conv_forward(x, weight, base.bias)

    def training_forward(self, x: torch.Tensor, name: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
        """A Linear through the sparse-delta kernel; a Conv2d through its kernel on the base weight, else with
        the values scattered into a transient weight."""
        base = self.base_layer
        values = self.values[name] * scale if scale != 1 else self.values[name]
        pattern = self.patterns[name]
        if isinstance(base, torch.nn.Linear):
            return sparse_delta_linear(x, weight, base.bias, values, pattern)
        if weight is base.weight and base.padding_mode == "zeros":
            return sparse_delta_conv2d(x, base, values, pattern.index)
        merged = weight.reshape(-1).index_add(0, pattern.index, values).view_as(weight)
        return self.linear(x, merged)

    def merge(self, name: str, weight: float) -> None:
        with torch.no_grad():
            self.base_layer.weight.view(-1).index_add_(0, self.patterns[name].index, self.values[name], alpha=weight)
        self.merged[name] = weight

    def unmerge(self) -> None:
        with torch.no_grad():
            for name, weight in self.merged.items():
                self.base_layer.weight.view(-1).index_add_(0, self.patterns[name].index, self.values[name],
                                                           alpha=-weight)
        self.merged.clear()
