"""B7 (`studio bench kernels`): adapter linears at SD 1.5 layer shapes, forward and forward+backward, side by
side (bare linear, PEFT's LoRA layer, the plain reference, the fused kernel), and a UNet with three
unmerged adapters against the same adapters merged.

The floor is arithmetic. A rank-r adapter on an in×out linear adds 2r(in+out)/(in·out) to the forward's
FLOPs. With the base weight frozen, a training step (forward + input gradient) costs the bare linear
4·T·in·out and the adapter 6·T·r·(in+out) more (A x; B h; dY B; dh A; the two weight gradients), so its
floor is 1.5× the forward's. Overheads are measured against the bare linear in the same round-robin, and
the median of the repeats is kept (this machine is noisy: ratios, not seconds)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from studio.kernels import SparsePattern, lora_linear, lora_linear_reference, sparse_delta_linear
from studio.kernels.lora_linear import merge_pays

# (in, out) of SD 1.5's linears: self-attention at the three widths, cross-attention k/v, GEGLU in, FF out
SD15_SHAPES = [(320, 320), (640, 640), (1280, 1280), (768, 320), (320, 2560), (1280, 320)]
TOKENS = [256, 1024, 4096]
RANKS = [4, 16, 64]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"320x320,768x320" → [(320, 320), (768, 320)]"""
    shapes = []
    for item in text.split(","):
        fan_in, sep, fan_out = item.strip().lower().partition("x")
        if not sep or not fan_in.isdigit() or not fan_out.isdigit():
            raise ValueError(f"shape {item!r} is not IN x OUT, e.g. 320x1280")
        shapes.append((int(fan_in), int(fan_out)))
    return shapes


def lora_floor(fan_in: int, fan_out: int, rank: int, backward: bool) -> float:
    floor = 2 * rank * (fan_in + fan_out) / (fan_in * fan_out)
    return 1.5 * floor if backward else floor


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _paired_ratios(fns: dict[str, Callable[[], None]], rounds: int, sample_s: float = 0.02) -> dict[str, float]:
    """Median over `rounds` of each variant's time per call divided by the first variant's in the same round.
    Variants take turns (drift and bursts of load hit them alike) in blocks of about `sample_s`, so that the
    caches one leaves behind barely touch the next one's figure. On CUDA each block ends with a synchronize
    (kernels are queued, not run, when the call returns)."""
    loops = {}
    for name, fn in fns.items():  # warm-up (and Triton's compilation), and how many calls make a block
        fn()
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        loops[name] = max(1, round(sample_s / max(time.perf_counter() - start, 1e-6)))
    first = next(iter(fns))
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _synchronize()
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            _synchronize()
            seconds[name].append((time.perf_counter() - start) / loops[name])
        for name in fns:
            ratios[name].append(seconds[name][-1] / seconds[first][-1])
    return {**{name: statistics.median(r) for name, r in ratios.items()},
            **{f"{name}_s": statistics.median(t) for name, t in seconds.items()}}


def _variants(tokens: int, fan_in: int, fan_out: int, rank: int, backward: bool, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = torch.nn.Linear(fan_in, fan_out).requires_grad_(False)
    peft = PeftLoraLinear(base, "bench", PeftLoraConfig(r=rank, lora_alpha=rank), r=rank, lora_alpha=rank)
    torch.nn.init.normal_(peft.lora_B["bench"].weight, std=0.01)
    peft.to(device, dtype)
    lora_a, lora_b = peft.lora_A["bench"].weight, peft.lora_B["bench"].weight
    x = torch.randn(1, tokens, fan_in, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(1, tokens, fan_out, device=device, dtype=dtype)

    def run(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        if not backward:
            def call():
                with torch.no_grad():
                    forward()
            return call

        def step():
            x.grad = lora_a.grad = lora_b.grad = None
            forward().backward(grad)
        return step

    return {
        "bare": run(lambda: base(x)),
        "peft": run(lambda: peft(x)),
        "reference": run(lambda: lora_linear_reference(x, base.weight, base.bias, lora_a, lora_b)),
        "fused": run(lambda: lora_linear(x, base.weight, base.bias, lora_a, lora_b, path="fused")),
        **({"triton": run(lambda: lora_linear(x, base.weight, base.bias, lora_a, lora_b, path="triton"))}
           if x.is_cuda else {}),
    }


def bench_linears(shapes=SD15_SHAPES, tokens_list=TOKENS, ranks=RANKS, repeats: int = 15,
                  progress: Callable[[str], None] | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """On CUDA the Triton kernel is one more variant, and the goal is judged on the path that runs there by
    default (Triton)."""
    rows = []
    chosen = "triton" if device.startswith("cuda") else "fused"
    for backward in (False, True):
        for fan_in, fan_out in shapes:
            for tokens in tokens_list:
                for rank in ranks:
                    t = _paired_ratios(_variants(tokens, fan_in, fan_out, rank, backward, device, dtype), repeats)
                    row = {"direction": "fwd+bwd" if backward else "fwd", "in": fan_in, "out": fan_out,
                           "tokens": tokens, "rank": rank, "floor": lora_floor(fan_in, fan_out, rank, backward),
                           "bare_ms": t["bare_s"] * 1e3, "chosen": chosen,
                           "fused_way": "merged" if merge_pays(tokens, fan_in, fan_out, rank, backward) else "thin",
                           **{f"{k}_over": t[k] - 1 for k in ("peft", "reference", "fused", "triton") if k in t}}
                    row["goal"] = row[f"{chosen}_over"] <= 1.25 * row["floor"] + 0.02
                    rows.append(row)
                    if progress:
                        extra = f", triton {row['triton_over']:+.1%}" if "triton_over" in row else ""
                        progress(f"{row['direction']} {fan_in}->{fan_out} T={tokens} r={rank}: floor "
                                 f"{row['floor']:.1%}, fused {row['fused_over']:+.1%}{extra}, "
                                 f"peft {row['peft_over']:+.1%}")
    return rows


def _sparse_variants(tokens: int, fan_in: int, fan_out: int, density: float, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = torch.nn.Linear(fan_in, fan_out).requires_grad_(False).to(device, dtype)
    full = torch.nn.Linear(fan_in, fan_out).to(device, dtype)
    pattern = SparsePattern.from_mask(torch.rand(fan_out, fan_in) < density)
    pattern.index = pattern.index.to(device)
    values = torch.zeros(pattern.index.numel(), device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(1, tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, tokens, fan_out, device=device, dtype=dtype)

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call():
            x.grad = values.grad = full.weight.grad = full.bias.grad = None
            forward().backward(grad)
        return call

    return {
        "bare": step(lambda: base(x)),
        "full": step(lambda: full(x)),
        "reference": step(lambda: sparse_delta_linear(x, base.weight, base.bias, values, pattern, path="reference")),
        "fused": step(lambda: sparse_delta_linear(x, base.weight, base.bias, values, pattern, path="fused")),
        **({"triton": step(lambda: sparse_delta_linear(x, base.weight, base.bias, values, pattern, path="triton"))}
           if x.is_cuda else {}),
    }


def bench_sparse(shapes=((320, 320), (640, 640), (1280, 1280)), tokens_list=(1024, 4096),
                 densities=(0.01, 0.05, 0.2), repeats: int = 15,
                 progress: Callable[[str], None] | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[dict]:
    """Training step (forward + input and delta gradients) of the sparse-delta linear against the frozen
    bare linear and against full fine-tuning of the same linear (dense weight gradient)."""
    rows = []
    for fan_in, fan_out in shapes:
        for tokens in tokens_list:
            for density in densities:
                t = _paired_ratios(_sparse_variants(tokens, fan_in, fan_out, density, device, dtype), repeats)
                row = {"in": fan_in, "out": fan_out, "tokens": tokens, "density": density,
                       "bare_ms": t["bare_s"] * 1e3,
                       **{f"{k}_over": t[k] - 1 for k in ("full", "reference", "fused", "triton") if k in t}}
                rows.append(row)
                if progress:
                    extra = f", triton {row['triton_over']:+.1%}" if "triton_over" in row else ""
                    progress(f"sparse {fan_in}->{fan_out} T={tokens} density={density:.0%}: full "
                             f"{row['full_over']:+.1%}, reference {row['reference_over']:+.1%}, fused "
                             f"{row['fused_over']:+.1%}{extra}")
    return rows


def sparse_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    triton = bool(rows) and "triton_over" in rows[0]
    header = ["in→out", "tokens", "trained entries", "frozen linear", "full fine-tuning", "reference (dense ΔW)",
              "fused (SDDMM)"] + (["Triton (SDDMM kernel)"] if triton else [])
    return header, [[f"{r['in']}→{r['out']}", str(r["tokens"]), f"{r['density'] * 100:g}%", f"{r['bare_ms']:.3f} ms",
                     f"{r['full_over']:+.1%}", f"{r['reference_over']:+.1%}", f"{r['fused_over']:+.1%}"]
                    + ([f"{r['triton_over']:+.1%}"] if triton else []) for r in rows]


def bench_unmerged_generation(model: str = "sd15", adapters: int = 3, rank: int = 8, repeats: int = 5,
                              device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """UNet forward (classifier-free-guidance batch of 2) with `adapters` LoRAs unmerged — fused kernel (Triton
    on CUDA) and PEFT's layer — against the same LoRAs merged into the weights."""
    from types import SimpleNamespace

    from studio.adapters import get_method
    from studio.adapters.lora import LoraConfig
    from studio.adapters.lora.layer import FusedLoraLinear
    from studio.bench.train_cost import SD15_UNET, _unet

    unet = _unet(model).eval().requires_grad_(False)
    holder = SimpleNamespace(unet=unet)
    lora = get_method("lora")
    weights = {}
    for i in range(adapters):
        name = f"a{i}"
        lora.attach(holder, LoraConfig(rank=rank, alpha=rank), name)
        g = torch.Generator().manual_seed(i)
        for p in lora.trainable_parameters(holder, name):
            p.data = torch.randn(p.shape, generator=g) * 0.01
        weights[name] = 0.7
    lora.set_weights(holder, weights)  # all three active at 0.7
    lora._freeze_others(holder, None)
    unet.to(device, dtype)
    latent = SD15_UNET["sample_size"] if model == "sd15" else unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)

    sites = [(unet.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], m)
             for path, m in unet.named_modules() if isinstance(m, PeftLoraLinear)]

    def timed(kind: str) -> tuple[float, torch.Tensor]:
        """One forward: "merged" runs plain linears holding the merged weights; "fused"/"peft" the same
        LoRA modules on the fused kernel or on PEFT's own forward."""
        if kind == "merged":
            for name, w in weights.items():
                lora.merge(holder, name, w)
        for parent, child, layer in sites:
            layer.__class__ = PeftLoraLinear if kind == "peft" else FusedLoraLinear
            setattr(parent, child, layer.get_base_layer() if kind == "merged" else layer)
        _synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = unet(sample, t, encoder_hidden_states=text).sample
        _synchronize()
        elapsed = time.perf_counter() - start
        for parent, child, layer in sites:
            setattr(parent, child, layer)
        if kind == "merged":
            lora.unmerge(holder)
        return elapsed, out

    kinds = ("merged", "fused", "peft")
    for kind in kinds:  # warm-up
        timed(kind)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):  # round robin; merging happens outside the timed forward
        for kind in kinds:
            seconds[kind].append(timed(kind)[0])
    error = (timed("merged")[1].float() - timed("fused")[1].float()).abs().max().item()
    ratio = {kind: statistics.median(a / m for a, m in zip(seconds[kind], seconds["merged"])) for kind in kinds}
    return {"model": model, "adapters": adapters, "rank": rank, "layers": len(sites), "latent": latent,
            "dtype": str(dtype).removeprefix("torch."),
            "merged_s": statistics.median(seconds["merged"]), "fused_over": ratio["fused"] - 1,
            "peft_over": ratio["peft"] - 1,
            "merged_vs_unmerged_max_diff": error}


def b7_tables(rows: list[dict], generation: list[dict]) -> tuple[list[str], list[list[str]], list[str],
                                                                list[list[str]]]:
    """The goal columns judge the path each device runs by default: fused on the CPU, Triton on CUDA."""
    chosen = rows[0]["chosen"] if rows else "fused"
    triton = bool(rows) and "triton_over" in rows[0]
    header = (["pass", "in→out", "tokens", "rank", "floor", "bare linear", "PEFT layer", "reference", "fused",
               "fused runs"]
              + (["Triton"] if triton else []) + [f"{chosen} ≤ 1.25·floor+2pt", f"{chosen} < PEFT"])
    table = [[r["direction"], f"{r['in']}→{r['out']}", str(r["tokens"]), str(r["rank"]), f"{r['floor']:.1%}",
              f"{r['bare_ms']:.3f} ms", f"{r['peft_over']:+.1%}", f"{r['reference_over']:+.1%}",
              f"{r['fused_over']:+.1%}", r["fused_way"]] + ([f"{r['triton_over']:+.1%}"] if triton else [])
             + ["yes" if r["goal"] else "no", "yes" if r[f"{chosen}_over"] < r["peft_over"] else "no"] for r in rows]
    gen_header = ["UNet", "unmerged adapters", "LoRA layers", "merged (s per forward)", "unmerged, fused kernel",
                  "unmerged, PEFT's layer",
                  "largest difference, unmerged vs merged"]
    gen_table = [[f"{g['model']} ({g['latent']}×{g['latent']} latents, batch 2, {g['dtype']})",
                  f"{g['adapters']} × rank {g['rank']}", str(g["layers"]), f"{g['merged_s']:.4f}",
                  f"{g['fused_over']:+.1%}", f"{g['peft_over']:+.1%}",
                  f"{g['merged_vs_unmerged_max_diff']:.1e}"] for g in generation]
    return header, table, gen_header, gen_table


def summary(rows: list[dict]) -> str:
    chosen = rows[0]["chosen"] if rows else "fused"
    big = [r for r in rows if r["tokens"] >= 1024]
    return (f"{chosen} within 1.25·floor+2pt at tokens ≥ 1024: {sum(r['goal'] for r in big)}/{len(big)}; "
            f"{chosen} faster than PEFT's layer: {sum(r[f'{chosen}_over'] < r['peft_over'] for r in rows)}/{len(rows)}")
