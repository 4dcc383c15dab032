"""Methods that are a PEFT tuner as it stands (OFT, HRA): injected with `inject_adapter_in_model` on the
denoiser's targeted linears (the UNet's, or a diffusion transformer's), saved as
`<denoiser>.<module>.<PEFT tensor name without the adapter name>` (`unet.…` / `transformer.…`). Each method
folder gives its settings and how they become the PEFT config."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import ClassVar

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.adapters.base import (AdapterConfig, AdapterError, AdapterMethod, denoiser, matches_target,
                                  replace_module, switched_on, target_regex)
from studio.adapters.wrapped import WrappedLayer, file_denoiser, refuse_shared_layers


def _adapter_names(layer: BaseTunerLayer) -> set[str]:
    """The adapters a PEFT tuner layer holds tensors of."""
    return {n for attr in layer.adapter_layer_names for n in getattr(layer, attr)}


class PeftTunerMethod(AdapterMethod):
    """A PEFT tuner as a studio method. PEFT's OFT and HRA layers cannot scale an adapter (a rotation has no
    linear "half"), so their adapters act at weight 1 or 0 only."""

    layer_class: ClassVar[type[BaseTunerLayer]]
    scalable = False

    def peft_config(self, config: AdapterConfig, targets):
        raise NotImplementedError

    def _layers(self, model):
        for path, module in model.named_modules():
            if isinstance(module, self.layer_class):
                yield path, module

    def _params(self, pipe, adapter: str):
        """(file key, parameter) of `adapter` in the denoiser, e.g. `unet.<path>.oft_R.weight` (a transformer's:
        `transformer.<path>.oft_R.weight`) for `<path>.oft_R.<adapter>.weight`."""
        comp, model = denoiser(pipe)
        for path, layer in sorted(self._layers(model), key=lambda item: item[0]):
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                if adapter not in holder:
                    continue
                part = holder[adapter]
                if isinstance(part, torch.nn.Parameter):
                    yield f"{comp}.{path}.{attr}", part
                else:
                    for name, p in part.named_parameters():
                        yield f"{comp}.{path}.{attr}.{name}", p

    def _inject(self, model, config: AdapterConfig, targets, adapter: str) -> None:
        inject_adapter_in_model(self.peft_config(config, targets), model, adapter_name=adapter)

    def attach(self, pipe, config: AdapterConfig, adapter: str) -> None:
        comp, model = denoiser(pipe)
        if not any(matches_target(path, config.target_modules) for path, _ in model.named_modules()):
            raise AdapterError(f"no module of the {comp} matches the {self.name} targets {config.target_modules}")
        self._inject(model, config, target_regex(config.target_modules), adapter)
        self._freeze_others(model, adapter)

    def _freeze_others(self, model, adapter: str | None) -> None:
        for _, layer in self._layers(model):
            for attr in layer.adapter_layer_names:
                for name, part in getattr(layer, attr).items():
                    part.requires_grad_(name == adapter)

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._params(pipe, adapter)]

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        return {key: p.detach().clone() for key, p in self._params(pipe, adapter)}

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: AdapterConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        config = config or self.config_class()
        comp, model = file_denoiser(pipe, tensors, source)
        modules = dict(model.named_modules())
        attrs = "|".join(re.escape(a) for a in self.layer_class.adapter_layer_names)
        pattern = re.compile(rf"^{re.escape(comp)}\.(?P<path>.+?)\.(?:{attrs})(?:\..+)?$")
        paths = sorted({m.group("path") for key in tensors if (m := pattern.match(key))})
        if not paths:
            raise AdapterError(f"{source}: not a {self.name} file (no {self.name} tensors)")
        refuse_shared_layers(model, paths, source, WrappedLayer)
        for path in paths:
            module = modules.get(path)
            if module is None or not isinstance(getattr(module, "base_layer", module), torch.nn.Linear):
                raise AdapterError(f"{source}: it adapts {comp}.{path}, which the loaded model does not have as a "
                                   "Linear (another architecture)")
        self._inject(model, config, list(paths), adapter)  # a list: PEFT matches module names exactly
        try:
            mine = dict(self._params(pipe, adapter))
            if set(mine) != set(tensors):
                unexpected, missing = len(set(tensors) - set(mine)), len(set(mine) - set(tensors))
                raise AdapterError(f"{source}: its tensors do not match what its settings create on this model "
                                   f"({unexpected} unexpected, {missing} missing)")
            for key, p in mine.items():
                if tuple(p.shape) != tuple(tensors[key].shape):
                    raise AdapterError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, the loaded model "
                                       f"needs {tuple(p.shape)} (another architecture)")
        except AdapterError:
            self.remove(pipe, adapter)
            raise
        self.set_state(pipe, adapter, tensors)
        self._freeze_others(model, None)

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, p in self._params(pipe, adapter):
                p.copy_(tensors[key])

    @contextmanager
    def disabled(self, pipe):
        with switched_on([layer for _, layer in self._layers(denoiser(pipe)[1])], "_disable_adapters"):
            yield

    def _check_weight(self, name: str, weight: float) -> None:
        if float(weight) not in (0.0, 1.0):
            raise AdapterError(f"{name} is a {self.name} adapter: it acts at weight 1 or 0 only "
                               f"(PEFT cannot scale a rotation), got {weight}")

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        for name, weight in weights.items():
            self._check_weight(name, weight)
        for _, layer in self._layers(denoiser(pipe)[1]):
            names = _adapter_names(layer)
            layer.set_adapter([n for n, w in weights.items() if w and n in names], inference_mode=True)

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        self._check_weight(adapter, weight)
        for _, layer in self._layers(denoiser(pipe)[1]):
            if weight and adapter in getattr(layer, layer.adapter_layer_names[0]):
                layer.merge(adapter_names=[adapter])

    def unmerge(self, pipe) -> None:
        for _, layer in self._layers(denoiser(pipe)[1]):
            layer.unmerge()

    def unload(self, pipe) -> None:
        _, model = denoiser(pipe)
        for path, layer in list(self._layers(model)):
            replace_module(model, path, layer.get_base_layer())

    def remove(self, pipe, adapter: str) -> None:
        _, model = denoiser(pipe)
        for path, layer in list(self._layers(model)):
            if adapter in getattr(layer, layer.adapter_layer_names[0]):
                layer.delete_adapter(adapter)
            if not any(len(getattr(layer, attr)) for attr in layer.adapter_layer_names):
                replace_module(model, path, layer.get_base_layer())


class ScalablePeftTunerMethod(PeftTunerMethod):
    """A PEFT tuner whose update is additive and scaled (LyCORIS's LoHa and LoKr): any weight, as for LoRA."""

    scalable = True

    def _check_weight(self, name: str, weight: float) -> None:
        pass

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        for _, layer in self._layers(denoiser(pipe)[1]):
            names = _adapter_names(layer)
            active = [n for n, w in weights.items() if n in names]
            layer.set_adapter(active, inference_mode=True)
            for name in active:
                layer.set_scale(name, float(weights[name]))

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        for _, layer in self._layers(denoiser(pipe)[1]):
            names = _adapter_names(layer)
            if adapter in names:
                layer.set_scale(adapter, float(weight))
                layer.merge(adapter_names=[adapter])
