"""ControlNeXt (Peng et al. 2024): a light, time-conditioned encoder of the control image whose feature, aligned to
the UNet's hidden state by Cross Normalization (normalised per sample, then given the hidden state's mean and std),
is added to it after `conv_in`; no zero convolution or gate (Cross Normalization is what lets it train without
one, so the fresh module is not the identity). The paper also tunes the UNet's attention output projections
(`unet_trainable`, saved as weight deltas), at a tenth of the module's learning rate."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from studio.adapters.base import AdapterError, register
from studio.adapters.control import inject
from studio.adapters.control.config import ControlNeXtConfig
from studio.adapters.control.method import LAYOUT_TIMESTEPS, ControlMethod

EPS = 1e-6
MODULE_LR_SCALE = 10.0  # the paper trains the module at 10x the UNet layers' learning rate


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 2)


def default_widths(unet_channels: int, vae_factor: int) -> list[int]:
    """The paper's widths (64, 128, 256 for SD 1.5's 320-channel UNet) scaled to the UNet's `conv_in` width, in
    multiples of 8; one width per halving of the resolution."""
    return [8 * math.ceil(unet_channels * 2 ** i / 5 / 8) for i in range(int(math.log2(vae_factor)))]


class ControlNeXtEncoder(nn.Module):
    """Control image (Bx3xHxW in [0, 1]) and timestep -> the term added to the UNet's hidden state. A stem (two
    3x3 convs, the first of stride 2) to channels[0]; for each further width a ResnetBlock2D that reads the time
    embedding, then a stride-2 Downsample2D; a time-conditioned residual block and a 1x1 conv to the UNet's width."""

    def __init__(self, out_channels: int, channels: list[int]) -> None:
        super().__init__()
        c0, temb = channels[0], 4 * channels[0]
        self.time_proj = Timesteps(2 * c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(2 * c0, temb)
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, stride=2, padding=1), nn.GroupNorm(_groups(c0), c0), nn.ReLU(),
                                  nn.Conv2d(c0, c0, 3, padding=1), nn.GroupNorm(_groups(c0), c0), nn.ReLU())
        self.blocks = nn.ModuleList(
            ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=_groups(cin),
                          groups_out=_groups(cout)) for cin, cout in zip(channels, channels[1:]))
        self.downsamplers = nn.ModuleList(Downsample2D(c, use_conv=True, padding=1) for c in channels[1:])
        self.mid = ResnetBlock2D(in_channels=channels[-1], out_channels=channels[-1], temb_channels=temb,
                                 groups=_groups(channels[-1]))
        self.out = nn.Conv2d(channels[-1], out_channels, 1)

    def feature(self, image: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """The control feature before Cross Normalization (1/2^len(channels) of the image)."""
        t = torch.as_tensor(timestep, device=image.device).reshape(-1).expand(image.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(image.dtype))
        x = self.stem(image * 2 - 1)
        for block, down in zip(self.blocks, self.downsamplers):
            x = down(block(x, temb))
        return self.out(self.mid(x, temb))

    def forward(self, image: torch.Tensor, hidden: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        feat = self.feature(image, timestep)
        if feat.shape[-2:] != hidden.shape[-2:]:
            feat = nn.functional.adaptive_avg_pool2d(feat, hidden.shape[-2:])
        return cross_normalize(feat, hidden)


def cross_normalize(feat: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per sample, over (C, H, W): (feat - mean(feat)) / std(feat) * std(hidden) + mean(hidden)."""
    dims = tuple(range(1, feat.ndim))
    f_mean, f_std = feat.mean(dims, keepdim=True), feat.std(dims, keepdim=True)
    h_mean, h_std = hidden.mean(dims, keepdim=True), hidden.std(dims, keepdim=True)
    return (feat - f_mean) / (f_std + EPS) * h_std + h_mean


def _unet_params(pipe, patterns: list[str]) -> dict[str, nn.Parameter]:
    if not patterns:
        return {}
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    found = {n: p for n, p in pipe.unet.named_parameters() if regex.search(n)}
    if not found:
        raise AdapterError(f"no UNet parameter matches unet_trainable {patterns}")
    return found


@register
class ControlNeXtMethod(ControlMethod):
    name = "controlnext"
    config_class = ControlNeXtConfig
    prefix = "controlnext"
    # lr: the tuned UNet layers'; the module trains at MODULE_LR_SCALE times it
    presets = {"quick": {"lr": 1e-4, **LAYOUT_TIMESTEPS}, "standard": {"lr": 5e-5, **LAYOUT_TIMESTEPS}}

    def build(self, pipe, config: ControlNeXtConfig) -> nn.Module:
        factor = getattr(pipe, "vae_scale_factor", 8)
        width = pipe.unet.config.block_out_channels[0]
        if not config.channels:  # filled in, so the file records the widths it was built with
            config.channels = default_widths(width, factor)
        if 2 ** len(config.channels) != factor:
            raise AdapterError(f"ControlNeXt channels {config.channels} downsample by {2 ** len(config.channels)}, "
                               f"the model's latents are 1/{factor} of the image: give {int(math.log2(factor))} "
                               "widths")
        return ControlNeXtEncoder(width, config.channels)

    def optimizer(self, pipe, adapter: str, params: list[nn.Parameter], *, lr: float, weight_decay: float,
                  kind: str = "adamw") -> torch.optim.Optimizer | None:
        """AdamW with the module at MODULE_LR_SCALE x `lr` and the tuned UNet layers at `lr` (the paper's split)."""
        if kind != "adamw":
            return None
        own = {id(p) for p in self._entry(pipe, adapter).module.parameters()}
        groups = [{"params": [p for p in params if id(p) in own], "lr": lr * MODULE_LR_SCALE},
                  {"params": [p for p in params if id(p) not in own], "lr": lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)

    def _attach_trainable(self, pipe, config: ControlNeXtConfig, adapter: str) -> None:
        unet_params = _unet_params(pipe, config.unet_trainable)
        super()._attach_trainable(pipe, config, adapter)
        entry = self._entry(pipe, adapter)
        bases = inject.state(pipe)["unet_bases"]
        for name, p in unet_params.items():
            bases.setdefault(name, p.detach().clone())
            entry.originals[name] = bases[name]
            p.requires_grad_(True)

    def _train_biases_only(self, pipe, adapter: str) -> None:
        super()._train_biases_only(pipe, adapter)
        unet = dict(pipe.unet.named_parameters())
        for name in self._entry(pipe, adapter).originals:
            unet[name].requires_grad_(name.endswith("bias"))

    def trainable_parameters(self, pipe, adapter: str) -> list[nn.Parameter]:
        entry = self._entry(pipe, adapter)
        unet = dict(pipe.unet.named_parameters())
        return super().trainable_parameters(pipe, adapter) + [unet[n] for n in entry.originals if unet[n].requires_grad]

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        entry = self._entry(pipe, adapter)
        out = super().state_dict(pipe, adapter)
        unet = dict(pipe.unet.named_parameters())
        for name, original in entry.originals.items():
            out[f"unet.{name}.delta"] = (unet[name].detach() - original).clone()
        for name, delta in entry.deltas.items():
            out[f"unet.{name}.delta"] = delta.clone()
        return out

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        super().set_state(pipe, adapter, tensors)
        entry = self._entry(pipe, adapter)
        unet = dict(pipe.unet.named_parameters())
        with torch.no_grad():
            for name, original in entry.originals.items():   # training: resume the tuned UNet weights
                unet[name].copy_(original + tensors[f"unet.{name}.delta"])

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor],
                        config: ControlNeXtConfig | None = None, base: dict | None = None,
                        source: str = "adapter") -> None:
        config = config or ControlNeXtConfig()
        self.check_base(pipe, base or {}, source)
        unet = dict(pipe.unet.named_parameters())
        deltas = {k[len("unet."):-len(".delta")]: v for k, v in tensors.items() if k.startswith("unet.")}
        for name, delta in deltas.items():
            if name not in unet or tuple(unet[name].shape) != tuple(delta.shape):
                raise AdapterError(f"{source}: its UNet delta {name} does not fit the loaded model")
        module = self.build(pipe, config)
        module.requires_grad_(False)
        entry = self._add(pipe, adapter, module, config)
        try:
            super().set_state(pipe, adapter, tensors)
        except AdapterError as e:
            inject.modules(pipe).pop(adapter)
            raise AdapterError(f"{source}: {e}") from None
        bases = inject.state(pipe)["unet_bases"]
        for name, delta in deltas.items():
            bases.setdefault(name, unet[name].detach().clone())
            entry.deltas[name] = delta.to(unet[name])
        _apply_deltas(pipe)

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        """The conditioning scale, and the UNet deltas of each loaded adapter at its weight (0: the base layers)."""
        super().set_weights(pipe, weights)
        for name, entry in inject.modules(pipe).items():
            if entry.method == self.name:
                entry.weight = float(weights.get(name, 0.0))
        _apply_deltas(pipe)

    @contextmanager
    def disabled(self, pipe):
        """No control, and the tuned UNet layers at their base values (the parameters themselves are set aside,
        untouched, so a graph that holds them stays valid)."""
        bases = inject.state(pipe)["unet_bases"]
        unet = pipe.unet
        swapped = []
        for name, base in bases.items():
            owner, _, leaf = name.rpartition(".")
            module = unet.get_submodule(owner)
            swapped.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = nn.Parameter(base, requires_grad=False)
        try:
            with super().disabled(pipe):
                yield
        finally:
            for module, leaf, param in swapped:
                module._parameters[leaf] = param

    def remove(self, pipe, adapter: str) -> None:
        super().remove(pipe, adapter)
        _apply_deltas(pipe)


def _apply_deltas(pipe) -> None:
    """Set every UNet parameter a control adapter changed to its base value plus the deltas of the loaded adapters
    at their weights; one trained by an attached adapter is left to it, one no adapter changes any more is given
    back its base value exactly (and forgotten)."""
    bases = inject.state(pipe)["unet_bases"]
    entries = list(inject.modules(pipe).values())
    trained = {name for entry in entries for name in entry.originals}
    unet = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name in list(bases):
            if name in trained:
                continue
            value = bases[name]
            for entry in entries:
                if name in entry.deltas and entry.weight:
                    value = value + entry.weight * entry.deltas[name]
            unet[name].copy_(value)
            if not any(name in entry.deltas for entry in entries):
                del bases[name]
