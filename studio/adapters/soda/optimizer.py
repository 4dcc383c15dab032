"""StiefelAdam (after Kong, Wang & Tao, ICLR 2023, as SODA trains its factors): Adam moments on the
Riemannian gradient of each orthogonal factor, a Cayley retraction, and plain AdamW for every other
parameter, in one torch optimizer (so LR schedules, gradient clipping, accelerate and checkpoints treat
it as any other).

For a factor X ∈ O(k) with Euclidean gradient G, the Riemannian gradient is X·A with A = skew(XᵀG) =
(XᵀG − GᵀX)/2 in the Lie algebra. The moments m, v are kept on A (m stays skew, v symmetric, so the step
ξ = lr·m̂/(√v̂+ε) is skew), and X ← X·cay(−ξ) with cay(W) = (I − W/2)⁻¹(I + W/2), an exact rotation. The
update is computed in float64 and followed by one Newton–Schulz step X ← X(3I − XᵀX)/2 (which squares any
drift away from orthogonality), so stored factors satisfy ‖XᵀX − I‖_max ≲ 1e-6 in fp32 at every step
instead of drifting with the step count."""

from __future__ import annotations

import math

import torch


def orthogonality_error(q: torch.Tensor) -> float:
    """max |QᵀQ − I| (entrywise), the figure the tests bound."""
    q = q.detach().double()
    return float((q.t() @ q - torch.eye(q.shape[0], dtype=q.dtype, device=q.device)).abs().max())


def cayley(w: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye - w / 2, eye + w / 2)


class StiefelAdam(torch.optim.Optimizer):
    """Parameter groups with `stiefel=True` hold square orthogonal matrices and move on O(k); the others
    take AdamW steps (decoupled weight decay)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"StiefelAdam lr must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, stiefel=False))
        for group in self.param_groups:
            if group["stiefel"]:
                for p in group["params"]:
                    if p.ndim != 2 or p.shape[0] != p.shape[1]:
                        raise ValueError(f"a Stiefel group holds square matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if group["stiefel"]:
                    x = p.detach().double()
                    g = p.grad.detach().double()
                    a = x.t() @ g
                    a = (a - a.t()) / 2                      # Riemannian gradient X·A, A skew
                    m.mul_(b1).add_(a.to(m.dtype), alpha=1 - b1)
                    v.mul_(b2).addcmul_(a.to(v.dtype), a.to(v.dtype), value=1 - b2)
                    step = (m.double() / (1 - b1 ** t)) / ((v.double() / (1 - b2 ** t)).sqrt() + eps) * lr
                    step = (step - step.t()) / 2             # skew to round-off
                    x = x @ cayley(-step)
                    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
                    x = x @ (1.5 * eye - 0.5 * (x.t() @ x))  # Newton–Schulz: back onto O(k)
                    p.copy_(x.to(p.dtype))
                else:
                    if group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])
                    m.mul_(b1).add_(p.grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss


def soda_groups(factors: list[torch.nn.Parameter], others: list[torch.nn.Parameter], *, lr: float,
                weight_decay: float = 0.0, rotation_lr_scale: float = 1.0) -> list[dict]:
    """StiefelAdam's parameter groups: `factors` on the manifold at lr·rotation_lr_scale, `others` (the spectral
    shifts) AdamW at lr; an empty list gives no group."""
    if not math.isfinite(lr * rotation_lr_scale):
        raise ValueError(f"the rotation learning rate {lr}·{rotation_lr_scale} is not finite")
    groups = []
    if others:
        groups.append({"params": others, "lr": lr, "weight_decay": weight_decay})
    if factors:
        groups.append({"params": factors, "stiefel": True, "lr": lr * rotation_lr_scale, "weight_decay": 0.0})
    return groups


def soda_optimizer(factors: list[torch.nn.Parameter], others: list[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0, rotation_lr_scale: float = 1.0) -> StiefelAdam:
    """`factors` on the manifold at lr·rotation_lr_scale; `others` (the spectral shifts) AdamW at lr."""
    return StiefelAdam(soda_groups(factors, others, lr=lr, weight_decay=weight_decay,
                                   rotation_lr_scale=rotation_lr_scale), lr=lr)
