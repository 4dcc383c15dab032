"""A light ControlNeXt-style module (Peng et al. 2024): a small conv encoder of the control image whose feature is
added to the UNet's hidden state after `conv_in`, with Cross Normalization (the feature normalised per sample and
given the hidden state's mean and std), through a zero-initialised 1×1 conv. Optionally a few UNet layers are
trained too (`unet_trainable` regexes), stored as weight deltas."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from studio.adapters.base import AdapterError, register
from studio.adapters.control import inject
from studio.adapters.control.config import ControlNeXtConfig
from studio.adapters.control.method import LAYOUT_TIMESTEPS, ControlMethod

EPS = 1e-6


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ControlNeXtEncoder(nn.Module):
    """Control image (Bx3xHxW in [0, 1]) -> feature at 1/2^(len(channels)-1) resolution with `out_channels`."""

    def __init__(self, out_channels: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1),
                                   nn.GroupNorm(_groups(channels[0]), channels[0]), nn.SiLU()]
        for cin, cout in zip(channels, channels[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels[-1], out_channels, 1)
        # zero at the start, so the untrained module leaves the UNet unchanged; a 1×1 conv rather than a scalar
        # gate: a scalar's one gradient is the sum of noisy per-channel ones, and with the encoder receiving no
        # gradient while it is 0 it never opened (B5: still −0.003 after 200 steps of batch 8)
        self.gate = nn.Conv2d(out_channels, out_channels, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, image: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The term added to `hidden`: gate(cross_norm(feature, hidden)), gate a zero-initialised 1×1 conv."""
        feat = self.out(self.body(image * 2 - 1))
        if feat.shape[-2:] != hidden.shape[-2:]:
            feat = nn.functional.adaptive_avg_pool2d(feat, hidden.shape[-2:])
        return self.gate(cross_normalize(feat, hidden))


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
    presets = {"quick": {"lr": 1e-3, **LAYOUT_TIMESTEPS}, "standard": {"lr": 5e-4, **LAYOUT_TIMESTEPS}}

    def build(self, pipe, config: ControlNeXtConfig) -> nn.Module:
        factor = getattr(pipe, "vae_scale_factor", 8)
        if 2 ** (len(config.channels) - 1) != factor:
            raise AdapterError(f"ControlNeXt channels {config.channels} downsample by "
                               f"{2 ** (len(config.channels) - 1)}, the model's latents are 1/{factor} of the image: "
                               f"give {factor.bit_length()} widths")
        return ControlNeXtEncoder(pipe.unet.config.block_out_channels[0], config.channels)

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
