"""SaRA (Hu et al. 2024, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
Adaptation"): fine-tune only the weights whose magnitude is below a threshold — the ones pruning shows to
be nearly ineffective — with a nuclear-norm penalty that keeps the sparse update low-rank.

What differs from the official code, on purpose: the update is a
separate `values` parameter at stored indices (starting at zero: no sign flip of the selected weights),
so gradient clipping, accumulation and DDP see an ordinary parameter; the penalty is on the update ΔW
(the paper's low-rank sparse update) and its gradient reaches the trained values; the file carries the
indices and a digest of the base weights at them, so it is refused on any other checkpoint."""

from __future__ import annotations

import hashlib
import logging
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.adapters.base import AdapterError, denoiser, matches_target, register
from studio.adapters.sara.config import SaraConfig, parse_budget
from studio.adapters.sara.layer import SaraLayer
from studio.adapters.wrapped import WrappedLayerMethod, digest_key, file_denoiser, refuse_shared_layers
from studio.kernels.sparse_delta import dense_delta

log = logging.getLogger(__name__)




def _targets(model: torch.nn.Module, patterns: list[str]):
    """(path, layer) for each Linear / Conv2d (or SaRA-wrapped one) whose path matches a pattern."""
    for path, module in model.named_modules():
        if ".base_layer" in f".{path}" or "lora_" in path:
            continue
        if isinstance(module, (SaraLayer, torch.nn.Linear, torch.nn.Conv2d)) and matches_target(path, patterns):
            yield path, module


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    return module.base_layer.weight if isinstance(module, SaraLayer) else module.weight


def threshold_for(weights: list[torch.Tensor], count: int) -> float:
    """The θ with #{|w| < θ} closest to `count` (bisection on counts: no sort of all weights)."""
    lo, hi = 0.0, max(float(w.detach().abs().max()) for w in weights) * 1.0001
    for _ in range(40):
        mid = (lo + hi) / 2
        below = sum(int((w.detach().abs() < mid).sum()) for w in weights)
        if below < count:
            lo = mid
        else:
            hi = mid
    return hi


def _sara_layers(model: torch.nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, SaraLayer):
            yield path, module


def base_digest(model: torch.nn.Module, adapter: str) -> torch.Tensor:
    """sha256 of the base weights at every trained entry, in layer order (a uint8 tensor)."""
    h = hashlib.sha256()
    for path, layer in sorted(_sara_layers(model), key=lambda item: item[0]):
        if adapter in layer.patterns:
            h.update(path.encode())
            w = layer.base_layer.weight.detach().reshape(-1)[layer.patterns[adapter].index]
            h.update(w.float().cpu().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


@register
class SaraMethod(WrappedLayerMethod):
    name = "sara"
    layer_class = SaraLayer
    config_class = SaraConfig
    presets = {"quick": {"lr": 1e-3, "adapter": {"budget": "3%"}},
               "standard": {"lr": 5e-4, "adapter": {"budget": "3%"}}}

    def attach(self, pipe, config: SaraConfig, adapter: str) -> None:
        comp, model = denoiser(pipe)
        targets = list(_targets(model, config.target_modules))
        if not targets:
            raise AdapterError(f"no Linear or Conv2d of the {comp} matches the SaRA targets {config.target_modules}")
        weights = [_base_weight(m) for _, m in targets]
        total = sum(w.numel() for w in weights)
        theta = (float(config.threshold) if config.threshold is not None
                 else threshold_for(weights, parse_budget(config.budget, total)))
        index = {path: (w.detach().abs() < theta).reshape(-1).nonzero().squeeze(1)
                 for (path, _), w in zip(targets, weights)}
        selected = {p: i for p, i in index.items() if i.numel()}
        if not selected:
            raise AdapterError(f"no weight of the targets is below the SaRA threshold {theta:g}")
        self._install(model, selected)
        for path, idx in selected.items():
            layer = model.get_submodule(path)
            layer.add_adapter(adapter, idx)
            layer.thresholds[adapter] = theta
        self._freeze_others(model, adapter)
        pipe._studio_sara_config = config  # the penalty's settings, for training_loss
        count = sum(i.numel() for i in selected.values())
        log.info("SaRA %s: threshold %.3g selects %d of %d weights (%.2f%%) in %d layers", adapter, theta, count,
                 total, 100 * count / total, len(selected))
        self.selection = {"threshold": theta, "trained": count, "total": total,
                          "per_layer": {p: (int(i.numel()), int(model.get_submodule(p).base_layer.weight.numel()))
                                        for p, i in selected.items()}}

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        comp, model = denoiser(pipe)
        out = {}
        for path, layer in _sara_layers(model):
            if adapter in layer.values:
                index = layer.patterns[adapter].index.cpu()
                out[f"{comp}.{path}.indices"] = index.int() if layer.base_layer.weight.numel() < 2**31 else index
                out[f"{comp}.{path}.values"] = layer.values[adapter].detach().cpu().clone()
                out[f"{comp}.{path}.shape"] = torch.tensor(layer.weight_shape, dtype=torch.int64)
                if _reselects(pipe):  # (a checkpoint must say what re-selection froze, to resume after it)
                    out[f"{comp}.{path}.frozen"] = layer.frozen[adapter].cpu().to(torch.uint8)
        out[digest_key(comp, self.name)] = base_digest(model, adapter)
        return out

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: SaraConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        comp, model = file_denoiser(pipe, tensors, source)
        modules = dict(model.named_modules())
        prefix = f"{comp}."
        stray = sorted(key for key in tensors if key.endswith(".indices") and not key.startswith(prefix))
        if stray:
            raise AdapterError(f"{source}: {stray[0]} names no layer of the loaded model's {comp} "
                               "(SaRA trains the denoiser only)")
        paths = sorted({key[len(prefix):-len(".indices")] for key in tensors if key.endswith(".indices")})
        refuse_shared_layers(model, paths, source, BaseTunerLayer)
        if not paths or digest_key(comp, self.name) not in tensors:
            raise AdapterError(f"{source}: not a SaRA file (no indices, or no base digest)")
        for path in paths:
            module = modules.get(path)
            if module is None or not isinstance(module, (SaraLayer, torch.nn.Linear, torch.nn.Conv2d)):
                raise AdapterError(f"{source}: it trains {comp}.{path}, which the loaded model does not have "
                                   "as a Linear/Conv2d (another architecture)")
            idx, values = tensors[f"{comp}.{path}.indices"], tensors.get(f"{comp}.{path}.values")
            shape = tensors.get(f"{comp}.{path}.shape")
            weight = _base_weight(module)
            out_of_range = idx.numel() and int(idx.max()) >= weight.numel()
            if (values is None or values.shape != idx.shape or shape is None
                    or tuple(shape.tolist()) != tuple(weight.shape) or out_of_range):
                raise AdapterError(f"{source}: {comp}.{path} does not fit the loaded model's layer "
                                   f"(it was trained on {tuple(shape.tolist()) if shape is not None else '?'}, "
                                   f"the loaded layer is {tuple(weight.shape)})")
        self._install(model, paths)
        for path in paths:
            model.get_submodule(path).add_adapter(adapter, tensors[f"{comp}.{path}.indices"].long())
        if not torch.equal(base_digest(model, adapter), tensors[digest_key(comp, self.name)]):
            self.remove(pipe, adapter)
            raise AdapterError(f"{source} was trained on another checkpoint: the base weights at its trained entries "
                               "differ from the loaded model's (a SaRA update only fits the exact weights it was "
                               "trained on; bake it to a LoRA for other checkpoints)")
        self.set_state(pipe, adapter, tensors)
        self._freeze_others(model, None)

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        comp, model = denoiser(pipe)
        for path, layer in _sara_layers(model):
            if adapter in layer.values:
                with torch.no_grad():
                    layer.values[adapter].copy_(tensors[f"{comp}.{path}.values"])
                frozen = tensors.get(f"{comp}.{path}.frozen")
                if frozen is not None and bool(frozen.any()):
                    layer.freeze(adapter, frozen.bool())

    def after_step(self, pipe, adapter: str, step: int, optimizer) -> str | None:
        """Keep frozen entries where they were and, at `reselect_at`, freeze the trained entries whose
        weight has grown past the threshold (their optimizer moments zeroed; the rest keep theirs)."""
        layers = [layer for _, layer in _sara_layers(denoiser(pipe)[1]) if adapter in layer.thresholds]
        for layer in layers:
            layer.hold_frozen(adapter)
        config = getattr(pipe, "_studio_sara_config", None)
        if config is None or config.reselect_at != step:
            return None
        grown_total = trained = 0
        for layer in layers:
            values = layer.values[adapter]
            weight = layer.base_layer.weight.detach().reshape(-1)[layer.patterns[adapter].index] + values.detach()
            grown = weight.abs() >= layer.thresholds[adapter]
            layer.freeze(adapter, grown)
            for moment in optimizer.state.get(values, {}).values():
                if torch.is_tensor(moment) and moment.shape == values.shape:
                    moment[layer.frozen[adapter]] = 0
            grown_total += int(layer.frozen[adapter].sum())
            trained += values.numel()
        return (f"SaRA re-selection at step {step}: {grown_total} of {trained} trained weights grew past the "
                f"threshold and are frozen; {trained - grown_total} train on")

    def training_loss(self, pipe, batch: dict, default_loss) -> torch.Tensor:
        loss = default_loss(batch)
        training = [(p, layer, n) for p, layer in _sara_layers(denoiser(pipe)[1]) for n, v in layer.values.items()
                    if v.requires_grad]
        if not training:
            return loss
        config = getattr(pipe, "_studio_sara_config", None) or SaraConfig()
        return loss + nuclear_penalty(training, config, int(batch.get("step", 0)))


def _reselects(pipe) -> bool:
    config = getattr(pipe, "_studio_sara_config", None)
    return config is not None and config.reselect_at is not None


def nuclear_penalty(training: list, config: SaraConfig, step: int) -> torch.Tensor:
    """λ·Σ‖ΔW_l‖_* over `nuclear_layers` layers drawn for this step (all eligible ones when 0). The draw
    depends on the step only, so every micro-batch of a step penalises the same layers."""
    eligible = []
    for path, layer, name in training:
        if min(layer.patterns[name].shape) >= config.nuclear_min_dim:
            eligible.append((path, layer, name))
    if not eligible or config.nuclear_weight == 0:
        return torch.zeros((), device=training[0][1].base_layer.weight.device)
    eligible.sort(key=lambda item: item[0])
    if config.nuclear_layers and config.nuclear_layers < len(eligible):
        gen = torch.Generator().manual_seed(step)
        picks = torch.randperm(len(eligible), generator=gen)[:config.nuclear_layers].tolist()
        eligible = [eligible[i] for i in sorted(picks)]
    total = 0.0
    for _, layer, name in eligible:  # ΔW as (out, in·kernel), with its gradient path to the values
        delta = dense_delta(layer.values[name], layer.patterns[name])
        total = total + torch.linalg.matrix_norm(delta, ord="nuc")
    return config.nuclear_weight * total
