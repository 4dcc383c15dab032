"""Adapter methods, one folder each (lora, sara, soda, spm, hipa, control), with a shared base and registry.

    from studio.adapters import load_adapters
    load_adapters(pipe, {"star.safetensors": 0.8, "style.safetensors": 0.5})
"""

from __future__ import annotations

from pathlib import Path

from studio.adapters import control, hipa, hra, loha, lokr, lora, oft, sara, soda, spm  # noqa: F401  (registers the methods)
from studio.adapters.trigger import TRIGGER_KEYS, check_trigger_vectors, set_trigger_vectors
from studio.adapters.base import (AdapterConfig, AdapterError, AdapterMethod, adapter_name_for, base_fingerprint,
                                  get_method, method_names, register)
from studio.adapters.files import AdapterFile, read_adapter, save_adapter

__all__ = ["AdapterConfig", "AdapterError", "AdapterFile", "AdapterMethod", "base_fingerprint", "get_method",
           "method_names", "read_adapter", "register", "save_adapter", "load_adapters", "set_adapter_weights",
           "attached_adapters", "merge_adapters"]


def attached_adapters(pipe) -> dict[str, dict]:
    """name -> {"method", "path", "weight"} for every adapter loaded into `pipe` by load_adapters."""
    if not hasattr(pipe, "_studio_adapters"):
        pipe._studio_adapters = {}
    return pipe._studio_adapters


def load_adapters(pipe, adapters: dict[str | Path, float] | list[str | Path]) -> list[str]:
    """Attach adapter files to `pipe`, each at its weight; returns the adapter names given to them.
    A file that does not fit the model is refused with the reason (AdapterError) and nothing is attached."""
    if not isinstance(adapters, dict):
        adapters = {path: 1.0 for path in adapters}
    files = [(path, float(weight), read_adapter(path)) for path, weight in adapters.items()]
    triggers = {}  # path -> (word, vectors), every one checked before anything attaches
    for path, _, file in files:
        vectors = {key: file.tensors[key] for key in TRIGGER_KEYS if key in file.tensors}
        if vectors:
            triggers[path] = (file.metadata.get("trigger", ""), vectors)
            check_trigger_vectors(pipe, *triggers[path], Path(path).name)
    attached = attached_adapters(pipe)
    names = []
    for path, weight, file in files:
        method = get_method(file.method)
        name = adapter_name_for(path, set(attached))
        config = method.config_class.from_dict(file.config)
        tensors = {k: v for k, v in file.tensors.items() if k not in TRIGGER_KEYS}
        method.load_state_dict(pipe, name, tensors, config=config, base=file.base, source=Path(path).name)
        if path in triggers:
            set_trigger_vectors(pipe, *triggers[path])
        attached[name] = {"method": file.method, "path": str(path), "weight": weight}
        names.append(name)
    set_adapter_weights(pipe, {name: info["weight"] for name, info in attached.items()})
    return names


def set_adapter_weights(pipe, weights: dict[str, float]) -> None:
    """Activate exactly these adapters at these weights (others stay loaded but off)."""
    attached = attached_adapters(pipe)
    unknown = sorted(set(weights) - set(attached))
    if unknown:
        raise AdapterError(f"no adapter named {', '.join(unknown)} is loaded; loaded: {', '.join(attached) or 'none'}")
    for method_name in {info["method"] for info in attached.values()}:
        mine = {n: w for n, w in weights.items() if attached[n]["method"] == method_name}
        get_method(method_name).set_weights(pipe, mine)
    for name, info in attached.items():
        info["weight"] = weights.get(name, 0.0)


def merge_adapters(pipe) -> None:
    """Fold every loaded adapter into the base weights at its current weight and drop the adapter layers,
    leaving a plain diffusers pipeline (for save_pretrained or single-file export)."""
    attached = attached_adapters(pipe)
    methods = {info["method"] for info in attached.values()}
    for name, info in attached.items():
        if info["weight"]:
            get_method(info["method"]).merge(pipe, name, info["weight"])
    for method_name in methods:
        get_method(method_name).unload(pipe)
    attached.clear()
