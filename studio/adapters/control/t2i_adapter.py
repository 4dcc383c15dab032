"""T2I-Adapter (Mou et al. 2023) as diffusers builds it (`T2IAdapter`: "full_adapter", or "full_adapter_xl" on an
SDXL UNet), sized to the loaded UNet's down blocks; its features go into the UNet through
`down_intrablock_additional_residuals`."""

from __future__ import annotations

import json

import torch

from studio.adapters.base import AdapterError, register
from studio.adapters.control.config import T2IAdapterConfig
from studio.adapters.control.method import LAYOUT_TIMESTEPS, ControlMethod


@register
class T2IAdapterMethod(ControlMethod):
    name = "t2i_adapter"
    config_class = T2IAdapterConfig
    prefix = "t2i_adapter"
    presets = {"quick": {"lr": 1e-3, **LAYOUT_TIMESTEPS}, "standard": {"lr": 5e-4, **LAYOUT_TIMESTEPS}}

    def build(self, pipe, config: T2IAdapterConfig):
        from diffusers import T2IAdapter

        if config.adapter_config:
            return T2IAdapter.from_config(config.adapter_config)
        unet, factor = pipe.unet.config, getattr(pipe, "vae_scale_factor", 8)
        channels = list(unet.block_out_channels)
        if _sdxl_layout(unet):  # SDXL's first block downsamples before its feature is added: the XL adapter
            model = T2IAdapter(in_channels=3, channels=channels + channels[-1:], num_res_blocks=config.num_res_blocks,
                               downscale_factor=2 * factor, adapter_type="full_adapter_xl")
        else:
            model = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=config.num_res_blocks,
                               downscale_factor=factor, adapter_type="full_adapter")
        config.adapter_config = {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}
        return model

    def _attach_trainable(self, pipe, config: T2IAdapterConfig, adapter: str) -> None:
        unet = pipe.unet.config
        if _sdxl_layout(unet) and len(unet.block_out_channels) != 3:
            raise AdapterError(f"T2I-Adapter-XL fits SDXL's three down blocks; this UNet has "
                               f"{len(unet.block_out_channels)}")
        super()._attach_trainable(pipe, config, adapter)

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor],
                        config: T2IAdapterConfig | None = None, base: dict | None = None,
                        source: str = "adapter") -> None:
        config = config or T2IAdapterConfig()
        self.check_base(pipe, base or {}, source)
        if not config.adapter_config:
            raise AdapterError(f"{source}: the T2I-Adapter file does not carry its diffusers config")
        self._add_loaded(pipe, adapter, config, tensors, source)


def _sdxl_layout(unet_config) -> bool:
    """SDXL's UNet: size/crop conditioning and a first down block without attention (which downsamples)."""
    return (unet_config.get("addition_embed_type") == "text_time"
            and unet_config.get("down_block_types", [""])[0] == "DownBlock2D")
