"""What methods whose adapters live in a layer wrapped around the original one (SaRA, SODA) share: the layer's
bookkeeping of named adapters (weights, merged, the off switch, the cached inference weight, the forward that
sends one training adapter through the method's own path) and the method's install / weights / merge / unload /
remove boilerplate. A method supplies its layer class (its tensors, how its update enters a weight and a forward)
and how it attaches and saves."""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch

from studio.adapters.base import (DENOISERS, AdapterError, AdapterMethod, components, denoiser, replace_module,
                                  switched_on)


class WrappedLayer(torch.nn.Module):
    """A frozen `base_layer` with named adapters on it. Subclasses hold each adapter's tensors and say how its
    update is added to a weight (`add_update`) and how a training adapter runs (`training_forward`)."""

    label: ClassVar[str] = "adapter"  # the method's name in messages

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.weights: dict[str, float] = {}   # active adapters and their weights
        self.merged: dict = {}                # adapters folded into base_layer.weight (what each subclass needs)
        self.disabled = False
        self._cache = None

    _SHAPE_ATTRIBUTES = frozenset({"in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                                   "stride", "padding", "dilation", "groups"})

    def __getattr__(self, name: str):
        # the wrapped layer's shape, which models read off their layers (SDXL's pipeline reads
        # `add_embedding.linear_1.in_features`), as PEFT's layers expose it
        if name in WrappedLayer._SHAPE_ATTRIBUTES:
            return getattr(self._modules["base_layer"], name)
        return super().__getattr__(name)

    # -- what each layer class supplies --

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _drop(self, name: str) -> None:
        """Forget adapter `name`'s tensors."""
        raise NotImplementedError

    def add_update(self, weight: torch.Tensor, name: str, scale: float) -> None:
        """weight += scale · ΔW of adapter `name`, in place and without gradient (`weight` is a copy)."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with another weight (and its own bias)."""
        raise NotImplementedError

    def training_forward(self, x: torch.Tensor, name: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
        """The output with the training adapter `name` at `scale` on top of `weight` (the base weight, or it
        with the other active adapters folded in), with gradients to the adapter's parameters."""
        raise NotImplementedError

    # -- shared --

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        self._drop(name)
        self.weights.pop(name, None)

    def _active(self) -> list[tuple[str, float]]:
        if self.disabled:
            return []
        return [(n, w) for n, w in self.weights.items() if w != 0 and n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base_layer(x)
        training = [(n, w) for n, w in active if torch.is_grad_enabled()
                    and any(p.requires_grad for p in self.adapter_parameters(n))]
        if not training:
            return self.linear(x, self._inference_weight(active))
        if len(training) > 1:
            raise RuntimeError(f"{self.label} trains one adapter at a time")
        (name, scale), others = training[0], [(n, w) for n, w in active if n != training[0][0]]
        weight = self._inference_weight(others) if others else self.base_layer.weight
        return self.training_forward(x, name, scale, weight)

    def _inference_weight(self, active: list[tuple[str, float]]) -> torch.Tensor:
        """The base weight with the active adapters' updates added, cached while none of them changes."""
        w = self.base_layer.weight
        key = (id(w), w._version, tuple((n, s, tuple(p._version for p in self.adapter_parameters(n)))
                                        for n, s in active))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                total = w.detach().clone()
                for n, s in active:
                    self.add_update(total, n, s)
            self._cache = (key, total)
        return self._cache[1]


SHARED_LAYER = ("SaRA and SODA adapters and those of PEFT's layers (LoRA, OFT, HRA, SPM membranes, HiPA) cannot "
                "share a layer yet: merge one into the model first (studio merge) or use them one at a time")


def refuse_shared_layers(model: torch.nn.Module, paths, source: str, kind: type) -> None:
    """Refuse, before anything attaches, a file whose layers already carry an adapter of `kind` (PEFT's
    BaseTunerLayer for SaRA/SODA files, WrappedLayer for PEFT methods' files): the two wrappers do not nest."""
    modules = dict(model.named_modules())
    for path in paths:
        if isinstance(modules.get(path), kind):
            raise AdapterError(f"{source}: {path} already carries another kind of adapter; {SHARED_LAYER}")


def digest_key(comp: str, method: str) -> str:
    """The key of a method's base-weight digest in a file of the denoiser `comp` (`unet.sara_base_digest`,
    `transformer.soda_base_digest`)."""
    return f"{comp}.{method}_base_digest"


def file_denoiser(pipe, tensors, source: str) -> tuple[str, torch.nn.Module]:
    """The loaded pipeline's denoiser (component name, module) for a file whose tensors are keyed
    `<denoiser>.<path>...`, refused when the keys name another denoiser (a UNet's file on a diffusion transformer
    or the reverse). Keys naming no denoiser (a text encoder's, the trigger embedding) are not looked at."""
    comp, model = denoiser(pipe)
    named = sorted({key.partition(".")[0] for key in tensors} & set(DENOISERS) - {comp})
    if named:
        raise AdapterError(f"{source}: it adapts the {' and '.join(named)}, which the loaded model does not have "
                           f"(its denoiser is a {comp}: another architecture)")
    return comp, model


class WrappedLayerMethod(AdapterMethod):
    """A method whose adapters live in `layer_class` layers put in place of a model component's own (the
    denoiser's, UNet or diffusion transformer: `base.denoiser`; SODA also a text encoder's)."""

    layer_class: ClassVar[type[WrappedLayer]]

    def _layers(self, model: torch.nn.Module) -> Iterator[tuple[str, WrappedLayer]]:
        for path, module in model.named_modules():
            if isinstance(module, self.layer_class):
                yield path, module

    def _pipe_layers(self, pipe) -> Iterator[tuple[torch.nn.Module, str, WrappedLayer]]:
        """(component, path, layer) for each of this method's layers in any component of the pipeline."""
        for _, model in components(pipe):
            for path, layer in list(self._layers(model)):
                yield model, path, layer

    def _install(self, model: torch.nn.Module, paths) -> None:
        """Wrap the modules at `paths` (those not wrapped yet)."""
        for path in paths:
            module = model.get_submodule(path)
            if not isinstance(module, self.layer_class):
                replace_module(model, path, self.layer_class(module))

    def _freeze_others(self, model: torch.nn.Module, adapter: str | None) -> None:
        """Only `adapter` trains (None: nothing does, as after loading a file)."""
        for _, layer in self._layers(model):
            for name in layer.adapter_names():
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(name == adapter)

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        return [p for _, _, layer in self._pipe_layers(pipe) if layer.has_adapter(adapter)
                for p in layer.adapter_parameters(adapter)]

    @contextmanager
    def disabled(self, pipe):
        with switched_on([layer for _, _, layer in self._pipe_layers(pipe)], "disabled"):
            yield

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        for _, _, layer in self._pipe_layers(pipe):
            layer.weights = {n: float(w) for n, w in weights.items() if layer.has_adapter(n)}

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        for _, _, layer in self._pipe_layers(pipe):
            if layer.has_adapter(adapter):
                layer.merge(adapter, float(weight))

    def unmerge(self, pipe) -> None:
        for _, _, layer in self._pipe_layers(pipe):
            layer.unmerge()

    def unload(self, pipe) -> None:
        for model, path, layer in self._pipe_layers(pipe):
            replace_module(model, path, layer.base_layer)

    def remove(self, pipe, adapter: str) -> None:
        for model, path, layer in self._pipe_layers(pipe):
            if layer.has_adapter(adapter):
                layer.delete_adapter(adapter)
            if not layer.adapter_names():
                replace_module(model, path, layer.base_layer)
