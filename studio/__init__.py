"""Studio: a diffusion-model customization studio built on diffusers."""

from __future__ import annotations

from studio.utils.version import __version__

__all__ = ["load_pipeline", "StudioError", "__version__"]


def __getattr__(name: str):
    # keep `import studio` light: torch and diffusers load on first use
    if name in ("load_pipeline", "StudioError"):
        from studio import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
