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
        plan = None if args or kwargs else self._plan(x)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, *plan, path=kernel_path(x))

    def _plan(self, x: torch.Tensor) -> tuple | None:
        """(W, b, A, s·B) for the kernel, all active adapters stacked, or None where PEFT's forward must run.
        When no gradient is wanted the plan is kept between calls, keyed on everything it depends on: the
        adapter state, x's dtype, autocast, train/eval mode, and the identity and version counter of every
        weight it was made from. The state is read from the instance's dict, not PEFT's properties and
        nn.Module's attribute lookup: on a small layer those lookups cost as much as the product."""
        state = self.__dict__
        if state["_disable_adapters"] or state["merged_adapters"] or torch.is_autocast_enabled(x.device.type):
            return None
        modules = state["_modules"]
        lora_a, lora_b, base = modules["lora_A"]._modules, modules["lora_B"]._modules, modules["base_layer"]
        scaling = state["scaling"]
        active = state["_active_adapter"]
        # weight 0 is off, exactly: left out rather than added as zeros to the stacked product
        active = [name for name in ((active,) if isinstance(active, str) else active)
                  if name in lora_a and scaling[name] != 0]
        if not active:
            return None
        weights = [base._parameters["weight"], base._parameters.get("bias")]
        for name in active:
            weights += (lora_a[name]._parameters["weight"], lora_b[name]._parameters["weight"])
        grad = torch.is_grad_enabled()
        key = None
        if not (grad and any(w.requires_grad for w in weights[2:])):
            # the plan holds W and b themselves, so their identity is enough; A and B it holds as copies
            key = (x.dtype, state["training"], id(weights[0]), id(weights[1]), tuple(scaling[name] for name in active),
                   tuple((id(w), w._version) for w in weights[2:]))
            cached = state.get("_studio_plan")
            if cached is not None and cached[0] == key:
                return cached[1]
        plan = None
        dropout = modules["lora_dropout"]._modules
        if (isinstance(base, torch.nn.Linear) and weights[0].dtype == x.dtype
                and not any(name in state["lora_variant"] for name in active)
                and all(w.dtype == x.dtype for w in weights[2::2])
                and not (state["training"] and any(isinstance(dropout[name], torch.nn.Dropout) and dropout[name].p > 0
                                                   for name in active))):
            with torch.set_grad_enabled(grad and key is None):
                stacked = stack_adapters(weights[2::2], weights[3::2], [scaling[name] for name in active])
            plan = (weights[0], weights[1], *stacked)
        if key is not None:
            state["_studio_plan"] = (key, plan)
        return plan


def use_fused_layers(model: torch.nn.Module) -> int:
    """Swap PEFT's LoRA linears in `model` for `FusedLoraLinear` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
