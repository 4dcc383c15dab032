"""SODA (Zhang, Wen, Han et al. 2024, "Spectrum-Aware Parameter-Efficient Fine-Tuning for Diffusion
Models", SODA-SVD): tune the singular values of each targeted linear and rotate its singular basis with a
Kronecker product of small orthogonal factors trained on the Stiefel manifold.

What differs from the official code, on purpose: δ is sized
min(out, in), so layers with out > in (SD 1.5's 768→1280 cross-attention) work; factor sizes come from a
rule for any width (kron.kron_plan) instead of a table; the rotation acts on the activations by mode
products instead of rebuilding W' and the n×n Kronecker matrix every call; δ starts at 0, so the model
starts exactly on the base; the SVD is taken in fp32 whatever the model's dtype. The file holds δ and
the factors and a digest of the targeted base weights: the SVD is recomputed at load time, so the file
only fits the checkpoint it was trained on (bake it to a LoRA for others)."""

from __future__ import annotations

import hashlib
import re
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.adapters.base import (COMPONENTS, AdapterError, component, components, denoiser, matches_target, register,
                                  text_encoder_names)
from studio.adapters.soda.config import SodaConfig
from studio.adapters.soda.kron import kron_plan
from studio.adapters.soda.layer import SodaLayer
from studio.adapters.soda.optimizer import StiefelAdam, soda_groups
from studio.adapters.wrapped import WrappedLayerMethod, digest_key, file_denoiser, refuse_shared_layers


# `<component>.<path>.delta` / `.rot_in.<i>` / `.rot_out.<i>` (component: the denoiser or a text encoder)
_KEY = re.compile(rf"^(?P<comp>{'|'.join(COMPONENTS)})\.(?P<path>.+)\.(?:delta|(?P<side>rot_in|rot_out)\.(?P<i>\d+))$")


def _targets(model: torch.nn.Module, patterns: list[str]):
    for path, module in model.named_modules():
        if ".base_layer" in f".{path}" or "lora_" in path:
            continue
        if isinstance(module, (SodaLayer, torch.nn.Linear)) and matches_target(path, patterns):
            yield path, module


def soda_layers(model: torch.nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, SodaLayer):
            yield path, module


def base_digest(model: torch.nn.Module, paths) -> torch.Tensor:
    """sha256 over the targeted base weights rounded to fp16 (so an fp16 load of the same checkpoint fits)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        module = model.get_submodule(path)
        w = module.base_layer.weight if isinstance(module, SodaLayer) else module.weight
        h.update(path.encode())
        h.update(w.detach().to(torch.float16).cpu().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


@register
class SodaMethod(WrappedLayerMethod):
    name = "soda"
    layer_class = SodaLayer
    config_class = SodaConfig
    presets = {"quick": {"lr": 2e-3, "adapter": {}}, "standard": {"lr": 1e-3, "adapter": {}}}

    def attach(self, pipe, config: SodaConfig, adapter: str) -> None:
        plan = self._plan(pipe, config)
        for comp, targets in plan.items():
            self._add_adapters(component(pipe, comp), targets, config, adapter)
        for comp in plan:
            self._freeze_others(component(pipe, comp), adapter)
        pipe._studio_soda_config = config  # the learning-rate scales, for the optimizer hook

    def _plan(self, pipe, config: SodaConfig) -> dict[str, list[str]]:
        """Component -> the paths SODA tunes in it: the denoiser's targets, and with `text_encoder` each text
        encoder whose modules match the text-encoder targets (a T5's other names match none)."""
        comp, model = denoiser(pipe)
        plan = {comp: [path for path, _ in _targets(model, config.target_modules)]}
        if not plan[comp]:
            raise AdapterError(f"no Linear of the {comp} matches the SODA targets {config.target_modules}")
        if config.text_encoder:
            for name in text_encoder_names(pipe):
                paths = [path for path, _ in _targets(component(pipe, name), config.text_encoder_target_modules)]
                if paths:
                    plan[name] = paths
            if len(plan) == 1:
                raise AdapterError(f"no text encoder has Linear modules matching the SODA text-encoder targets "
                                   f"{config.text_encoder_target_modules}")
        return plan

    def _add_adapters(self, model, paths, config: SodaConfig, adapter: str) -> None:
        self._install(model, paths)
        for path in paths:
            module = model.get_submodule(path)
            if adapter in module.adapters:
                raise AdapterError(f"a SODA adapter named {adapter!r} is already attached")
            module.add_adapter(adapter, count=config.kron_factors, max_factor=config.max_factor,
                               both=config.rotate == "both", delta_init=config.delta_init)

    def _parts(self, pipe, adapter: str):
        """(component, path, layer, adapter's tensors) in a fixed order: the denoiser's, then the encoders'."""
        for comp, model in components(pipe):
            for path, layer in sorted(soda_layers(model), key=lambda item: item[0]):
                if adapter in layer.adapters:
                    yield comp, path, layer, layer.adapters[adapter]

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        return [p for _, _, _, a in self._parts(pipe, adapter) for p in a.parameters()]

    def optimizer(self, pipe, adapter: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                  kind: str = "adamw") -> torch.optim.Optimizer:
        """StiefelAdam for the factors (they stay orthogonal), AdamW for δ; the text encoders' at
        lr·text_encoder_lr_scale."""
        if kind != "adamw":
            raise AdapterError(f"SODA trains its rotations with StiefelAdam; optimizer {kind!r} is not available "
                               "for it")
        config = getattr(pipe, "_studio_soda_config", None) or SodaConfig()
        wanted, groups, parts = {id(p) for p in params}, [], list(self._parts(pipe, adapter))
        for text, scale in ((False, 1.0), (True, config.text_encoder_lr_scale)):
            mine = [a for comp, _, _, a in parts if comp.startswith("text_encoder") == text]
            factors = [q for a in mine for q in a.factors() if id(q) in wanted]
            shifts = [a.delta for a in mine if id(a.delta) in wanted]
            groups += soda_groups(factors, shifts, lr=lr * scale, weight_decay=weight_decay,
                                  rotation_lr_scale=config.rotation_lr_scale)
        return StiefelAdam(groups, lr=lr)

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        out, paths = {}, {}
        for comp, path, _, a in self._parts(pipe, adapter):
            out[f"{comp}.{path}.delta"] = a.delta.detach().clone()
            for side in ("rot_in", "rot_out"):
                rotation = getattr(a, side)
                for i, q in enumerate(rotation.factors if rotation is not None else []):
                    out[f"{comp}.{path}.{side}.{i}"] = q.detach().clone()
            paths.setdefault(comp, []).append(path)
        for comp, comp_paths in paths.items():
            out[digest_key(comp, self.name)] = base_digest(component(pipe, comp), comp_paths)
        return out

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: SodaConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        config = config or SodaConfig()
        comp, _ = file_denoiser(pipe, tensors, source)
        found: dict[str, set[str]] = {}
        for key in tensors:
            if m := _KEY.match(key):
                found.setdefault(m.group("comp"), set()).add(m.group("path"))
        plan = {name: sorted(paths) for name, paths in found.items()}
        if comp not in plan or digest_key(comp, self.name) not in tensors:
            raise AdapterError(f"{source}: not a SODA file (no singular-value shifts, or no base digest)")
        for name, paths in plan.items():  # everything is checked before anything is attached
            self._check_fits(component(pipe, name), name, paths, tensors, config, source)
        for name, paths in plan.items():
            self._add_adapters(component(pipe, name), paths, config, adapter)
        self.set_state(pipe, adapter, tensors)
        for name in plan:
            self._freeze_others(component(pipe, name), None)

    def _check_fits(self, model, comp: str, paths: list[str], tensors, config: SodaConfig, source: str) -> None:
        """Refuse a file whose layers `model` does not have with its shapes, or whose SVD came from other
        weights."""
        modules = dict(model.named_modules())
        refuse_shared_layers(model, paths, source, BaseTunerLayer)
        for path in paths:
            module = modules.get(path)
            layer = module.base_layer if isinstance(module, SodaLayer) else module
            if not isinstance(layer, torch.nn.Linear):
                raise AdapterError(f"{source}: it adapts {comp}.{path}, which the loaded model does not have as a "
                                   "Linear (another architecture)")
            out_f, in_f = layer.weight.shape
            expected = {"delta": (min(out_f, in_f),)}
            for side, width in (("rot_in", in_f), ("rot_out", out_f)):
                sizes = [k for k in kron_plan(width, config.kron_factors, config.max_factor)[0] if k > 1]
                if side == "rot_in" or config.rotate == "both":
                    expected.update({f"{side}.{i}": (k, k) for i, k in enumerate(sizes)})
            for part, shape in expected.items():
                tensor = tensors.get(f"{comp}.{path}.{part}")
                if tensor is None or tuple(tensor.shape) != shape:
                    got = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
                    raise AdapterError(f"{source}: {comp}.{path}.{part} is {got}; the loaded model's layer "
                                       f"({in_f}→{out_f}) needs {shape} (another architecture)")
        digest = tensors.get(digest_key(comp, self.name))
        if digest is None or not torch.equal(base_digest(model, paths), digest):
            raise AdapterError(f"{source} was trained on another checkpoint: the weights of the {comp} layers it "
                               "adapts differ from the loaded model's (SODA rotates and rescales the exact singular "
                               "vectors it was trained on; bake it to a LoRA for other checkpoints)")

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for comp, path, _, a in self._parts(pipe, adapter):
                a.delta.copy_(tensors[f"{comp}.{path}.delta"])
                for side in ("rot_in", "rot_out"):
                    rotation = getattr(a, side)
                    for i, q in enumerate(rotation.factors if rotation is not None else []):
                        q.copy_(tensors[f"{comp}.{path}.{side}.{i}"])

    def delta_weights(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        """<component>.<path> (`unet.<path>`, `transformer.<path>`, `text_encoder.<path>`) -> W' − W at weight 1
        (what bake.py truncates to a LoRA)."""
        with torch.no_grad():
            return {f"{comp}.{path}": layer.delta_weight(adapter)
                    for comp, path, layer, _ in self._parts(pipe, adapter)}
