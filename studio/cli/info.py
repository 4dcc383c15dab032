"""`studio info`: versions, device, attention backend, adapter kernel path, the embedded model."""

from __future__ import annotations


def register(sub) -> None:
    i = sub.add_parser("info", help="versions, device, attention backend, adapter kernel path")
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
