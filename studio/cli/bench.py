"""`studio bench ...`: the benchmarks, each recorded in BENCHMARKS.md (unless --no-write). A method flag left
out runs the benchmark's own choice."""

from __future__ import annotations

import os
import sys

from studio.cli.common import parse_settings
from studio.cli.flags import finite_float
from studio.loading import StudioError


def _given(**values) -> dict:
    """The keyword arguments the user set (None: the benchmark's own default)."""
    return {k: v for k, v in values.items() if v is not None}


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks (written to BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    _register_speed(bsub)
    _register_concept(bsub)
    _register_control(bsub)
    _register_kernels(bsub)


def _register_speed(bsub) -> None:
    bg = bsub.add_parser("generate", help="pipeline load time and images per second")
    bg.add_argument("--model", default="shapes")
    bg.add_argument("--batch", type=int, default=8)
    bg.add_argument("--steps", type=int, default=25)
    bg.add_argument("--guidance", type=finite_float, default=5.0)
    bg.add_argument("--repeats", type=int, default=3)
    bg.add_argument("--fast-decoder", default=None, help="also time the model with this AutoencoderTiny ('shapes', "
                                                         "a folder or hub id) in place of its VAE, in turn")
    bg.add_argument("--no-write", action="store_true")
    bg.set_defaults(func=run_generate)

    bj = bsub.add_parser("judge", help="judge accuracy on fresh renders and after the VAE")
    bj.add_argument("--n", type=int, default=1000)
    bj.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    bj.add_argument("--model", default="shapes", help="the shapes model whose VAE the round trip goes through")
    bj.add_argument("--no-write", action="store_true")
    bj.set_defaults(func=run_judge)

    bt = bsub.add_parser("train", help="B6: step time and peak memory per method, each in its own process")
    bt.add_argument("--models", default="shapes,sd15",
                    help="shapes, sd15 (random SD 1.5 UNet), sdxl (random SDXL UNet, 64x64 latents), sd3m (random "
                         "SD3-medium transformer, 64x64 latents), "
                         "flux (random Flux.1-dev transformer, 1024², GPU only)")
    bt.add_argument("--methods", default=None, help="comma-separated: full (the whole UNet) or METHOD-rN "
                                                    "(default: the benchmark's)")
    bt.add_argument("--steps", type=int, default=5)
    bt.add_argument("--device", default="cpu", help="cpu, or cuda (the device check: peak = torch's allocation)")
    bt.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the frozen weights' dtype")
    bt.add_argument("--computed", default=None, metavar="MODELS",
                    help="instead of measuring: memory computed from counts for flux and/or sd3m")
    bt.add_argument("--no-write", action="store_true")
    bt.set_defaults(func=run_train)

    bs = bsub.add_parser("status", help="print where each benchmark stands (and re-render BENCHMARKS.md's table)")
    bs.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md's table is not what the results "
                                                         "render")
    bs.add_argument("--benchmarks", default=None, help="the BENCHMARKS.md to read and write (default: ./)")
    bs.set_defaults(func=run_status)

    bu = bsub.add_parser("ui", help="web UI: time from the page to a trained concept's first image")
    bu.add_argument("--preset", default="quick")
    bu.add_argument("--no-write", action="store_true")
    bu.set_defaults(func=run_ui)


def _register_concept(bsub) -> None:
    from studio.adapters import method_names

    bc = bsub.add_parser("concept", help="B2: teach the star as 'sks' and judge the result")
    bc.add_argument("--method", default=None, help="a training method, or several separated by commas "
                    f"({','.join(method_names('concept'))}): one table, the same settings (default: the benchmark's)")
    bc.add_argument("--preset", default="quick")
    bc.add_argument("--steps", type=int, default=None)
    bc.add_argument("--adapter", action="append", metavar="KEY=VALUE", help="method setting (repeatable)")
    bc.add_argument("--lr", type=finite_float, default=None, help="learning rate (default: the preset's)")
    bc.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training setting, e.g. "
                                                                       "timestep_bias=later (repeatable)")
    bc.add_argument("--prior-renders", type=int, default=0, metavar="N",
                    help="prior preservation on N renders of the base shapes with their captions")
    bc.add_argument("--prior-paired", action="store_true",
                    help="with --prior-renders: also the 8 training renders redrawn as each base shape")
    bc.add_argument("--n", type=int, default=64)
    bc.add_argument("--model", default="shapes", help="the shapes model to teach (a folder: world v2's, say)")
    bc.add_argument("--judge", default=None, help="judge weights (default: the shipped judge); its world picks "
                                                  "the prompts and captions")
    bc.add_argument("--out", default="runs/bench_concept")
    bc.add_argument("--no-write", action="store_true")
    bc.set_defaults(func=run_concept)

    be = bsub.add_parser("erase", help="B3: erase circle (and red), with and without Facilitated Transport, "
                                       "beside the ESD baseline; stacking and transfer")
    be.add_argument("--n", type=int, default=64)
    be.add_argument("--parts", default="permeability,erase",
                    help="permeability, erase, paraphrase (the paraphrase set: needs --model and --judge of world v2)")
    be.add_argument("--model", default=None, help="paraphrase: a world-v2 shapes model folder")
    be.add_argument("--judge", default=None, help="paraphrase: a world-v2 judge file")
    be.add_argument("--out", default="runs/bench_erase")
    be.add_argument("--setting", action="append", metavar="KEY=VALUE", help="erase setting override (repeatable)")
    be.add_argument("--no-write", action="store_true")
    be.set_defaults(func=run_erase)

    bo = bsub.add_parser("onestep", help="B4: the one-step adaptor against the 25-step teacher and the base "
                                          "model at 1 and 4 steps, with the no-high-frequency ablation")
    bo.add_argument("--n", type=int, default=256)
    bo.add_argument("--out", default="runs/bench_onestep")
    bo.add_argument("--setting", action="append", metavar="KEY=VALUE", help="distill setting (repeatable)")
    bo.add_argument("--no-concept", action="store_true", help="skip the rows with a B2 concept adapter")
    bo.add_argument("--reuse", action="store_true", help="use the adaptors already in --out when they were trained "
                    "with the same settings (their training time as measured then)")
    bo.add_argument("--adversarial", type=finite_float, default=0.0, metavar="WEIGHT",
                    help="also train an adaptor with the adversarial term at this weight, one more row")
    bo.add_argument("--no-write", action="store_true")
    bo.set_defaults(func=run_onestep)


def _register_control(bsub) -> None:
    bcn = bsub.add_parser("control", help="B5: control adapters trained, then mask IoU and colour accuracy on "
                                          "held-out renders")
    bcn.add_argument("--methods", default=None, help="comma-separated control methods (default: every one)")
    bcn.add_argument("--condition", default="mask")
    bcn.add_argument("--n", type=int, default=64, help="held-out renders judged")
    bcn.add_argument("--examples", type=int, default=512, help="rendered training pairs")
    bcn.add_argument("--steps", type=int, default=400, help="training steps per method")
    bcn.add_argument("--batch-size", type=int, default=8)
    bcn.add_argument("--eval-steps", type=int, default=25)
    bcn.add_argument("--lr", type=finite_float, default=None,
                     help="learning rate of every method (default: each its own)")
    bcn.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training setting for every method, "
                                                                        "e.g. timestep_bias=later (repeatable)")
    bcn.add_argument("--adapter", action="append", metavar="KEY=VALUE", help="method setting (repeatable)")
    bcn.add_argument("--out", default="runs/bench_control")
    bcn.add_argument("--reuse", action="store_true", help="evaluate adapters this benchmark already trained with "
                                                          "the same settings (their measured training time is kept)")
    bcn.add_argument("--no-write", action="store_true")
    bcn.set_defaults(func=run_control)
    _register_fewshot(bsub)
    _register_multicontrol(bsub)


def _register_fewshot(bsub) -> None:
    bfs = bsub.add_parser("fewshot", help="B5 few-shot: a control adapter trained on some condition kinds adapts "
                                          "to an unseen kind from a few pairs (biases only), against training from "
                                          "scratch")
    bfs.add_argument("--method", default=None, help="a control method (default: the benchmark's)")
    bfs.add_argument("--seen", default="mask,edges", help="the condition kinds the source adapter is trained on")
    bfs.add_argument("--new", default="box", help="the unseen condition kind")
    bfs.add_argument("--shots", type=int, default=30, help="pairs of the unseen kind")
    bfs.add_argument("--examples", type=int, default=512, help="rendered pairs of the seen kinds")
    bfs.add_argument("--source-steps", type=int, default=1200)
    bfs.add_argument("--steps", type=int, default=400, help="steps of each few-shot training")
    bfs.add_argument("--batch-size", type=int, default=8)
    bfs.add_argument("--lr", type=finite_float, default=1e-3,
                     help="lr of the source, the whole fine-tune and from scratch")
    bfs.add_argument("--bias-lr", type=finite_float, default=1e-2, help="lr of the bias tuning")
    bfs.add_argument("--n", type=int, default=64, help="held-out renders judged")
    bfs.add_argument("--eval-steps", type=int, default=25)
    bfs.add_argument("--out", default="runs/bench_fewshot")
    bfs.add_argument("--reuse", action="store_true", help="reuse adapters already trained with the same settings")
    bfs.add_argument("--no-write", action="store_true")
    bfs.set_defaults(func=run_fewshot)


def _register_multicontrol(bsub) -> None:
    bmc = bsub.add_parser("multicontrol", help="B5 multi-condition: a mask of one shape and the edges of another "
                                               "as two control inputs, both obeyed?")
    bmc.add_argument("--adapter", default=None, help="a control adapter for both inputs (default: train one of "
                                                     "--method on one- and two-shape scenes of both kinds)")
    bmc.add_argument("--method", default=None, help="the control method trained without --adapter (default: the "
                                                    "benchmark's)")
    bmc.add_argument("--also", action="append", help="another adapter measured the same way (repeatable)")
    bmc.add_argument("--first-kind", default="mask")
    bmc.add_argument("--second-kind", default="edges")
    bmc.add_argument("--n", type=int, default=32, help="two-shape scenes judged")
    bmc.add_argument("--scale", type=finite_float, default=1.0, help="conditioning scale of each input")
    bmc.add_argument("--examples", type=int, default=512, help="rendered training pairs (without --adapter)")
    bmc.add_argument("--two-shapes", type=finite_float, default=0.5,
                     help="the fraction of them that are two-shape scenes")
    bmc.add_argument("--separate-inputs", action="store_true",
                     help="train on a scene's two conditions as two summed inputs (as generation uses them), not "
                          "one overlaid image")
    bmc.add_argument("--init-from", default=None, help="train starting from this adapter of --method")
    bmc.add_argument("--steps", type=int, default=1200, help="training steps (without --adapter)")
    bmc.add_argument("--eval-steps", type=int, default=25)
    bmc.add_argument("--out", default="runs/bench_multicontrol")
    bmc.add_argument("--reuse", action="store_true", help="reuse an adapter already trained with the same settings")
    bmc.add_argument("--no-write", action="store_true")
    bmc.set_defaults(func=run_multicontrol)


def _register_kernels(bsub) -> None:
    bk = bsub.add_parser("kernels", help="B7: fused adapter linears vs PEFT and the reference; unmerged vs merged")
    bk.add_argument("--shapes", default="320x320,640x640,1280x1280,768x320,320x2560,1280x320",
                    help="in x out of the linears (default: SD 1.5's)")
    bk.add_argument("--tokens", default="256,1024,4096")
    bk.add_argument("--ranks", default="4,16,64")
    bk.add_argument("--repeats", type=int, default=31)
    bk.add_argument("--parts", default="linears,sparse,unet", help="which tables: linears (low-rank adapter "
                    "linears), sparse (sparse-delta linear), unet (unmerged vs merged)")
    bk.add_argument("--unet", nargs="+", default=["shapes", "sd15"], choices=["shapes", "sd15"],
                    help="UNets for the unmerged-vs-merged forward")
    bk.add_argument("--adapters", type=int, default=3)
    bk.add_argument("--adapter-rank", type=int, default=8)
    bk.add_argument("--densities", default="0.01,0.05,0.2", help="trained fractions for the sparse-delta table")
    bk.add_argument("--device", default="cpu", help="cpu, or cuda (adds the Triton kernel as a variant)")
    bk.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    bk.add_argument("--no-write", action="store_true")
    bk.set_defaults(func=run_kernels)


def run_status(args) -> None:
    from studio.bench import recorder

    code = recorder.main(["status", *(["--check"] if args.check else []),
                          *(["--benchmarks", args.benchmarks] if args.benchmarks else [])])
    if code:
        raise SystemExit(code)


def run_generate(args) -> None:
    from studio.bench.concept import bench_generation

    print(bench_generation(model=args.model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                           repeats=args.repeats, write=not args.no_write, fast_decoder=args.fast_decoder))


def run_judge(args) -> None:
    from studio.bench.concept import bench_judge

    print(bench_judge(n=args.n, write=not args.no_write, judge=args.judge, model=args.model))


def run_train(args) -> None:
    from studio.bench.train_cost import DEFAULT_METHODS, bench_train

    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    if args.computed:
        from studio.bench.train_cost import bench_train_computed

        print(bench_train_computed(args.computed.split(","), methods, write=not args.no_write))
        return
    print(bench_train(models=args.models.split(","), methods=methods, steps=args.steps, write=not args.no_write,
                      device=args.device, dtype=args.dtype))


def run_ui(args) -> None:
    from studio.bench.concept import bench_ui_first_image

    print(bench_ui_first_image(preset=args.preset, write=not args.no_write))


def run_concept(args) -> None:
    from studio.bench.concept import bench_concept

    print(bench_concept(**_given(method=args.method), preset=args.preset, n=args.n, out=args.out, steps=args.steps,
                        adapter=parse_settings(args.adapter), lr=args.lr, write=not args.no_write,
                        settings=parse_settings(args.set, "--set"), prior_renders=args.prior_renders,
                        prior_paired=args.prior_paired, model=args.model, judge=args.judge))


def run_erase(args) -> None:
    from studio.bench.erase import bench_erase, bench_paraphrase, bench_permeability

    parts = set(args.parts.split(","))
    if not parts <= {"permeability", "erase", "paraphrase"}:
        raise StudioError(f"bench erase: --parts takes permeability, erase, paraphrase (got {args.parts!r})")
    if "paraphrase" in parts and not (args.model and args.judge):
        raise StudioError("bench erase --parts paraphrase needs --model and --judge (a world-v2 model and judge)")
    if "permeability" in parts:
        print(bench_permeability(n=args.n, write=not args.no_write))
    if "erase" in parts:
        print(bench_erase(n=args.n, out=args.out, settings=parse_settings(args.setting, "--setting"),
                          write=not args.no_write))
    if "paraphrase" in parts:
        print(bench_paraphrase(args.model, args.judge, n=args.n, out=args.out,
                               settings=parse_settings(args.setting, "--setting"), write=not args.no_write))


def run_onestep(args) -> None:
    from studio.bench.onestep import bench_onestep

    print(bench_onestep(n=args.n, out=args.out, settings=parse_settings(args.setting, "--setting"),
                        write=not args.no_write, concept=not args.no_concept, reuse=args.reuse,
                        adversarial=args.adversarial))


def run_control(args) -> None:
    from studio.adapters import method_names
    from studio.bench.control import bench_control
    from studio.shapes.conditions import condition_kinds
    from studio.tasks.control import check_control_method

    condition_kinds(args.condition)
    methods = args.methods.split(",") if args.methods else method_names("control")
    for method in methods:
        check_control_method(method, "bench control --methods")
    print(bench_control(methods, condition=args.condition, n=args.n, examples=args.examples, steps=args.steps,
                        batch_size=args.batch_size, out=args.out, eval_steps=args.eval_steps, write=not args.no_write,
                        reuse=args.reuse, lr={m: args.lr for m in methods} if args.lr else None,
                        settings=parse_settings(args.set, "--set"), adapter=parse_settings(args.adapter)))


def run_fewshot(args) -> None:
    from studio.bench.control import bench_few_shot
    from studio.tasks.control import check_control_method

    if args.method:
        check_control_method(args.method, "bench fewshot --method")
    print(bench_few_shot(**_given(method=args.method), seen=args.seen, new=args.new, shots=args.shots,
                         examples=args.examples, source_steps=args.source_steps, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, bias_lr=args.bias_lr, n=args.n,
                         eval_steps=args.eval_steps, out=args.out, write=not args.no_write, reuse=args.reuse))


def run_multicontrol(args) -> None:
    from studio.bench.control import bench_multi_condition
    from studio.shapes.conditions import check_kind
    from studio.tasks.control import check_control_method

    check_kind(args.first_kind)
    check_kind(args.second_kind)
    if args.method:
        check_control_method(args.method, "bench multicontrol --method")
    print(bench_multi_condition(args.adapter, args.also or [], **_given(method=args.method),
                                first_kind=args.first_kind, second_kind=args.second_kind, n=args.n, scale=args.scale,
                                examples=args.examples, two_shapes=args.two_shapes, separate=args.separate_inputs,
                                init_from=args.init_from, steps=args.steps, eval_steps=args.eval_steps,
                                out=args.out, reuse=args.reuse, write=not args.no_write))


def run_kernels(args) -> None:
    # glibc returns big freed blocks to the OS and page-faults them back in later, more or less often from
    # one process to the next: pin its thresholds so every variant allocates alike (re-exec, they are read
    # at start-up)
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        pinned = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
        os.execve(sys.executable, [sys.executable, "-m", "studio.cli", *sys.argv[1:]], {**os.environ, **pinned})
    import torch

    from studio.bench.kernels import parse_shapes
    from studio.kernels.check import DTYPES

    try:
        shapes, tokens, ranks = parse_shapes(args.shapes), _ints(args.tokens), _ints(args.ranks)
    except ValueError as e:
        raise StudioError(f"bench kernels: {e}") from None
    parts = set(args.parts.split(","))
    if not parts <= {"linears", "sparse", "unet"}:
        raise StudioError(f"bench kernels: --parts takes linears, sparse, unet (got {args.parts!r})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError("bench kernels: --device cuda but torch sees no CUDA device")
    _kernel_tables(args, parts, shapes, tokens, ranks, dict(device=args.device, dtype=DTYPES[args.dtype]))


def _kernel_tables(args, parts: set[str], shapes, tokens: list[int], ranks: list[int], on: dict) -> None:
    from studio.bench.kernels import (b7_tables, bench_linears, bench_sparse, bench_unmerged_generation,
                                      sparse_table, summary)
    from studio.bench.recorder import record

    def say(line: str) -> None:
        print(line, flush=True)

    rows = bench_linears(shapes=shapes, tokens_list=tokens, ranks=ranks, repeats=args.repeats,
                         progress=say, **on) if "linears" in parts else []
    sparse = bench_sparse(densities=[float(d) for d in args.densities.split(",")], progress=say,
                          **on) if "sparse" in parts else []
    generation = [bench_unmerged_generation(model, adapters=args.adapters, rank=args.adapter_rank, **on)
                  for model in args.unet] if "unet" in parts else []
    header, table, gen_header, gen_table = b7_tables(rows, generation)
    if rows:
        print(record("B7 adapter linears: overhead over the bare linear (" + summary(rows) + ")", header, table,
                     write=not args.no_write))
    if sparse:
        print(record("B7 sparse-delta linear: training step over the frozen linear", *sparse_table(sparse),
                     write=not args.no_write))
    if gen_table:
        print(record("B7 UNet forward with unmerged adapters vs merged weights", gen_header, gen_table,
                     write=not args.no_write))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]
