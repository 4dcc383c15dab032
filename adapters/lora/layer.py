"""PEFT's LoRA linear with its forward routed through the fused adapter kernel."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from studio.kernels import kernel_path, lora_linear, stack_adapters


class FusedLoraLinear(PeftLoraLinear):
    """Same parameters, state and PEFT behaviour; the plain unmerged case (every active adapter vanilla
    LoRA, no dropout at work, uniform dtype, no autocast) runs `studio.kernels.lora_linear`, all active
    adapters in one call. Anything else takes PEFT's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = None
        if not (args or kwargs or self.disable_adapters or self.merged or torch.is_autocast_enabled(x.device.type)):
            plan = self._plan(x)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, *plan, path=kernel_path(x))

    def _plan(self, x: torch.Tensor) -> tuple | None:
        """(W, b, A, s·B) for the kernel, all active adapters stacked, or None where PEFT's forward must run.
        When no gradient is wanted the plan is kept between calls, keyed on what it depends on: the active
        adapters, their scales, x's dtype, train/eval mode and every weight's identity and version counter."""
        modules = self._modules  # (nn.Module.__getattr__ is slow enough to show on small layers)
        lora_a, lora_b, base = modules["lora_A"]._modules, modules["lora_B"]._modules, modules["base_layer"]
        scaling = self.scaling
        # weight 0 is off, exactly: left out rather than added as zeros to the stacked product
        active = [name for name in self.active_adapters if name in lora_a and scaling[name] != 0]
        if not active:
            return None
        weights = [(lora_a[name].weight, lora_b[name].weight) for name in active]
        trains = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in weights)
        key = None
        if not trains:
            key = (x.dtype, self.training, id(base), tuple(
                (name, scaling[name], id(a), a._version, id(b), b._version) for name, (a, b) in zip(active, weights)))
            cached = self.__dict__.get("_studio_plan")
            if cached is not None and cached[0] == key:
                return cached[1]
        plan = None
        dropout = self.lora_dropout
        if (isinstance(base, torch.nn.Linear) and base.weight.dtype == x.dtype
                and not any(name in self.lora_variant for name in active)
                and all(a.dtype == x.dtype for a, _ in weights)
                and not (self.training and any(isinstance(dropout[name], torch.nn.Dropout) and dropout[name].p > 0
                                               for name in active))):
            with torch.set_grad_enabled(trains):
                stacked = stack_adapters(*map(list, zip(*weights)), [scaling[name] for name in active])
            plan = (base.weight, base.bias, *stacked)
        if key is not None:
            self.__dict__["_studio_plan"] = (key, plan)
        return plan


def use_fused_layers(model: torch.nn.Module) -> int:
    """Swap PEFT's LoRA linears in `model` for `FusedLoraLinear` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
