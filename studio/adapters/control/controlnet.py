"""ControlNet (Zhang et al. 2023) as diffusers builds it: `ControlNetModel.from_unet` copies the UNet's encoder and
adds zero convolutions, so the untrained ControlNet leaves the base output unchanged. Saved in the studio adapter
file (with the diffusers config it was built from), and exported as a diffusers folder that
`ControlNetModel.from_pretrained` loads; diffusers ControlNet folders load here too."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.adapters.base import AdapterError, register
from studio.adapters.files import read_adapter
from studio.adapters.control import inject
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

    def build(self, pipe, config: ControlNetConfig):
        from diffusers import ControlNetModel

        if config.controlnet_config:
            return ControlNetModel.from_config(config.controlnet_config)
        model = ControlNetModel.from_unet(pipe.unet,
                                          conditioning_embedding_out_channels=tuple(config.embedding_channels))
        config.controlnet_config = _config_dict(model)  # saved with the adapter: it rebuilds without the UNet
        return model

    def _attach_trainable(self, pipe, config: ControlNetConfig, adapter: str) -> None:
        factor = getattr(pipe, "vae_scale_factor", 8)
        if 2 ** (len(config.embedding_channels) - 1) != factor:
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
        model = self.build(pipe, config)
        model.requires_grad_(False).eval()
        self._add(pipe, adapter, model.to(pipe.unet.dtype), config)
        try:
            self.set_state(pipe, adapter, tensors)
        except AdapterError as e:
            inject.modules(pipe).pop(adapter)
            raise AdapterError(f"{source}: {e}") from None

    def export_extra(self, path: Path) -> list[Path]:
        """The trained file also as a diffusers ControlNet folder (`path` without its suffix)."""
        return [export_controlnet(path, Path(path).with_suffix(""))]


def controlnet_module(pipe, adapter: str):
    """The diffusers ControlNetModel of a loaded ControlNet adapter (for diffusers' own ControlNet pipelines)."""
    return ControlNetMethod()._entry(pipe, adapter).module


def export_controlnet(adapter_file: str | Path, folder: str | Path) -> Path:
    """Write a studio ControlNet adapter file as a diffusers folder (config.json + safetensors weights) that
    `ControlNetModel.from_pretrained(folder)` loads."""
    from diffusers import ControlNetModel

    from studio.utils.files import atomic_dir

    file = read_adapter(adapter_file)
    if file.method != "controlnet":
        raise AdapterError(f"{adapter_file} is a {file.method} adapter, not a ControlNet")
    config = ControlNetConfig.from_dict(file.config)
    model = ControlNetModel.from_config(config.controlnet_config)
    own = {k[len("controlnet."):]: v for k, v in file.tensors.items() if k.startswith("controlnet.")}
    model.load_state_dict(own, strict=True)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return folder


def load_controlnet_folder(pipe, folder: str | Path, adapter: str, weight: float = 1.0) -> str:
    """Attach a diffusers ControlNet folder (ours exported, or any SD ControlNet) as a control adapter."""
    from diffusers import ControlNetModel

    from studio.adapters import attached_adapters

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AdapterError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    try:
        model = ControlNetModel.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # diffusers raises several types for a bad folder
        raise AdapterError(f"{folder}: cannot be loaded as a ControlNet ({type(e).__name__}: {str(e).splitlines()[0]})"
                           ) from None
    cross = model.config.cross_attention_dim
    unet_cross = pipe.unet.config.cross_attention_dim
    if cross != unet_cross or list(model.config.block_out_channels) != list(pipe.unet.config.block_out_channels):
        raise AdapterError(f"{folder}: this ControlNet was built for a UNet with cross-attention {cross} and blocks "
                           f"{list(model.config.block_out_channels)}; the loaded model has {unet_cross} and "
                           f"{list(pipe.unet.config.block_out_channels)}")
    model.requires_grad_(False).eval()
    config = ControlNetConfig(controlnet_config=_config_dict(model))
    ControlNetMethod()._add(pipe, adapter, model.to(pipe.unet.dtype), config)
    attached_adapters(pipe)[adapter] = {"method": "controlnet", "path": str(folder), "weight": weight}
    return adapter
