"""Load a text-to-image pipeline from any source a user has: the embedded `shapes` model, a local
diffusers folder, a hub id, or one `.safetensors`/`.ckpt` checkpoint (SD 1.x/2.x, SDXL, SD3, Flux)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import torch

from studio.shapes import embedded
from studio.kernels import apply_attention_backend


class StudioError(Exception):
    """An error about the user's input; the CLI prints its message on one line and exits with 2."""


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}


def architecture(pipe) -> str:
    """'shapes', 'sd1', 'sd2' or 'sdxl', read off the UNet's config; 'sd3' or 'flux' for a diffusion transformer."""
    if getattr(pipe, "unet", None) is None:
        from studio.adapters.base import denoiser, transformer_family

        return transformer_family(denoiser(pipe)[1])
    cfg = pipe.unet.config
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if embedded.is_shapes_unet_config(cfg):
        return "shapes"
    return "sd2" if cfg.get("use_linear_projection") else "sd1"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise StudioError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _single_file_pipeline(path: Path):
    """The diffusers pipeline class of an original-layout checkpoint, by its keys (SD 1.x/2.x for a .ckpt)."""
    import diffusers

    name = "StableDiffusionPipeline"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        if any(k.startswith("conditioner.embedders.1") for k in keys):
            name = "StableDiffusionXLPipeline"
        elif any(".joint_blocks." in f".{k}" for k in keys):
            name = "StableDiffusion3Pipeline"
        elif any(".double_blocks." in f".{k}" for k in keys):
            name = "FluxPipeline"
    return getattr(diffusers, name)


def _check_safetensors(path: Path) -> None:
    """Read the header and every tensor's byte range, so a truncated or corrupt file is named, not crashed on."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is past the end of the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is truncated ({size} bytes, tensors need {8 + n + end})")
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # bad JSON, bad offsets, or safetensors' own error types
        raise StudioError(f"{path}: not a valid safetensors checkpoint ({e})") from None


def _embedded_config_for(path: Path) -> str | None:
    """A single file exported from the shapes model names its own configs: they ship with studio."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        unet = json.loads(meta.get("studio_unet_config", "{}"))
    except json.JSONDecodeError:
        return None
    return str(embedded.SHAPES_DIR) if embedded.is_shapes_unet_config(unet) else None


def load_pipeline(model: str | Path = "shapes", *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                  scheduler: str | None = None, config: str | None = None, offline: bool | None = None,
                  progress: bool = False, adapters: dict[str | Path, float] | list | None = None,
                  membranes: dict[str | Path, float] | list | None = None, transport: str | None = "tokensim",
                  one_step: str | Path | None = None, control: dict | list[dict] | None = None,
                  fast_decoder: str | Path | None = None):
    """A diffusers pipeline for `model`: "shapes" (the embedded model, default), a diffusers folder,
    a hub id, or a single .safetensors/.ckpt file (`config` names a diffusers folder or hub id for its
    configs). `adapters` ({file: weight}) attaches trained adapters; `membranes` ({file: weight}) attaches
    concept-erasing membranes, each applied per prompt at its permeability (`transport`: the similarity
    metric, None for a fixed strength). `one_step` attaches a HiPA adaptor and the one-step scheduler: call
    the pipeline with num_inference_steps=1 (or timesteps=[999]) and guidance_scale=0. `control` attaches control
    adapters with their images: {"adapter": file, "image": img, "scale": 1.0, "start": 0.0, "end": 1.0} or a list
    of them (summed). `fast_decoder` replaces the VAE with a diffusers AutoencoderTiny (a folder or hub id, e.g.
    TAESD's for SD; "shapes": the embedded model's). Raises StudioError with a one-line reason on bad input."""
    torch_dtype = _resolve_dtype(dtype, device)
    pipe = _open(str(model), torch_dtype, config, offline)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if fast_decoder:
        pipe.vae = _fast_decoder(pipe, str(fast_decoder), torch_dtype, offline)
    pipe.set_progress_bar_config(disable=not progress)
    pipe.studio_architecture = architecture(pipe)
    if adapters or membranes or one_step:
        _attach_files(pipe, adapters, membranes, transport, one_step)
    pipe = pipe.to(device)
    if control:
        _attach_control(pipe, control)
    pipe.studio_attention = apply_attention_backend(pipe, device)
    return pipe


def _fast_decoder(pipe, source: str, torch_dtype: torch.dtype, offline: bool | None):
    """An AutoencoderTiny for `pipe` from a folder or hub id ("shapes": the embedded model's), refused with the
    reason when its latents are not the denoiser's."""
    from diffusers import AutoencoderTiny

    path = embedded.FAST_DECODER_DIR if source == "shapes" else Path(source).expanduser()
    if source == "shapes" and not path.is_dir():
        raise StudioError("the embedded model's fast decoder is not shipped yet (the first distillation cost 23 points "
                          "of B1 shape accuracy); make one with `studio pretrain --stages fast_decoder` and pass its "
                          "folder")
    try:
        tiny = AutoencoderTiny.from_pretrained(str(path) if path.exists() else source, torch_dtype=torch_dtype,
                                               local_files_only=bool(offline) or path.exists())
    except Exception as e:  # a missing folder, no network, a config of another class
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StudioError(f"{source}: cannot be loaded as a fast decoder (AutoencoderTiny): {msg}") from None
    channels = pipe.vae.config.latent_channels
    if tiny.config.latent_channels != channels:
        raise StudioError(f"{source}: a fast decoder of {tiny.config.latent_channels} latent channels; the model's "
                          f"latents have {channels}")
    return tiny


def _open(source: str, torch_dtype: torch.dtype, config: str | None, offline: bool | None):
    """The pipeline of `source`, every way loading can fail turned into a one-line StudioError."""
    try:
        return _from_source(source, torch_dtype, config, offline)
    except StudioError:
        raise
    except OSError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(w in msg.lower() for w in ("connect", "offline", "internet", "resolve", "local_files_only", "hub")):
            raise StudioError(f"{source}: cannot be downloaded and is not in the local cache (offline or no network)"
                              ) from None
        raise StudioError(f"{source}: cannot be loaded: {msg}") from None
    except Exception as e:  # a corrupt file surfaces as many error types deep in the loaders
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StudioError(f"{source}: cannot be loaded ({type(e).__name__}: {msg})") from None


def _from_source(source: str, torch_dtype: torch.dtype, config: str | None, offline: bool | None):
    """The embedded model, a diffusers folder, a single checkpoint file or a hub id, by what `source` is."""
    from diffusers import DiffusionPipeline

    path = embedded.SHAPES_DIR if source == "shapes" else Path(source).expanduser()
    if source == "shapes" or path.is_dir():
        if not (path / "model_index.json").is_file():
            if source == "shapes":
                raise StudioError(f"the embedded model is missing from {path}; run `studio pretrain`")
            raise StudioError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return DiffusionPipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or path.exists():
        return _from_single_file(path, torch_dtype, config, offline)
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=bool(offline))
    raise StudioError(f"{source}: no such model (not 'shapes', a folder, a checkpoint file or a hub id)")


def _from_single_file(path: Path, torch_dtype: torch.dtype, config: str | None, offline: bool | None):
    if not path.is_file():
        raise StudioError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    cls = _single_file_pipeline(path)
    config = config or _embedded_config_for(path)
    kwargs = {"config": config} if config else {}
    kwargs.update(_separate_text_encoders(cls.__name__, path, config, torch_dtype, offline))
    return cls.from_single_file(str(path), dtype=torch_dtype, local_files_only=bool(offline), **kwargs)


# where an SD3 file holds each text encoder when it holds it (Stability ships them as separate files too)
_SD3_TEXT_ENCODERS = {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                      "text_encoder_3": "text_encoders.t5xxl."}


def _separate_text_encoders(pipeline: str, path: Path, config: str | None, torch_dtype: torch.dtype,
                            offline: bool | None) -> dict:
    """The text encoders an SD3 or Flux file does not hold, from the config folder or hub id (or the family's
    default repository): diffusers' single-file loader only takes a missing component from a folder that holds
    diffusers-named weights, which transformers' `model.safetensors` is not."""
    if pipeline not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        # the tensors' shapes without their data: diffusers tells the family's variants apart by keys and shapes
        shapes = {k: SimpleNamespace(shape=torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}
    keys = list(shapes)
    if config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        config = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    from diffusers import DiffusionPipeline
    import transformers

    index = DiffusionPipeline.load_config(config, local_files_only=bool(offline))
    missing = {}
    for name, (library, cls_name) in ((k, v) for k, v in index.items() if isinstance(v, list)):
        prefix = _SD3_TEXT_ENCODERS.get(name) if pipeline == "StableDiffusion3Pipeline" else None
        if library != "transformers" or not name.startswith("text_encoder") or (
                prefix and any(k.startswith(prefix) for k in keys)):
            continue
        missing[name] = getattr(transformers, cls_name).from_pretrained(
            config, subfolder=name, dtype=torch_dtype, local_files_only=bool(offline))
    return missing


def _attach_files(pipe, adapters, membranes, transport: str | None, one_step) -> None:
    from studio.adapters import AdapterError, load_adapters
    from studio.pipelines.membranes import load_membranes
    from studio.pipelines.one_step import load_one_step

    try:
        if adapters:
            load_adapters(pipe, adapters)
        if membranes:
            load_membranes(pipe, membranes, transport)
        if one_step:
            load_one_step(pipe, one_step)
    except AdapterError as e:
        raise StudioError(str(e)) from None


def _attach_control(pipe, control) -> None:
    from studio.adapters import AdapterError
    from studio.pipelines.control import load_control

    try:
        load_control(pipe, control)
    except AdapterError as e:
        raise StudioError(str(e)) from None


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise StudioError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
