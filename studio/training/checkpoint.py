"""Training checkpoints: one folder a step (output_dir/checkpoints/step_0000042/) written atomically, holding
the adapter file, the optimizer state, the task's extra state and state.json (the step, the LR schedule, the
run's identity); the newest `keep` are kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from studio.training.config import TrainingError
from studio.utils.files import atomic_dir

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                   and (p / STATE_FILE).is_file()), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as tensors (for safetensors) and the plain rest (for JSON)."""
    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in info["plain"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def _json_default(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def write_checkpoint(output_dir: Path, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                     write_adapter: Callable[[Path], Any], keep: int) -> Path:
    """Write checkpoint `step` (all of it or nothing): `write_adapter(path)` writes adapter.safetensors, each
    entry of `tensors` becomes NAME.safetensors, `state` state.json. Older checkpoints beyond `keep` go."""
    from safetensors.torch import save_file

    final = Path(output_dir) / "checkpoints" / checkpoint_name(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        write_adapter(tmp / "adapter.safetensors")
        for name, part in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in part.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, default=_json_default), encoding="utf-8")
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """state.json and every NAME.safetensors of a checkpoint folder (adapter, optimizer, extra, ...)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = {file.stem: load_file(str(file)) for file in sorted(path.glob("*.safetensors"))}
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: not a readable checkpoint ({e})") from None
    return state, tensors


def resume_dir(output_dir: Path | None, resume: str | None, log: Callable[[str], None]) -> Path | None:
    """The checkpoint a run resumes from: "latest" (the newest under output_dir; none yet is said and the run
    starts from step 0) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        if output_dir is None:
            raise TrainingError("resume 'latest' needs the run's output folder")
        found = checkpoint_dirs(output_dir)
        if not found:
            log(f"no checkpoint in {Path(output_dir) / 'checkpoints'}: starting from step 0")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    return path
