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
        # weight 0 is off, exactly: left out rather than added as zeros to the stacked product
        active = [name for name in self.active_adapters if name in self.lora_A and self.scaling[name] != 0]
        base = self.base_layer
        if (args or kwargs or not active or self.disable_adapters or self.merged
                or any(name in self.lora_variant for name in active)
                or (self.training and any(self.lora_dropout[name].p > 0 for name in active
                                          if isinstance(self.lora_dropout[name], torch.nn.Dropout)))
                or not isinstance(base, torch.nn.Linear) or torch.is_autocast_enabled(x.device.type)
                or any(self.lora_A[name].weight.dtype != x.dtype for name in active)
                or base.weight.dtype != x.dtype):
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self._stacked(active)
        return lora_linear(x, base.weight, base.bias, lora_a, lora_b, path=kernel_path(x))

    def _stacked(self, active: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The active adapters as one (A, s·B) pair; kept between calls while no gradient is wanted and
        neither the adapters, their scales nor their weights (by version counter) changed."""
        weights = [(self.lora_A[name].weight, self.lora_B[name].weight) for name in active]
        if torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in weights):
            return stack_adapters(*zip(*weights), [self.scaling[name] for name in active])
        key = tuple((name, self.scaling[name], id(a), a._version, id(b), b._version)
                    for name, (a, b) in zip(active, weights))
        cached = self.__dict__.get("_studio_stack")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, *stack_adapters(*zip(*weights), [self.scaling[name] for name in active]))
            self.__dict__["_studio_stack"] = cached
        return cached[1], cached[2]


def use_fused_layers(model: torch.nn.Module) -> int:
    """Swap PEFT's LoRA linears in `model` for `FusedLoraLinear` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
