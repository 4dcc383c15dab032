"""ControlNet (Zhang et al. 2023) as diffusers builds it: `ControlNetModel.from_unet` copies the UNet's encoder and
adds zero convolutions, so the untrained ControlNet leaves the base output unchanged. Saved in the studio adapter
file (with the diffusers config it was built from), and exported as a diffusers folder that
`ControlNetModel.from_pretrained` loads; diffusers ControlNet folders load here too. On SD3 and Flux the same with
diffusers' `SD3ControlNetModel` / `FluxControlNetModel` (`transformer_controlnet`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.adapters.base import AdapterError, denoiser, register
from studio.adapters.files import read_adapter
from studio.adapters.control.config import ControlNetConfig
from studio.adapters.control.method import LAYOUT_TIMESTEPS, ControlMethod


def _config_dict(model) -> dict:
    return {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}


@register
class ControlNetMethod(ControlMethod):
    name = "controlnet"
    config_class = ControlNetConfig
    prefix = "controlnet"
    presets = {"quick": {"lr": 1e-4, **LAYOUT_TIMESTEPS}, "standard": {"lr": 5e-5, **LAYOUT_TIMESTEPS}}

    supports_transformers = True

    def build(self, pipe, config: ControlNetConfig):
        import diffusers

        if config.controlnet_config:
            kind = getattr(diffusers, config.controlnet_class or "ControlNetModel")
            return kind.from_config(config.controlnet_config)
        if getattr(pipe, "unet", None) is None:
            model = transformer_controlnet(pipe.transformer, config)
        else:
            model = diffusers.ControlNetModel.from_unet(
                pipe.unet, conditioning_embedding_out_channels=tuple(config.embedding_channels))
        config.controlnet_config = _config_dict(model)  # saved with the adapter: it rebuilds without the denoiser
        config.controlnet_class = type(model).__name__
        return model

    def _attach_trainable(self, pipe, config: ControlNetConfig, adapter: str) -> None:
        factor = getattr(pipe, "vae_scale_factor", 8)
        if getattr(pipe, "unet", None) is not None and 2 ** (len(config.embedding_channels) - 1) != factor:
            raise AdapterError(f"ControlNet embedding_channels {config.embedding_channels} downsample by "
                               f"{2 ** (len(config.embedding_channels) - 1)}, the model's latents are 1/{factor} of "
                               f"the image: give {factor.bit_length()} widths")
        super()._attach_trainable(pipe, config, adapter)
        self._entry(pipe, adapter).module.train()

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor],
                        config: ControlNetConfig | None = None, base: dict | None = None,
                        source: str = "adapter") -> None:
        config = config or ControlNetConfig()
        self.check_base(pipe, base or {}, source)
        if not config.controlnet_config:
            raise AdapterError(f"{source}: the ControlNet file does not carry its diffusers config")
        self._add_loaded(pipe, adapter, config, tensors, source)

    def export_extra(self, path: Path) -> list[Path]:
        """The trained file also as a diffusers ControlNet folder (`path` without its suffix)."""
        return [export_controlnet(path, Path(path).with_suffix(""))]


def transformer_controlnet(transformer, config: ControlNetConfig):
    """SD3ControlNetModel / FluxControlNetModel from the transformer, as diffusers' SD3 and Flux ControlNet training
    scripts build them: its first blocks copied, the control latents read through a zero-initialised input
    projection (no extra channels), zero-initialised outputs. SD3's copy reads the pooled prompt and the VAE
    shift, as the SD3 ControlNet pipeline does for such a config."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    cfg = transformer.config
    if type(transformer).__name__.startswith("Flux"):
        return FluxControlNetModel.from_transformer(
            transformer, num_layers=min(config.transformer_layers or 4, cfg.num_layers),
            num_single_layers=min(config.single_layers or 10, cfg.num_single_layers),
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads)
    if cfg.num_layers < 2:
        raise AdapterError("an SD3 ControlNet copies joint blocks before the transformer's last (context-only) one; "
                           "this transformer has one block")
    # SD3's last block is context-pre-only, a ControlNet's blocks are not: at most num_layers - 1 copy over
    layers = min(config.transformer_layers or max(cfg.num_layers // 2, 1), cfg.num_layers - 1)
    model = SD3ControlNetModel.from_transformer(transformer, num_layers=layers, num_extra_conditioning_channels=0)
    model.register_to_config(force_zeros_for_pooled_projection=False)
    return model


def controlnet_module(pipe, adapter: str):
    """The diffusers ControlNetModel of a loaded ControlNet adapter (for diffusers' own ControlNet pipelines)."""
    return ControlNetMethod()._entry(pipe, adapter).module


def export_controlnet(adapter_file: str | Path, folder: str | Path) -> Path:
    """Write a studio ControlNet adapter file as a diffusers folder (config.json + safetensors weights) that
    `ControlNetModel.from_pretrained(folder)` (SD3ControlNetModel, FluxControlNetModel for those families) loads."""
    from studio.utils.files import atomic_dir

    file = read_adapter(adapter_file)
    if file.method != "controlnet":
        raise AdapterError(f"{adapter_file} is a {file.method} adapter, not a ControlNet")
    config = ControlNetConfig.from_dict(file.config)
    model = ControlNetMethod().build(None, config)
    own = {k[len("controlnet."):]: v for k, v in file.tensors.items() if k.startswith("controlnet.")}
    model.load_state_dict(own, strict=True)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return folder


def load_controlnet_folder(pipe, folder: str | Path, adapter: str, weight: float = 1.0) -> str:
    """Attach a diffusers ControlNet folder (ours exported, or any ControlNet of the loaded model's family: SD 1.x /
    SDXL, SD3, Flux) as a control adapter."""
    import diffusers

    from studio.adapters import attached_adapters

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AdapterError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    name, model_in = denoiser(pipe)
    kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "ControlNetModel")
    wanted = "ControlNetModel" if name == "unet" else FAMILY_CONTROLNETS.get(type(model_in).__name__, "")
    if kind != wanted:
        raise AdapterError(f"{folder}: a {kind}, but the loaded model's {name} ({type(model_in).__name__}) takes a "
                           f"{wanted or 'ControlNet of its own family'}")
    try:
        model = getattr(diffusers, kind).from_pretrained(folder, local_files_only=True)
    except Exception as e:  # diffusers raises several types for a bad folder
        raise AdapterError(f"{folder}: cannot be loaded as a ControlNet ({type(e).__name__}: {str(e).splitlines()[0]})"
                           ) from None
    _check_fits(folder, model, model_in)
    model.requires_grad_(False).eval()
    config = ControlNetConfig(controlnet_config=_config_dict(model), controlnet_class=kind)
    ControlNetMethod()._add(pipe, adapter, model.to(model_in.dtype), config)
    attached_adapters(pipe)[adapter] = {"method": "controlnet", "path": str(folder), "weight": weight}
    return adapter


FAMILY_CONTROLNETS = {"SD3Transformer2DModel": "SD3ControlNetModel", "FluxTransformer2DModel": "FluxControlNetModel"}


def _check_fits(folder: Path, model, denoiser_model) -> None:
    cfg, base = model.config, denoiser_model.config
    if "cross_attention_dim" in base:
        mine, theirs = (cfg.cross_attention_dim, list(cfg.block_out_channels)), (base.cross_attention_dim,
                                                                                  list(base.block_out_channels))
        what = "cross-attention and blocks"
    else:
        mine = (cfg.num_attention_heads * cfg.attention_head_dim, cfg.in_channels, cfg.get("patch_size"))
        theirs = (base.num_attention_heads * base.attention_head_dim, base.in_channels, base.get("patch_size"))
        what = "width, latent channels and patch size"
    if mine != theirs:
        raise AdapterError(f"{folder}: this ControlNet was built for a model with {what} {mine}; the loaded model has "
                           f"{theirs}")
