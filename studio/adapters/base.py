"""What every adapter method shares: the method interface, the registry, the safetensors file format
(tensors + header metadata) and the base-model fingerprint used to refuse an adapter that does not fit."""

from __future__ import annotations

import functools
import hashlib
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from studio.utils.settings import setting

FORMAT_VERSION = "1"
# the denoiser (a UNet, or a diffusion transformer on SD3 / Flux) and the text encoders, as the pipelines name them
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DENOISERS = ("unet", "transformer")
KINDS = ("concept", "erase", "one-step", "control")


class AdapterError(ValueError):
    """An adapter file or setting that cannot be used; the message names what is wrong."""


@dataclass
class AdapterConfig:
    """Settings shared by every method; each method subclasses it with its own fields.

    `target_modules` means the same for every method: each pattern is a regular expression that must match a
    module's whole path inside its component (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) or a
    suffix of it that starts after a dot (`attn1.to_q`, `attn[12].to_(q|k)`, `to_q`); `.*` is every module.
    `matches_target` is the one matcher every method uses."""

    target_modules: list[str] = setting(
        default_factory=list, advanced=True,
        help="modules the adapter goes on: regexes matching a module path or a dotted suffix of it")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_run(self, steps: int) -> "AdapterConfig":
        """These settings for a run of `steps` steps (a method whose settings are fractions of the run resolves
        them to steps here; the file then records the resolved value)."""
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        from studio.utils.settings import from_values

        return from_values(cls, values, AdapterError)


class AdapterMethod:
    """One fine-tuning method. Methods are stateless: adapters live inside the pipeline's modules,
    under an adapter name, so several can be attached at once."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    # per training preset ("quick", "standard"): this method's learning rate and adapter settings
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # what the method makes, which sets the task that trains it and the UI tab that shows it:
    # "concept" (studio train), "erase" (studio erase), "one-step" (studio distill), "control" (studio control-train)
    kind: ClassVar[str] = "concept"
    # None: trained by the concept engine (studio train); else the command with the method's own objective
    trained_by: ClassVar[str | None] = None
    # True: each training example comes with a control image (TrainConfig.control_data), given to
    # training_loss as batch["control"] (Bx3xHxW in [0, 1])
    conditioned: ClassVar[bool] = False
    # True: trains on episodes, batches of one condition kind (the engine groups a batch by the pairs' kind)
    episodic: ClassVar[bool] = False
    # False: an adapter acts at weight 1 or 0 only, and set_weights / merge refuse any other weight
    scalable: ClassVar[bool] = True
    # False: the adapter cannot be folded into the base weights, and merge refuses it
    mergeable: ClassVar[bool] = True

    def attach(self, pipe, config: AdapterConfig, adapter: str) -> None:
        raise NotImplementedError

    def trainable_parameters(self, pipe, adapter: str) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def optimizer(self, pipe, adapter: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                  kind: str = "adamw") -> torch.optim.Optimizer | None:
        """The method's own optimizer for `params` (e.g. SODA's Stiefel steps for its rotations); None: the
        engine's `kind` (adamw or adamw8bit)."""
        return None

    def parameter_roles(self, pipe, adapter: str, params: list[torch.nn.Parameter]) -> dict[int, str]:
        """The role of some of `params`, by id (LoRA's B matrices: "lora_B"), for engine settings that treat them
        apart (LoRA+); none by default."""
        return {}

    def state_dict(self, pipe, adapter: str) -> dict[str, torch.Tensor]:
        """Tensors keyed `<component>.<module path>.<tensor>` (the diffusers convention)."""
        raise NotImplementedError

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite an attached adapter's tensors (resume from a checkpoint)."""
        raise NotImplementedError

    def disabled(self, pipe):
        """A context in which the model runs as if no adapter of this method were attached (the base model's
        prediction, e.g. as a preservation target), without touching which parameters are trainable."""
        raise NotImplementedError

    def set_weights(self, pipe, weights: dict[str, float]) -> None:
        """Make exactly these adapters of this method active, each at its weight."""
        raise NotImplementedError

    def merge(self, pipe, adapter: str, weight: float = 1.0) -> None:
        """Fold the adapter into the base weights at `weight` (reversible with `unmerge`)."""
        raise NotImplementedError

    def unmerge(self, pipe) -> None:
        raise NotImplementedError

    def unload(self, pipe) -> None:
        """Drop this method's layers from the model, keeping what was merged into the base weights."""
        raise NotImplementedError

    def remove(self, pipe, adapter: str) -> None:
        raise NotImplementedError

    def after_step(self, pipe, adapter: str, step: int, optimizer) -> str | None:
        """Called by the engine after each optimizer step (a method that changes what it trains mid-run,
        e.g. SaRA's re-selection, does it here); returns a line for the log, or None."""
        return None

    def training_loss(self, pipe, batch: dict[str, torch.Tensor], default_loss) -> torch.Tensor:
        """The objective; most methods train on the engine's denoising loss unchanged."""
        return default_loss(batch)

    def export_extra(self, path: Path) -> list[Path]:
        """Files written beside a freshly trained adapter file `path` for other tools (e.g. a diffusers
        model folder), returned for the front end to show; none by default."""
        return []


_REGISTRY: dict[str, AdapterMethod] = {}


def register(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> AdapterMethod:
    if name not in _REGISTRY:
        raise AdapterError(f"unknown adapter method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_names(kind: str | None = None) -> list[str]:
    """Every registered method's name (only those of `kind`: concept, erase, one-step or control)."""
    if kind is not None and kind not in KINDS:
        raise AdapterError(f"unknown method kind {kind!r}; kinds: {', '.join(KINDS)}")
    return sorted(name for name, method in _REGISTRY.items() if kind is None or method.kind == kind)


def optimizer_step(loss: torch.Tensor, optimizer, lr_schedule, *, step: int, what: str, remedy: str) -> float:
    """One step of a method's own training loop on `loss`; a NaN/inf loss stops it with a message naming the
    step and what to change (the parameters keep their last finite values)."""
    if not torch.isfinite(loss):
        raise AdapterError(f"the {what} loss became {loss.item()} at step {step}; {remedy}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr_schedule.step()
    return float(loss.detach())


def token_ids(pipe, texts: list[str]) -> torch.Tensor:
    """The (first) tokenizer's ids, padded to its full length as the pipelines encode prompts (for trainers
    that run the text encoder themselves)."""
    return tokenizer_ids(pipe.tokenizer, texts)


def tokenizer_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """`tokenizer`'s ids for `texts`, padded to its full length as the pipelines encode prompts."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---- which modules an adapter targets ----

@functools.lru_cache(maxsize=64)
def _compiled_targets(patterns: tuple[str, ...]) -> re.Pattern:
    try:
        return re.compile(target_regex(list(patterns)))
    except re.error as exc:
        raise AdapterError(f"target_modules {list(patterns)} are not valid regular expressions ({exc})") from None


def target_regex(patterns: list[str]) -> str:
    """One regex for `patterns`, to be full-matched against a module path (what PEFT's `target_modules` takes as a
    string): a pattern matches the whole path or a suffix of it at a dot boundary. No pattern matches nothing."""
    if not patterns:
        return r"(?!)"
    return r"(?:.*\.)?(?:" + "|".join(f"(?:{p})" for p in patterns) + r")"


def matches_target(path: str, patterns: list[str]) -> bool:
    """Whether the module at `path` is targeted by `patterns` (see AdapterConfig)."""
    return _compiled_targets(tuple(patterns)).fullmatch(path) is not None


# ---- the base-model fingerprint ----

def denoiser(pipe) -> tuple[str, torch.nn.Module]:
    """(component name, module) of the network that predicts the noise: the UNet, or the transformer of a
    diffusion-transformer pipeline (SD3, Flux)."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise AdapterError("the loaded pipeline has neither a unet nor a transformer")


def base_fingerprint(pipe) -> dict[str, Any]:
    """What an adapter needs to know about the model it was trained on: the family (from the denoiser's
    config) and a hash of the denoiser's linear/conv layer names and shapes. Adapter layers wrapped around a layer
    count as the layer they wrap, so the fingerprint is the same with adapters attached."""
    _, model = denoiser(pipe)
    cfg = model.config
    layers = []
    for name, module in model.named_modules():
        if "lora_" in name or ".base_layer" in f".{name}":
            continue
        layer = base_linear(module)
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            layers.append(f"{name}:{tuple(layer.weight.shape)}")
    digest = hashlib.sha256("\n".join(sorted(layers)).encode()).hexdigest()[:16]
    if "cross_attention_dim" not in cfg:  # a diffusion transformer
        return {"family": transformer_family(model), "joint_attention_dim": int(cfg.joint_attention_dim),
                "layers_sha256": digest}
    return {"family": unet_family(cfg), "cross_attention_dim": int(_first(cfg.cross_attention_dim)),
            "block_out_channels": list(cfg.block_out_channels), "layers_sha256": digest}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def unet_family(cfg) -> str:
    cross = _first(cfg.cross_attention_dim)
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(cross, f"custom(cross_attention_dim={cross})")


def require_unet(pipe, method: str) -> None:
    """Refuse, with the reason, a method written for a UNet (control hooks, one-step distillation, membranes) on a
    diffusion-transformer pipeline."""
    if getattr(pipe, "unet", None) is None:
        raise AdapterError(f"{method} needs a UNet model; {transformer_family(denoiser(pipe)[1])} is a diffusion "
                           "transformer")


TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def transformer_family(model: torch.nn.Module) -> str:
    """'sd3' or 'flux' by the transformer's class (diffusers names one class a family)."""
    name = type(model).__name__
    return TRANSFORMER_FAMILIES.get(name, f"custom({name})")


# ---- fit checks shared by methods ----

def components(pipe):
    """(name, module) for each model component the pipeline has (an SD 1.x pipeline has no text_encoder_2, a
    transformer pipeline no unet)."""
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            yield name, module


def pipeline_text_encoders(pipe) -> list[tuple[str, Any, torch.nn.Module]]:
    """(component name, its tokenizer, the encoder) for each text encoder the pipeline has: "text_encoder" with
    "tokenizer", and on SDXL and Flux also "text_encoder_2" with "tokenizer_2" (SD3: and "_3")."""
    return [(name, getattr(pipe, name.replace("text_encoder", "tokenizer"), None), module)
            for name, module in components(pipe) if name.startswith("text_encoder")]


def text_encoder_names(pipe) -> list[str]:
    return [name for name, _, _ in pipeline_text_encoders(pipe)]


def component(pipe, name: str) -> torch.nn.Module:
    module = getattr(pipe, name, None)
    if module is None:
        raise AdapterError(f"the loaded model has no {name}")
    return module


def split_key(key: str) -> tuple[str, str]:
    comp, _, rest = key.partition(".")
    if comp not in COMPONENTS:
        raise AdapterError(f"tensor {key!r} names no model component ({', '.join(COMPONENTS)})")
    return comp, rest


def describe_base(base: dict[str, Any]) -> str:
    if not base:
        return "an unknown model"
    if "joint_attention_dim" in base:
        return f"{base.get('family')} (joint attention {base.get('joint_attention_dim')})"
    return f"{base.get('family')} (cross-attention {base.get('cross_attention_dim')})"


def check_fits(pipe, tensors: dict[str, torch.Tensor], shapes_for, base: dict[str, Any], source: str) -> None:
    """Refuse an adapter whose target modules are missing or shaped differently in the loaded model.
    `shapes_for(module, key, tensor)` gives the shape `tensor` must have on that module."""
    loaded = base_fingerprint(pipe)
    where = (f"{source} was trained for {describe_base(base)}; the loaded model is {describe_base(loaded)} "
             "(another architecture)")
    named = {split_key(k)[0] for k in tensors}
    missing = sorted(comp for comp in named if getattr(pipe, comp, None) is None)
    if missing:
        raise AdapterError(f"{where}: it targets the {missing[0]}, which the loaded model does not have")
    modules = {comp: dict(component(pipe, comp).named_modules()) for comp in named}
    for key, tensor in tensors.items():
        comp, rest = split_key(key)
        module_path = module_path_of(rest)
        module = modules[comp].get(module_path)
        if module is None:
            raise AdapterError(f"{where}: it targets {comp}.{module_path}, which the loaded model does not have")
        expected = shapes_for(module, rest, tensor)
        if expected is not None and tuple(expected) != tuple(tensor.shape):
            raise AdapterError(f"{where}: {key} has shape {tuple(tensor.shape)}, the loaded model needs "
                               f"{tuple(expected)}")


_TENSOR_SUFFIX = re.compile(r"\.(lora_[AB]|lora_down|lora_up|lora_magnitude_vector)(\.[^.]+)*\.(weight|bias)$"
                            r"|\.(alpha|delta|values|indices)$")


def module_path_of(key: str) -> str:
    """`down_blocks.0.attn1.to_q.lora_A.weight` -> `down_blocks.0.attn1.to_q`."""
    stripped = _TENSOR_SUFFIX.sub("", key)
    return stripped if stripped != key else key.rsplit(".", 1)[0]


@contextmanager
def switched_on(layers: list, flag: str) -> Iterator[None]:
    """Set the boolean attribute `flag` on every layer for the block, then give each back its own value (the
    `disabled()` of methods whose layers carry an off switch)."""
    before = [getattr(layer, flag) for layer in layers]
    for layer in layers:
        setattr(layer, flag, True)
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            setattr(layer, flag, state)


def replace_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put `module` at `path` inside `model` (how adapter layers are installed and taken out)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of `w` (thin) in fp32 whatever the model's dtype (there is no half-precision SVD). On the CPU it
    runs on one thread: LAPACK's threaded SVD of these small matrices gains little and, on a busy machine,
    spins — measured on the 2-core box under load, 1280×1280 took 21 s on 2 threads and 0.8 s on one."""
    if w.device.type != "cpu":
        return torch.linalg.svd(w.float(), full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(w.float(), full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The original layer under an injected adapter layer (PEFT keeps it as `base_layer`)."""
    return getattr(module, "base_layer", module)


def adapter_name_for(path: str | Path, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem) or "adapter"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name
