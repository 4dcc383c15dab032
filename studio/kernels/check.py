"""Every adapter-linear path against the plain reference on odd shapes, gradients included.

    TRITON_INTERPRET=1 python -m studio.kernels.check            # Triton kernels run by the interpreter (CPU)
    python -m studio.kernels.check --device cuda --dtype bf16    # compiled kernels on a GPU

Prints the worst difference per path and dtype and exits non-zero when one is over its tolerance. The tests
run the first form; the second is the check on a real GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from studio.kernels.lora_linear import lora_linear, stack_adapters
from studio.kernels.sparse_delta import SparsePattern, sparse_delta_linear

# batch, tokens, in, out, ranks: sizes that are not multiples of the 64/32 blocks, rank 1, batch 1, one
# token, several adapters at once, and an out > in layer
CASES = [(1, 1, 33, 17, [1]), (1, 70, 65, 130, [1]), (2, 37, 96, 45, [4, 3]), (1, 129, 40, 200, [16])]
# relative to the largest reference value of each tensor: fp32 sums agree to a few ulps; half-precision
# inputs are rounded to 8 (bf16) or 11 (fp16) bits before accumulating in fp32
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def lora_outputs_and_grads(path: str, x, w, b, la, lb, scales: list[float] | None = None) -> list[torch.Tensor]:
    """The output of `path`'s LoRA linear and the gradients of x and every adapter factor under a fixed
    non-uniform upstream gradient (what each path is compared on)."""
    for t in (x, *la, *lb):
        t.grad = None
    a, bb = stack_adapters(la, lb, scales if scales is not None else [0.7] * len(la))
    y = lora_linear(x, w, b, a, bb, path=path)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device, dtype=y.dtype)).sum().backward()
    return [y.detach(), x.grad.clone(), *(t.grad.clone() for t in (*la, *lb))]


def _sparse_grads(path: str, x, w, b, v, pattern) -> list[torch.Tensor]:
    x.grad = v.grad = None
    y = sparse_delta_linear(x, w, b, v, pattern, path=path)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device, dtype=y.dtype)).sum().backward()
    return [y.detach(), x.grad.clone(), v.grad.clone()]


def check(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Worst relative difference to the reference (computed in fp32 from the same rounded inputs) of
    `path`'s outputs and gradients, for the LoRA linear and the sparse-delta linear."""
    worst = {"lora": 0.0, "sparse": 0.0}
    for batch, tokens, fan_in, fan_out, ranks in CASES:
        g = torch.Generator().manual_seed(tokens)

        def leaf(*shape, scale=1.0, grad=True):
            t = (torch.randn(*shape, generator=g) * scale).to(device, dtype)
            return t.requires_grad_(grad)

        x = leaf(batch, tokens, fan_in)
        w = leaf(fan_out, fan_in, scale=fan_in ** -0.5, grad=False)
        b = leaf(fan_out, grad=False)
        la = [leaf(r, fan_in) for r in ranks]
        lb = [leaf(fan_out, r) for r in ranks]
        full = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b, *la, *lb)]
        downs, ups = full[3:3 + len(ranks)], full[3 + len(ranks):]
        want = lora_outputs_and_grads("reference", full[0], full[1], full[2], downs, ups)
        got = lora_outputs_and_grads(path, x, w, b, la, lb)
        with torch.no_grad():  # inference takes a path of its own (no autograd node)
            a, bb = stack_adapters(la, lb, [0.7] * len(la))
            got.append(lora_linear(x, w, b, a, bb, path=path))
        worst["lora"] = max(worst["lora"], *(_relative(o, r) for o, r in zip(got, want + [want[0]])))

        pattern = SparsePattern.from_mask(torch.rand(fan_out, fan_in, generator=g) < 0.1)
        pattern.index = pattern.index.to(device)
        v = leaf(pattern.index.numel())
        want = _sparse_grads("reference", full[0], full[1], full[2], v.detach().float().requires_grad_(), pattern)
        got = _sparse_grads(path, x, w, b, v, pattern)
        worst["sparse"] = max(worst["sparse"], *(_relative(o, r) for o, r in zip(got, want)))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studio.kernels.check", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    ap.add_argument("--paths", nargs="+", default=["triton"], choices=["fused", "triton"])
    args = ap.parse_args(argv)
    from studio.kernels.paths import triton_interpreted

    if "triton" in args.paths and not args.device.startswith("cuda") and not triton_interpreted():
        ap.error("the Triton path runs on --device cuda, or on the CPU with TRITON_INTERPRET=1")
    failed = False
    for path in args.paths:
        for name in args.dtype:
            dtype = DTYPES[name]
            worst = check(path, args.device, dtype)
            ok = all(v <= TOLERANCE[dtype] for v in worst.values())
            failed |= not ok
            print(f"{path} {name} on {args.device}: worst relative difference to the reference "
                  f"lora {worst['lora']:.1e}, sparse {worst['sparse']:.1e} (tolerance {TOLERANCE[dtype]:.0e}) "
                  f"{'ok' if ok else 'OVER'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
