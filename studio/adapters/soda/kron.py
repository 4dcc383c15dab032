"""Kronecker-factored rotations: how a width is split into small orthogonal factors, and R = Q₁⊗Q₂⊗…
applied to activations by mode products (the vector reshaped to the factor grid, each factor multiplied
along its own axis) — the dense n×n matrix is never built except by `dense()` (tests, merging)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _factorizations(n: int, count: int, smallest: int = 1):
    """Every non-decreasing tuple of `count` integers ≥ `smallest` whose product is n."""
    if count == 1:
        if n >= smallest:
            yield (n,)
        return
    k = smallest
    while k ** count <= n:
        if n % k == 0:
            for rest in _factorizations(n // k, count - 1, k):
                yield (k, *rest)
        k += 1


@lru_cache(maxsize=None)
def balanced_factors(n: int, count: int) -> tuple[int, ...]:
    """The most balanced split of n into `count` factors (smallest largest factor, then fewest parameters
    Σkᵢ²), factors of 1 dropped: 320 → (5, 8, 8), 768 → (8, 8, 12), 1280 → (8, 10, 16), 1152 → (8, 12, 12)."""
    best = min(_factorizations(n, count), key=lambda f: (max(f), sum(k * k for k in f)))
    return tuple(k for k in best if k > 1) or (1,)


def kron_plan(width: int, count: int = 3, max_factor: int = 64) -> tuple[tuple[int, ...], int]:
    """(factor sizes, rotated width) for a rotation of a `width`-dimensional space.

    The rule: split `width` into the most balanced `count` factors; if the largest exceeds `max_factor`
    (a prime such as 1031, or 2·p), take the largest n' ≤ width whose split fits and rotate the first n'
    coordinates only, leaving the last width − n' unrotated (R = diag(Q₁⊗…⊗Q_f, I) is still orthogonal).
    For every width of SD 1.x/2.x/XL and DiT models (320, 640, 768, 1024, 1152, 1280, 1536, 2048, 2560,
    5120, 10240) the whole width is rotated."""
    if width < 1 or count < 1 or max_factor < 2:
        raise ValueError(f"kron_plan needs width ≥ 1, count ≥ 1, max_factor ≥ 2 (got {width}, {count}, {max_factor})")
    if max_factor ** count < width:
        max_factor = math.ceil(width ** (1 / count)) + 1  # so wide that only larger factors can cover it
    for rotated in range(width, 0, -1):
        sizes = balanced_factors(rotated, count)
        if max(sizes) <= max_factor:
            return sizes, rotated
    return (1,), 1  # unreachable: n' = 1 always fits


def _mode_products(x: torch.Tensor, factors: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """x (rows, n') → (Q₁⊗…⊗Q_f)ᵀ x per row (transpose) or (Q₁⊗…⊗Q_f) x, one small matmul per mode."""
    sizes = [int(q.shape[0]) for q in factors]
    rows = x.shape[0]
    for i, q in enumerate(factors):
        pre, k, post = math.prod(sizes[:i]), sizes[i], math.prod(sizes[i + 1:])
        # Y[r, j, p] = Σ_a M[j, a] X[r, a, p] with M = Qᵀ (for Rᵀx) or Q (for Rx); an explicit bmm: torch.matmul
        # picks another kernel when Q requires grad, so a trained adapter and its loaded file rounded differently
        x3 = x.reshape(rows * pre, k, post)
        x = torch.bmm((q.t() if transpose else q).expand(x3.shape[0], k, k), x3)
    return x.reshape(rows, -1)


class KroneckerRotation(torch.nn.Module):
    """R = diag(Q₁⊗…⊗Q_f, I) ∈ O(width); the factors start at the identity and are trained on the Stiefel
    manifold (optimizer.StiefelAdam keeps each QᵢᵀQᵢ = I)."""

    def __init__(self, width: int, count: int = 3, max_factor: int = 64, dtype=None, device=None) -> None:
        super().__init__()
        self.width = int(width)
        self.sizes, self.rotated = kron_plan(self.width, count, max_factor)
        self.factors = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.eye(k, dtype=dtype, device=device)) for k in self.sizes if k > 1])

    def _rotate(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if not len(self.factors):
            return x
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        factors = [q.to(x.dtype) for q in self.factors]
        if self.rotated == self.width:
            return _mode_products(flat, factors, transpose).reshape(shape)
        head = _mode_products(flat[:, :self.rotated], factors, transpose)
        return torch.cat([head, flat[:, self.rotated:]], dim=1).reshape(shape)

    def rotate_t(self, x: torch.Tensor) -> torch.Tensor:
        """Rᵀx along the last dimension."""
        return self._rotate(x, transpose=True)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rx along the last dimension."""
        return self._rotate(x, transpose=False)

    def dense(self) -> torch.Tensor:
        """R as a width × width matrix (the reference the mode-product path is tested against)."""
        r = torch.eye(self.width, dtype=self.factors[0].dtype if len(self.factors) else torch.float32,
                      device=self.factors[0].device if len(self.factors) else None)
        if not len(self.factors):
            return r
        kron = self.factors[0]
        for q in list(self.factors)[1:]:
            kron = torch.kron(kron, q)
        r[:self.rotated, :self.rotated] = kron
        return r

    def extra_repr(self) -> str:
        tail = f", {self.width - self.rotated} unrotated" if self.rotated != self.width else ""
        return f"width={self.width}, factors={'⊗'.join(map(str, self.sizes))}{tail}"
