"""The adapter file: one safetensors layout (tensors + a string header) every studio adapter is written in and
read back from; foreign LoRA files (kohya, diffusers/PEFT keys) are read into the same form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.adapters.base import FORMAT_VERSION, AdapterConfig, AdapterError, get_method


@dataclass
class AdapterFile:
    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any]          # fingerprint of the base model (empty for foreign files)
    metadata: dict[str, str]      # the raw header


HEADER_KEYS = ("format", "format_version", "method", "kind", "config", "base_model", "studio_version")  # always
TRAINING_KEYS = ("steps", "trigger", "training_config")  # where the writer gives them


def save_adapter(path: str | Path, method: str, config: AdapterConfig | dict, tensors: dict[str, torch.Tensor],
                 base: dict[str, Any], extra: dict[str, str] | None = None, *, steps: int | None = None,
                 trigger: str | None = None, training_config: dict[str, Any] | str | None = None) -> Path:
    """Write an adapter file (atomically): its tensors and the one header layout of every studio adapter, whatever
    wrote it (the training engine, erase, distill, bake). The header's values are strings (safetensors):

    - `format`: "studio-adapter"; `format_version`: FORMAT_VERSION
    - `method`: the registered method's name; `kind`: its kind from the registry (concept, erase, one-step, control)
    - `config`: the method's settings as JSON (what its `config_class.from_dict` reads back)
    - `base_model`: the base model's fingerprint (`base_fingerprint`) as JSON, "{}" where unknown
    - `studio_version`: the version of studio that wrote the file
    - `steps`: the optimizer steps trained, a whole number (where given)
    - `trigger`: the trigger word the adapter was trained with, "" for none (where given)
    - `training_config`: the training settings as JSON (where given)

    `extra`: the writer's own further keys (e.g. `base_model_name`, `trained_at`); `steps`, `trigger` and
    `training_config` may come there too (as before) and are checked as the keyword arguments are, which win."""
    from studio.utils.version import __version__

    config_dict = config.to_dict() if isinstance(config, AdapterConfig) else dict(config)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(HEADER_KEYS))
    if clash:
        raise AdapterError(f"save_adapter writes {', '.join(clash)} itself; do not pass them in extra")
    metadata = {"format": "studio-adapter", "format_version": FORMAT_VERSION, "method": method,
                "kind": get_method(method).kind, "config": json.dumps(config_dict, sort_keys=True),
                "base_model": json.dumps(base, sort_keys=True), "studio_version": __version__}
    given = {"steps": steps, "trigger": trigger, "training_config": training_config}
    for key in TRAINING_KEYS:
        value = given[key] if given[key] is not None else extra.pop(key, None)
        if value is not None:
            metadata[key] = _header_value(key, value)
    metadata.update({k: str(v) for k, v in extra.items()})
    return write_safetensors(path, tensors, metadata)


def _header_value(key: str, value) -> str:
    """`steps`, `trigger` or `training_config` as the header stores it, or an AdapterError saying what is wrong."""
    if key == "steps":
        if isinstance(value, bool) or not str(value).isdigit():
            raise AdapterError(f"steps in an adapter header is a whole number >= 0, got {value!r}")
        return str(int(value))
    if key == "trigger":
        return str(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise AdapterError("training_config in an adapter header is JSON (or a dict)") from None
    return json.dumps(value, sort_keys=True, default=str)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temp file + rename): an interrupted save leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_adapter(path: str | Path) -> AdapterFile:
    """Read a studio adapter file, or a LoRA written by another tool (kohya or diffusers/PEFT keys)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path.name}: adapters are read from .safetensors files only (never pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterError(f"{path.name} is not a readable safetensors file ({exc})") from None
    if not tensors:
        raise AdapterError(f"{path.name} holds no tensors")
    if metadata.get("format") == "studio-adapter":
        return AdapterFile(metadata["method"], json.loads(metadata["config"]), tensors,
                           json.loads(metadata.get("base_model", "{}")), metadata)
    from studio.adapters.lora.convert import detect_lora_format, lora_from_foreign

    if detect_lora_format(tensors) is None:
        raise AdapterError(f"{path.name} is neither a studio adapter nor a kohya/diffusers LoRA")
    tensors, config = lora_from_foreign(tensors, metadata)
    return AdapterFile("lora", config, tensors, {}, metadata)
