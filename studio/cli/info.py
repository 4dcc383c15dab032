"""`studio info [MODEL]`: versions, device, attention backend, adapter kernel path, the embedded model; with a
model, its family and components."""

from __future__ import annotations


def register(sub) -> None:
    i = sub.add_parser("info", help="versions, device, attention backend, adapter kernel path; a model's family")
    i.add_argument("model", nargs="?", default=None,
                   help="a model to describe: shapes, a diffusers folder, a hub id or a single file")
    i.set_defaults(func=run)


def run(args) -> None:
    import platform

    import diffusers
    import torch
    import transformers

    from studio import __version__
    from studio.kernels.attention import attention_backend, xformers_available
    from studio.kernels.paths import describe
    from studio.shapes import embedded

    print(f"studio {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} CPU threads)")
    device = "cuda" if cuda else "cpu"
    xformers = "installed" if xformers_available() else "absent"
    print(f"attention backend: {attention_backend(device)} (xformers {xformers})")
    print(f"adapter kernel path: {describe()}")
    print(f"embedded model: {embedded.SHAPES_DIR} ({'present' if embedded.is_shipped() else 'MISSING'})")
    if args.model:
        describe_model(args.model)


def describe_model(model: str) -> None:
    """The model's family (`pipe.studio_architecture`), its denoiser and text encoders with their sizes."""
    from studio.adapters.base import denoiser, pipeline_text_encoders
    from studio.loading import load_pipeline

    pipe = load_pipeline(model)
    name, module = denoiser(pipe)
    print(f"model: {model}: {pipe.studio_architecture} ({type(pipe).__name__})")
    print(f"  {name}: {type(module).__name__}, {sum(p.numel() for p in module.parameters()):,} parameters")
    for comp, _, encoder in pipeline_text_encoders(pipe):
        print(f"  {comp}: {type(encoder).__name__}, {sum(p.numel() for p in encoder.parameters()):,} parameters")
