"""Methods that are a PEFT tuner as it stands (OFT, HRA): injected with `inject_adapter_in_model` on the
UNet's targeted linears, saved as `unet.<module>.<PEFT tensor name without the adapter name>`. Each method
folder gives its settings and how they become the PEFT config."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import ClassVar

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.adapters.base import (AdapterConfig, AdapterError, AdapterMethod, component, matches_target,
                                  replace_module, switched_on, target_regex)


class PeftTunerMethod(AdapterMethod):
    """A PEFT tuner as a studio method. PEFT's OFT and HRA layers cannot scale an adapter (a rotation has no
    linear "half"), so their adapters act at weight 1 or 0 only."""

    layer_class: ClassVar[type[BaseTunerLayer]]
    scalable = False

    def peft_config(self, config: AdapterConfig, targets):
        raise NotImplementedError

    def _layers(self, unet):
        for path, module in unet.named_modules():
            if isinstance(module, self.layer_class):
                yield path, module

    def _params(self, unet, adapter: str):
        """(file key, parameter) of `adapter`, e.g. `unet.<path>.oft_R.weight` for `<path>.oft_R.<adapter>.weight`."""
        for path, layer in sorted(self._layers(unet), key=lambda item: item[0]):
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                if adapter not in holder:
                    continue
                part = holder[adapter]
                if isinstance(part, torch.nn.Parameter):
                    yield f"unet.{path}.{attr}", part
                else:
                    for name, p in part.named_parameters():
                        yield f"unet.{path}.{attr}.{name}", p

    def _inject(self, unet, config: AdapterConfig, targets, adapter: str) -> None:
        inject_adapter_in_model(self.peft_config(config, targets), unet, adapter_name=adapter)

    def attach(self, pipe, config: AdapterConfig, adapter: str) -> None:
        unet = component(pipe, "unet")
        if not any(matches_target(path, config.target_modules) for path, _ in unet.named_modules()):
            raise AdapterError(f"no module of the unet matches the {self.name} targets {config.target_modules}")
        self._inject(unet, config, target_regex(config.target_modules), adapter)
        self._freeze_others(unet, adapter)

    def _freeze_others(self, unet, adapter: str | None) -> None:
        for _, layer in self._layers(unet):
            for attr in layer.adapter_layer_names:
                for name, part in getattr(layer, attr).items():
                    part.requires_grad_(name == adapter)

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._params(pipe.unet, adapter)]

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        return {key: p.detach().clone() for key, p in self._params(pipe.unet, adapter)}

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: AdapterConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        config = config or self.config_class()
        unet = component(pipe, "unet")
        modules = dict(unet.named_modules())
        attrs = "|".join(re.escape(a) for a in self.layer_class.adapter_layer_names)
        pattern = re.compile(rf"^unet\.(?P<path>.+?)\.(?:{attrs})(?:\..+)?$")
        paths = sorted({m.group("path") for key in tensors if (m := pattern.match(key))})
        if not paths:
            raise AdapterError(f"{source}: not a {self.name} file (no {self.name} tensors)")
        for path in paths:
            module = modules.get(path)
            if module is None or not isinstance(getattr(module, "base_layer", module), torch.nn.Linear):
                raise AdapterError(f"{source}: it adapts unet.{path}, which the loaded model does not have as a "
                                   "Linear (another architecture)")
        self._inject(unet, config, list(paths), adapter)  # a list: PEFT matches module names exactly
        try:
            mine = dict(self._params(unet, adapter))
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
        self._freeze_others(unet, None)

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, p in self._params(pipe.unet, adapter):
                p.copy_(tensors[key])

    @contextmanager
    def disabled(self, pipe):
        with switched_on([layer for _, layer in self._layers(pipe.unet)], "_disable_adapters"):
            yield

    def _check_weight(self, name: str, weight: float) -> None:
        if float(weight) not in (0.0, 1.0):
            raise AdapterError(f"{name} is a {self.name} adapter: it acts at weight 1 or 0 only "
                               f"(PEFT cannot scale a rotation), got {weight}")

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        for name, weight in weights.items():
            self._check_weight(name, weight)
        for _, layer in self._layers(pipe.unet):
            names = {n for attr in layer.adapter_layer_names for n in getattr(layer, attr)}
            layer.set_adapter([n for n, w in weights.items() if w and n in names], inference_mode=True)

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        self._check_weight(adapter, weight)
        for _, layer in self._layers(pipe.unet):
            if weight and adapter in getattr(layer, layer.adapter_layer_names[0]):
                layer.merge(adapter_names=[adapter])

    def unmerge(self, pipe) -> None:
        for _, layer in self._layers(pipe.unet):
            layer.unmerge()

    def unload(self, pipe) -> None:
        for path, layer in list(self._layers(pipe.unet)):
            replace_module(pipe.unet, path, layer.get_base_layer())

    def remove(self, pipe, adapter: str) -> None:
        for path, layer in list(self._layers(pipe.unet)):
            if adapter in getattr(layer, layer.adapter_layer_names[0]):
                layer.delete_adapter(adapter)
            if not any(len(getattr(layer, attr)) for attr in layer.adapter_layer_names):
                replace_module(pipe.unet, path, layer.get_base_layer())
