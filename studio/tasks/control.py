"""`studio control-train` and the UI's Control tab: the training config of a control adapter, rendering its
shapes-world condition/image pairs when no data folder is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.loading import StudioError
from studio.training import TrainConfig, config_with_preset

# The method and recipe B5 measured best on the mask condition (IoU 0.838, 5.8 min on 2 CPU cores); ControlNeXt as
# its paper measured 0.622 at the same recipe (BENCHMARKS.md). A preset or any given setting overrides the recipe.
DEFAULT_METHOD = "t2i_adapter"
DEFAULT_RECIPE = {"steps": 1200, "batch_size": 8, "lr": 1e-3}
DEFAULT_EXAMPLES = 512


def check_control_method(method: str, what: str = "method") -> str:
    from studio.adapters import method_names

    if method not in method_names("control"):
        raise StudioError(f"{what} takes {', '.join(method_names('control'))}, got {method!r}")
    return method


def control_config(*, condition: str = "mask", method: str | None = None, data: str | None = None,
                   control_data: str | None = None, examples: int = DEFAULT_EXAMPLES, two_shapes: float = 0.0,
                   overlay_scenes: bool = False, preset: str | None = None, render: bool = True,
                   defaults: dict[str, Any] | None = None, **settings: Any) -> TrainConfig:
    """The TrainConfig of a control adapter: `defaults` (e.g. a YAML file's values), then `preset`, then
    `settings` (any TrainConfig field); without a preset DEFAULT_RECIPE sits under them. Without `data` the
    shapes world's pairs of `condition` are rendered (`examples` of them, `two_shapes` of them two-shape scenes
    whose conditions are two summed inputs, or one overlaid image with `overlay_scenes`) into <output_dir>/data;
    with render=False only their folders are named (a check of the settings before a queued job renders
    them)."""
    from studio.adapters import get_method
    from studio.adapters.control.method import LAYOUT_TIMESTEPS

    method = check_control_method(method or DEFAULT_METHOD)
    name = settings.pop("name", None) or f"{method}_{condition.replace(',', '_')}"
    output_dir = settings.pop("output_dir", None) or f"runs/control/{name}"
    if data is None:
        data, control_data = _world_pairs(settings.get("model", "shapes"), condition, Path(output_dir) / "data",
                                          examples, two_shapes, overlay_scenes, render, get_method(method).episodic)
    recipe = {} if preset else DEFAULT_RECIPE
    # a flow-matching model (SD3, Flux) draws σ by its own density; the layout timesteps are DDPM weightings
    layout = FLOW_TIMESTEPS if is_flow_model(settings.get("model", "shapes")) else LAYOUT_TIMESTEPS
    values = {**layout, **recipe, **(defaults or {}), **settings}
    values["adapter"] = {"condition": condition, **(defaults or {}).get("adapter", {}), **settings.get("adapter", {})}
    return config_with_preset(preset, **{**values, "method": method, "name": name, "output_dir": output_dir,
                                         "data": data, "control_data": control_data})


FLOW_TIMESTEPS = {"timestep_bias": "none", "x0_weighting": False}


def is_flow_model(model: str) -> bool:
    """Whether `model` is a local diffusers folder of a diffusion transformer (its model_index names one); hub
    ids and single files are not looked into (the engine refuses the DDPM settings on them with the reason)."""
    import json

    index = Path(model) / "model_index.json"
    return index.is_file() and "transformer" in json.loads(index.read_text(encoding="utf-8"))


def _world_pairs(model: str, condition: str, folder: Path, examples: int, two_shapes: float, overlay: bool,
                 render: bool, episodic: bool = False) -> tuple[str, str]:
    """The rendered pairs' folders; several kinds alternate in one set, or for an episodic method (UFC) are
    written as one set per kind (`mask_00000…`, `edges_00000…`: the names give the engine each pair's kind)."""
    from studio.shapes.conditions import condition_kinds, write_training_set

    condition_kinds(condition)
    if model != "shapes":
        raise StudioError("without a data folder, control training renders the shapes world: give the data and "
                          "control-data folders for another model")
    if examples < 1:
        raise StudioError(f"examples must be at least 1 (got {examples})")
    if not 0.0 <= two_shapes <= 1.0:
        raise StudioError(f"two_shapes is a fraction between 0 and 1 (got {two_shapes})")
    if render:
        images, conditions = write_training_set(folder, condition, examples, episodic=episodic, two_shapes=two_shapes,
                                                separate=not overlay)
    else:
        images, conditions = folder / "images", folder / "conditions"
    return str(images), str(conditions)
