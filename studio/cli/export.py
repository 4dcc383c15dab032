"""`studio export` (an adapter in other tools' keys), `studio bake` (a dense adapter approximated by a low-rank
one) and `studio merge` (adapters folded into the base model)."""

from __future__ import annotations

from pathlib import Path

from studio.cli.common import add_model_args, load_model
from studio.loading import StudioError


def register(sub) -> None:
    from studio.adapters.bake import bakeable_methods
    from studio.adapters.io import FORMATS

    x = sub.add_parser("export", help="write an adapter in kohya (ComfyUI/A1111) or diffusers/PEFT keys")
    x.add_argument("adapter")
    x.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    x.add_argument("--out", default=None, help="output .safetensors (default: next to the adapter)")
    x.set_defaults(func=run_export)

    bk = sub.add_parser("bake", help=f"approximate a dense adapter ({', '.join(bakeable_methods())}) by a low-rank "
                                     "one of a chosen rank, which other tools read (error reported)")
    bk.add_argument("adapter")
    bk.add_argument("--rank", type=int, default=16)
    bk.add_argument("--model", default=None, help="for a method whose update depends on the base weights: the "
                                                  "base model it was trained on (default: the one its file names)")
    bk.add_argument("--out", default=None, help="output .safetensors (default: beside it, named after it and the rank)")
    bk.set_defaults(func=run_bake)

    m = sub.add_parser("merge", help="fold adapters into the base model and save it (folder or .safetensors)")
    add_model_args(m)
    m.add_argument("--adapter", action="append", required=True, help="FILE[:WEIGHT] (repeatable)")
    m.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors single file")
    m.set_defaults(func=run_merge)


def run_export(args) -> None:
    from studio.adapters.io import export_adapter

    out, *embedding = export_adapter(args.adapter, args.format, args.out)
    print(out)
    for path in embedding:
        print(f"{path} (the trigger token '{path.stem}' as a textual-inversion embedding: load it beside the "
              "exported adapter)")


def run_bake(args) -> None:
    from studio.adapters.bake import bake_adapter

    def load_base(named: str | None):
        from studio.loading import load_pipeline

        model = args.model or named
        if not model:
            raise StudioError(f"{args.adapter} does not name its base model; give --model")
        return load_pipeline(model, device="cpu", dtype="fp32")

    out, error = bake_adapter(args.adapter, args.rank, args.out, load_base=load_base)
    print(f"{out} (rank {args.rank}: relative error {error:.2%}; `studio export` writes it for ComfyUI/A1111)")


def run_merge(args) -> None:
    from studio.adapters import merge_adapters

    pipe = load_model(args)
    merge_adapters(pipe)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from studio.single_file import save_single_file

        try:
            print(save_single_file(pipe, out))
        except ValueError as e:  # a family whose original layout is not written
            raise StudioError(f"{out}: {e}") from None
    else:
        from studio.utils.files import atomic_dir

        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp)
        print(out)
