"""What the control methods share: modules kept on the pipeline (not inside the UNet, so the base model's
fingerprint and `save_pretrained` are unchanged), a training loss that feeds the batch's control images through
the hook, and the fit check of a file against the loaded model."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from studio.adapters.base import (AdapterError, AdapterMethod, base_fingerprint, denoiser, describe_base,
                                  require_unet)
from studio.adapters.files import read_adapter
from studio.adapters.control import inject

# The engine's timestep settings a control adapter trains with by default (its presets, `studio bench control`):
# the layout is decided at high noise, where uniform timesteps and epsilon MSE hardly reward a shape in the right
# place (BENCHMARKS.md, B5). 84% of the timesteps drawn from the noisiest 40% (the multiplier of 8 beat 3 in B5
# trials), the loss in x0 space.
LAYOUT_TIMESTEPS = {"timestep_bias": "later", "timestep_bias_multiplier": 8.0, "timestep_bias_portion": 0.4,
                    "x0_weighting": True}


class ControlMethod(AdapterMethod):
    kind = "control"
    conditioned = True   # the engine gives it a control image per example (batch["control"])
    mergeable = False    # it needs a control image at generation: there is nothing to fold into the weights
    prefix = "control"   # tensor keys: "<prefix>.<module tensor>"
    supports_transformers = False  # ControlNet also steers SD3 / Flux transformers; the others feed UNet blocks

    # -- the module itself, per method --

    def build(self, pipe, config) -> torch.nn.Module:
        raise NotImplementedError

    # -- shared --

    def _add(self, pipe, adapter: str, module: torch.nn.Module, config) -> inject.ControlModule:
        if adapter in inject.modules(pipe):
            raise AdapterError(f"a control adapter named {adapter!r} is already loaded")
        self._require_denoiser(pipe)
        module.to(next(denoiser(pipe)[1].parameters()).device)
        entry = inject.ControlModule(self.name, module, config)
        inject.modules(pipe)[adapter] = entry
        inject.install(pipe)
        return entry

    def _add_loaded(self, pipe, adapter: str, config, tensors: dict[str, torch.Tensor], source: str
                    ) -> inject.ControlModule:
        """A frozen module built from `config`, in the denoiser's dtype, holding `tensors` (what a file loads);
        nothing stays attached when they do not fit."""
        module = self.build(pipe, config)
        module.requires_grad_(False).eval()
        entry = self._add(pipe, adapter, module.to(denoiser(pipe)[1].dtype), config)
        try:
            self.set_state(pipe, adapter, tensors)
        except AdapterError as e:
            inject.modules(pipe).pop(adapter)
            raise AdapterError(f"{source}: {e}") from None
        return entry

    def attach(self, pipe, config, adapter: str) -> None:
        """Attach for training: a new module, or one that starts from `config.init_from`; with `tune="bias"`
        only its biases train."""
        self._require_denoiser(pipe)
        start = self._initial_tensors(pipe, config)
        self._attach_trainable(pipe, config, adapter)
        if start is not None:
            self.set_state(pipe, adapter, start)
        if config.tune == "bias":
            self._train_biases_only(pipe, adapter)
        inject.state(pipe)["training"] = adapter

    def _require_denoiser(self, pipe) -> None:
        if not self.supports_transformers:
            require_unet(pipe, self.name)  # its hook feeds a UNet's blocks

    def _attach_trainable(self, pipe, config, adapter: str) -> None:
        torch_module = self.build(pipe, config)
        torch_module.requires_grad_(True)
        self._add(pipe, adapter, torch_module, config)

    def _initial_tensors(self, pipe, config) -> dict[str, torch.Tensor] | None:
        """The tensors of `config.init_from` (None without it); its architecture settings are copied into
        `config`, so the new module has the same shapes."""
        if not config.init_from:
            return None
        file = read_adapter(config.init_from)
        if file.method != self.name:
            raise AdapterError(f"init_from {config.init_from} is a {file.method} adapter; a {self.name} adapter "
                               f"starts only from another {self.name} adapter")
        self.check_base(pipe, file.base, str(config.init_from))
        own = ("condition", "init_from", "tune")
        start = self.config_class.from_dict({k: v for k, v in file.config.items() if k not in own})
        for key, value in start.to_dict().items():
            if key not in own:
                setattr(config, key, value)
        return file.tensors

    def _train_biases_only(self, pipe, adapter: str) -> None:
        for name, p in self._entry(pipe, adapter).module.named_parameters():
            p.requires_grad_(name.endswith("bias"))

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        return [p for p in self._entry(pipe, adapter).module.parameters() if p.requires_grad]

    def _entry(self, pipe, adapter: str) -> inject.ControlModule:
        entry = inject.modules(pipe).get(adapter)
        if entry is None or entry.method != self.name:
            raise AdapterError(f"no {self.name} adapter named {adapter!r} is loaded")
        return entry

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        module = self._entry(pipe, adapter).module
        return {f"{self.prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        module = self._entry(pipe, adapter).module
        own = {k[len(self.prefix) + 1:]: v for k, v in tensors.items() if k.startswith(self.prefix + ".")}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
            raise AdapterError(f"the {self.name} tensors do not fit the module ({what})")

    def check_base(self, pipe, base: dict, source: str) -> None:
        """Refuse a file trained for a model of another architecture (the layer fingerprint differs)."""
        loaded = base_fingerprint(pipe)
        if base and base.get("layers_sha256") != loaded["layers_sha256"]:
            raise AdapterError(f"{source} was trained for {describe_base(base)}, another architecture than the "
                               f"loaded model ({describe_base(loaded)}, other layers): a control adapter only fits "
                               "the architecture it was trained on")

    def training_loss(self, pipe, batch, default_loss):
        name = inject.state(pipe)["training"]
        control = batch.get("control")
        if control is None:  # e.g. prior-preservation images: no control image, the base model's task
            return default_loss(batch)
        inputs = [inject.ControlInput(name, control, 1.0)]
        inputs += [inject.ControlInput(name, images, present) for images, present in batch.get("control_more", [])]
        with inject.using(pipe, inputs):
            return default_loss(batch)

    @contextmanager
    def disabled(self, pipe):
        with inject.suspended(pipe):
            yield

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        """A control adapter's weight is its default conditioning scale (used when an input names none)."""
        for item in inject.state(pipe)["inputs"]:
            if item.adapter in weights:
                item.scale = float(weights[item.adapter])

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        raise AdapterError(f"{adapter} is a {self.name} control adapter: it needs a control image at generation and "
                           "cannot be merged into the base weights")

    def unmerge(self, pipe) -> None:
        return None

    def remove(self, pipe, adapter: str) -> None:
        inject.modules(pipe).pop(adapter, None)
        st = inject.state(pipe)
        st["inputs"] = [c for c in st["inputs"] if c.adapter != adapter]
        if not st["modules"]:
            inject.uninstall(pipe)

    def unload(self, pipe) -> None:
        for name in [n for n, m in inject.modules(pipe).items() if m.method == self.name]:
            self.remove(pipe, name)
