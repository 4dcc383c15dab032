"""LoRA attached through PEFT's layers; several named adapters can live in the same modules."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from studio.adapters.base import (AdapterError, AdapterMethod, base_linear, check_fits, component, components,
                                  denoiser, matches_target, module_path_of, register, replace_module, split_key,
                                  switched_on, target_regex, text_encoder_names)
from studio.adapters.lora.config import UNET_RESNET_CONVS, LoraConfig
from studio.adapters.lora.layer import use_fused_layers
from studio.adapters.wrapped import WrappedLayer, refuse_shared_layers


def _lora_layers(model: torch.nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def _peft_config(targets: list[str] | str, config: LoraConfig, rank_pattern=None, alpha_pattern=None):
    return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                          rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, init_lora_weights=True,
                          use_dora=config.dora)


MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-output magnitude (PEFT's and diffusers' name)


def expected_shape(module: torch.nn.Module, key: str, tensor: torch.Tensor):
    """The shape `tensor` (a lora_A/lora_B weight) must have on `module` at its own rank."""
    layer = base_linear(module)
    if isinstance(layer, torch.nn.Linear):
        fan_in, fan_out, kernel = layer.in_features, layer.out_features, ()
    elif isinstance(layer, torch.nn.Conv2d):
        fan_in, fan_out, kernel = layer.in_channels, layer.out_channels, tuple(layer.kernel_size)
    else:
        raise AdapterError(f"LoRA cannot target {type(layer).__name__} modules ({key})")
    if f".{MAGNITUDE}." in key:
        return (fan_out,)
    rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[1]
    if ".lora_A." in key:
        return (rank, fan_in, *kernel)
    return (fan_out, rank, *(1 for _ in kernel))


def _match_text_model_prefix(pipe, tensors: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 CLIP models have no `text_model.` level; files from other tools name it. `tensors`:
    anything keyed `<component>.<module path>...` (tensors, a config's alpha_pattern)."""
    out = {}
    for key, tensor in tensors.items():
        comp, rest = split_key(key)
        if comp.startswith("text_encoder") and rest.startswith("text_model."):
            if not hasattr(component(pipe, comp), "text_model"):
                rest = rest[len("text_model."):]
        out[f"{comp}.{rest}"] = tensor
    return out


def _matches_any(model: torch.nn.Module, patterns: list[str]) -> bool:
    return any(matches_target(path, patterns) for path, _ in model.named_modules())


@register
class LoraMethod(AdapterMethod):
    name = "lora"
    config_class = LoraConfig
    presets = {"quick": {"lr": 5e-3, "adapter": {"rank": 8}}, "standard": {"lr": 1e-3, "adapter": {"rank": 16}}}

    def attach(self, pipe, config: LoraConfig, adapter: str) -> None:
        comp, _ = denoiser(pipe)
        if config.resnet_convs and comp != "unet":
            raise AdapterError(f"resnet_convs puts LoRA on a UNet's ResNet convolutions; the loaded model's {comp} "
                               "has no ResNet convolutions (turn resnet_convs off)")
        plan = [(comp, config.target_modules + (UNET_RESNET_CONVS if config.resnet_convs else []))]
        if config.text_encoder:  # every CLIP-like encoder the model has (SDXL: both, as kohya and diffusers train
            # them); a T5 (SD3, Flux), whose layers have other names, only where the targets name its layers
            encoders = [name for name in text_encoder_names(pipe)
                        if _matches_any(component(pipe, name), config.text_encoder_target_modules)]
            if not encoders:
                raise AdapterError(f"no text encoder has modules matching the LoRA text-encoder targets "
                                   f"{config.text_encoder_target_modules}")
            plan += [(name, config.text_encoder_target_modules) for name in encoders]
        for comp, patterns in plan:
            model = component(pipe, comp)
            if not _matches_any(model, patterns):
                raise AdapterError(f"no module of the {comp} matches the LoRA targets {patterns}")
            inject_adapter_in_model(_peft_config(target_regex(patterns), config), model, adapter_name=adapter)
            use_fused_layers(model)
        self._freeze_others(pipe, adapter)

    def _freeze_others(self, pipe, adapter: str | None) -> None:
        # PEFT makes a freshly injected adapter trainable and leaves the rest as it was: state it explicitly
        # (adapter None: a loaded adapter, nothing trains)
        for _, model in components(pipe):
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.requires_grad_(f".{adapter}." in name)

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        params = []
        for _, model in components(pipe):
            for name, param in model.named_parameters():
                if ".lora_" in name and f".{adapter}." in name:
                    params.append(param)
        return params

    def parameter_roles(self, pipe, adapter: str, params: list[torch.nn.Parameter]) -> dict[int, str]:
        wanted = {id(p) for p in params}
        return {id(p): "lora_B" for _, model in components(pipe) for name, p in model.named_parameters()
                if ".lora_B." in name and id(p) in wanted}

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        out = {}
        for comp, model in components(pipe):
            for path, layer in _lora_layers(model):
                if adapter in layer.lora_A:
                    out[f"{comp}.{path}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().clone()
                    out[f"{comp}.{path}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().clone()
                    if adapter in layer.lora_magnitude_vector:
                        magnitude = layer.lora_magnitude_vector[adapter].weight
                        out[f"{comp}.{path}.{MAGNITUDE}.weight"] = magnitude.detach().clone()
        return out

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: LoraConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        """Attach `adapter` exactly on the modules the tensors name, after checking they fit."""
        tensors = _match_text_model_prefix(pipe, tensors)
        check_fits(pipe, tensors, expected_shape, base or {}, source)
        by_comp: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            comp, rest = split_key(key)
            by_comp.setdefault(comp, {})[rest] = tensor
        for comp, sub in by_comp.items():
            refuse_shared_layers(component(pipe, comp), {module_path_of(k) for k in sub}, source, WrappedLayer)
        config = config or LoraConfig()
        alpha_pattern = _match_text_model_prefix(pipe, config.alpha_pattern)
        for comp, sub in by_comp.items():
            model = component(pipe, comp)
            paths = sorted({module_path_of(k) for k in sub})
            ranks = {p: int(sub[f"{p}.lora_A.weight"].shape[0]) for p in paths}
            default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
            # a file's alpha is per module (kohya) or one value for all; PEFT takes the odd ones as patterns
            alphas = {p: float(alpha_pattern.get(f"{comp}.{p}", config.alpha)) for p in paths}
            default_alpha = alphas[paths[0]]
            cfg = LoraConfig(rank=default_rank, alpha=default_alpha, dropout=config.dropout,
                             dora=any(f".{MAGNITUDE}." in k for k in sub))
            rank_pattern = {re.escape(p): r for p, r in ranks.items() if r != default_rank}
            alpha_pattern = {re.escape(p): a for p, a in alphas.items() if a != default_alpha}
            inject_adapter_in_model(_peft_config(paths, cfg, rank_pattern, alpha_pattern), model, adapter_name=adapter)
            use_fused_layers(model)
        self.set_state(pipe, adapter, tensors)
        self._freeze_others(pipe, None)

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        for comp, model in components(pipe):
            for path, layer in _lora_layers(model):
                if adapter in layer.lora_A:
                    with torch.no_grad():
                        layer.lora_A[adapter].weight.copy_(tensors[f"{comp}.{path}.lora_A.weight"])
                        layer.lora_B[adapter].weight.copy_(tensors[f"{comp}.{path}.lora_B.weight"])
                        if adapter in layer.lora_magnitude_vector:
                            layer.lora_magnitude_vector[adapter].weight.copy_(
                                tensors[f"{comp}.{path}.{MAGNITUDE}.weight"])

    @contextmanager
    def disabled(self, pipe):
        # PEFT's own switch; its public toggle also changes requires_grad
        with switched_on([layer for _, model in components(pipe) for _, layer in _lora_layers(model)],
                         "_disable_adapters"):
            yield

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        # PEFT layers are shared with other methods built on them (SPM's membranes): leave theirs as they are
        others = {name for name, info in getattr(pipe, "_studio_adapters", {}).items()
                  if info["method"] != self.name and name not in weights}
        for _, model in components(pipe):
            for _, layer in _lora_layers(model):
                kept = [name for name in layer.active_adapters if name in others]
                # weight 0 is off (left out: a DoRA adapter at scale 0 would still rescale by its magnitude)
                active = kept + [name for name in weights if name in layer.lora_A and weights[name] != 0]
                layer.set_adapter(active, inference_mode=True)
                for name in active:
                    if name in weights:
                        layer.set_scale(name, float(weights[name]))

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        for _, model in components(pipe):
            for _, layer in _lora_layers(model):
                if adapter in layer.lora_A:
                    layer.set_scale(adapter, float(weight))
                    layer.merge(adapter_names=[adapter])

    def unmerge(self, pipe) -> None:
        for _, model in components(pipe):
            for _, layer in _lora_layers(model):
                layer.unmerge()

    def unload(self, pipe) -> None:
        """Replace every LoRA layer by its base layer (keeping whatever was merged into it)."""
        for _, model in components(pipe):
            for path, layer in list(_lora_layers(model)):
                replace_module(model, path, layer.get_base_layer())

    def remove(self, pipe, adapter: str) -> None:
        """Drop `adapter`; a layer left with no adapter (of any method on PEFT's LoRA layers) is replaced by its
        base layer, so removing every adapter gives back the model's own modules."""
        for _, model in components(pipe):
            for path, layer in list(_lora_layers(model)):
                if adapter in layer.lora_A:
                    layer.delete_adapter(adapter)
                if not any(len(getattr(layer, attr)) for attr in layer.adapter_layer_names):
                    replace_module(model, path, layer.get_base_layer())
