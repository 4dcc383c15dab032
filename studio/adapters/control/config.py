"""Control adapter settings (stored in the adapter file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.adapters.base import AdapterConfig, AdapterError
from studio.utils.settings import setting


TUNE = ("all", "bias")


@dataclass
class ControlConfig(AdapterConfig):
    """What every control method has. `condition`: the kind of control image it was trained on (mask, edges,
    canny, ...). Few-shot adaptation to a new kind (UFC, Nguyen et al. 2025): `init_from` a trained control
    adapter of the same method, and `tune="bias"` trains only the bias vector of every layer (the small set of
    task parameters; the weights stay those learnt on the seen kinds)."""

    condition: str = setting("", help="the kind of control image it is trained on (mask, edges, canny, ...)")
    init_from: str = setting("", help="start from this trained adapter file of the same method (few-shot); '' : "
                                      "a new adapter", advanced=True)
    tune: str = setting("all", choices=TUNE, help="train every parameter, or only the biases (few-shot adaptation)",
                        advanced=True)

    def __post_init__(self) -> None:
        if self.tune not in TUNE:
            raise AdapterError(f"control tune takes {' or '.join(TUNE)}, got {self.tune!r}")


@dataclass
class ControlNeXtConfig(ControlConfig):
    """ControlNeXt: a light time-conditioned encoder of the control image whose feature, cross-normalised to the
    UNet's hidden state after `conv_in` (its mean and std per sample), is added to it, with no zero gate.
    `unet_trainable`: regexes on UNet parameter names trained beside it (the paper: the attention output
    projections), saved as weight deltas."""

    channels: list[int] = setting(default_factory=list, advanced=True,
                                  help="encoder widths, one stride-2 stage each (downsampling = the VAE's); empty: "
                                       "the paper's scaled to the UNet (filled in when attached)")
    unet_trainable: list[str] = setting(default_factory=lambda: [r"attn[12]\.to_out"], advanced=True,
                                        help="regexes on UNet parameter names also trained (saved as weight deltas)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.channels, default=1) < 1:
            raise AdapterError(f"ControlNeXt channels must be positive widths, got {self.channels}")
        self.channels = [int(c) for c in self.channels]


@dataclass
class ControlNetConfig(ControlConfig):
    """diffusers `ControlNetModel.from_unet`: a trainable copy of the UNet's encoder with zero convolutions; on SD3
    and Flux `SD3ControlNetModel` / `FluxControlNetModel.from_transformer`: a copy of the first transformer blocks
    with zero-initialised control input and output projections. `controlnet_config` is filled in when the adapter
    is attached (the diffusers config it was built with)."""

    embedding_channels: list[int] = setting(
        default_factory=lambda: [16, 32, 96, 256], advanced=True,
        help="widths of the control image's embedding, one stride-2 stage between each (downsampling = the VAE's)")
    controlnet_config: dict[str, Any] = setting(default_factory=dict, advanced=True,
                                                help="the diffusers ControlNet config (filled in when attached)")
    controlnet_class: str = setting("", advanced=True,
                                    help="the diffusers class of that config (filled in when attached; '': "
                                         "ControlNetModel)")
    transformer_layers: int = setting(0, advanced=True,
                                      help="SD3 / Flux: transformer blocks the ControlNet copies (0: diffusers' "
                                           "default, SD3 half the joint blocks, Flux 4, at most the model's)")
    single_layers: int = setting(0, advanced=True,
                                 help="Flux: single-stream blocks it copies (0: diffusers' default 10, at most "
                                      "the model's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.embedding_channels) < 2 or min(self.embedding_channels) < 1:
            raise AdapterError(f"ControlNet embedding_channels need at least two positive widths, "
                               f"got {self.embedding_channels}")
        self.embedding_channels = [int(c) for c in self.embedding_channels]


@dataclass
class T2IAdapterConfig(ControlConfig):
    """diffusers `T2IAdapter` ("full_adapter"): the control image pixel-unshuffled to latent resolution, then one
    feature per UNet down block (its channels), added inside the blocks (`down_intrablock_additional_residuals`).
    It takes no timestep. Not zero-initialised (as in the paper): scale 0 is the identity, step 0 is not."""

    num_res_blocks: int = setting(2, help="residual blocks per feature level (>= 1)", advanced=True)
    adapter_config: dict[str, Any] = setting(default_factory=dict, advanced=True,
                                             help="the diffusers T2IAdapter config (filled in when attached)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.num_res_blocks) < 1:
            raise AdapterError(f"T2I-Adapter num_res_blocks must be at least 1, got {self.num_res_blocks}")


@dataclass
class UFCConfig(ControlConfig):
    """UFC: query condition features matched against a stored support set of image-condition pairs (attention at
    every injection site), the label encoder a trainable copy of the UNet's encoder half. `tune="bias"` is the
    few-shot set: the label encoder's biases and the matching modules."""

    heads: int = setting(4, advanced=True, help="attention heads of each matching module (divides every width)")
    support: int = setting(3, help="support pairs per episode and in the saved support set (the paper's shots: 3)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.heads) < 1 or int(self.support) < 1:
            raise AdapterError(f"UFC heads and support must be at least 1, got {self.heads} and {self.support}")
        self.heads, self.support = int(self.heads), int(self.support)
