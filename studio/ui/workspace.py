"""What every tab shares: the workspace folders (uploads, runs, the adapter library, outputs), the loaded
pipelines, and the page's reply to a bad input (a message, never a traceback)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.loading import StudioError, load_pipeline
from studio.utils.files import atomic_path

DEFAULT_WORKSPACE = Path(os.environ.get("STUDIO_WORKSPACE", "studio-workspace"))


class Workspace:
    """Where the UI keeps uploads, runs and the adapter library; folder paths typed into the page must lie
    inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.library = self.root / "adapters"
        self.runs = self.root / "runs"
        self.uploads = self.root / "uploads"
        self.outputs = self.root / "outputs"
        for folder in (self.library, self.runs, self.uploads, self.outputs):
            folder.mkdir(parents=True, exist_ok=True)

    def inside(self, folder: str) -> Path:
        path = (self.root / folder).resolve()  # an absolute `folder` replaces the root in the join
        if path != self.root and self.root not in path.parents:
            raise StudioError(f"{folder}: folders must be inside the workspace {self.root}")
        if not path.is_dir():
            raise StudioError(f"{folder}: no such folder in the workspace")
        return path

    def adapter(self, name: str) -> Path:
        path = self.library / f"{name}.safetensors"
        if not name or not path.is_file():
            raise StudioError(f"no adapter named {name!r} in the library")
        return path

    def keep(self, trained: str | Path, name: str, preview: Path | None = None) -> Path:
        """Copy a trained adapter file (and its last preview) into the library as `name`, atomically."""
        target = self.library / f"{name}.safetensors"
        with atomic_path(target) as tmp:
            shutil.copyfile(trained, tmp)
        if preview is not None:
            shutil.copyfile(preview, target.with_suffix(".png"))
        return target

    def names(self, kind: str) -> list[str]:
        """The library's adapters of a method kind (concept, erase, one-step, control), newest first."""
        from studio.ui.jobs import library_entries

        return [e["name"] for e in library_entries(self.library) if method_kind(e["method"]) == kind]


def method_kind(method: str) -> str:
    from studio.adapters import AdapterError, get_method

    try:
        return get_method(method).kind
    except AdapterError:
        return "unknown"


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", (text or "").strip()).strip("_")
    if not name:
        raise StudioError("give the concept a name (letters, digits, - and _)")
    return name


def output_stem(ws: Workspace) -> Path:
    """A new name for generated images in the outputs folder (the time, and a tie-breaker)."""
    import time

    return ws.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"


def as_message(handler: Callable[..., str]) -> Callable[..., str]:
    """A handler whose StudioError (or ValueError) becomes a warning and a ⚠️ line in the page."""
    @functools.wraps(handler)
    def answer(*args: Any, **kwargs: Any) -> str:
        import gradio as gr

        try:
            return handler(*args, **kwargs)
        except (StudioError, ValueError) as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"
    return answer


def as_error(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose StudioError (or ValueError) becomes a gr.Error: the page shows it, the server goes on."""
    @functools.wraps(handler)
    def answer(*args: Any, **kwargs: Any) -> Any:
        import gradio as gr

        try:
            return handler(*args, **kwargs)
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
    return answer


class PipelineCache:
    """One loaded pipeline per model source, loaded on first use; generation is serialised."""

    def __init__(self) -> None:
        self._pipes: dict[str, object] = {}
        self._adapters: dict[tuple[str, str, float], str] = {}  # (pipeline, file, mtime) -> adapter name
        self.lock = threading.Lock()

    def get(self, model: str, adapters: dict[str, float] | None = None, one_step: str | None = None,
            control: list[dict] | None = None):
        """The pipeline for `model` with these adapters active; with `one_step` (a one-step adaptor file), a
        separate pipeline with that adaptor and the one-step scheduler; with `control` ([{"adapter": control
        adapter file, "image", "scale", "start", "end"}]), a separate pipeline with those control adapters and
        exactly these control inputs set (a control adapter may tune UNet layers, so control never shares the
        plain pipeline)."""
        from studio.adapters import load_adapters, set_adapter_weights

        pipe_key, pipe = self._pipeline(model, one_step, control)
        weights = {}
        for path, weight in (adapters or {}).items():
            key = (pipe_key, str(Path(path).resolve()), Path(path).stat().st_mtime)
            if key not in self._adapters:
                self._adapters[key] = load_adapters(pipe, {path: 0.0})[0]
            weights[self._adapters[key]] = weight
        if one_step:  # the one-step adaptor stays on beside whatever concept adapters are chosen
            weights.update({n: 1.0 for n, info in self._attached(pipe).items()
                            if method_kind(info["method"]) == "one-step"})
        inputs = []
        for item in control or []:
            name = self._control_adapter(pipe_key, pipe, item["adapter"])
            inputs.append({**item, "adapter": name})
            weights[name] = float(item.get("scale", 1.0))
        if self._adapters or adapters:
            set_adapter_weights(pipe, weights)
        if control is not None:
            from studio.pipelines.control import set_control

            set_control(pipe, inputs)
        if any(method_kind(info["method"]) == "erase" for info in self._attached(pipe).values()):
            from studio.pipelines.membranes import use_membranes

            use_membranes(pipe)  # membranes act per prompt (Facilitated Transport)
        return pipe

    @staticmethod
    def _attached(pipe) -> dict[str, dict]:
        return getattr(pipe, "_studio_adapters", {})

    def _pipeline(self, model: str, one_step: str | None, control: list[dict] | None) -> tuple[str, Any]:
        if control is not None:
            pipe_key = f"{model}|control"
        elif one_step:
            pipe_key = f"{model}|{Path(one_step).resolve()}|{Path(one_step).stat().st_mtime}"
        else:
            pipe_key = model
        if pipe_key not in self._pipes:
            self._pipes[pipe_key] = load_pipeline(model, one_step=one_step)
        return pipe_key, self._pipes[pipe_key]

    def _control_adapter(self, pipe_key: str, pipe, path: str) -> str:
        """The name of control adapter file `path` in the pipeline, loaded on first use; an older version of the
        same file (retrained under its name) is taken out first, UNet deltas and all."""
        from studio.adapters import attached_adapters, get_method, load_adapters, method_names, read_adapter

        resolved = str(Path(path).resolve())
        key = (pipe_key, resolved, Path(path).stat().st_mtime)
        if key not in self._adapters:
            method = read_adapter(path).method
            if method_kind(method) != "control":
                raise StudioError(f"{Path(path).stem} is a {method} adapter, not a control adapter "
                                  f"({', '.join(method_names('control'))})")
            for old in [k for k in self._adapters if k[:2] == key[:2]]:
                name = self._adapters.pop(old)
                info = attached_adapters(pipe).pop(name, None)
                if info:
                    get_method(info["method"]).remove(pipe, name)
            self._adapters[key] = load_adapters(pipe, {path: 0.0})[0]
        return self._adapters[key]


@dataclass
class Context:
    """What a tab's handlers work with: the model the page starts on, the workspace, the pipelines, the
    training queue, and the page's 1-second timer (job progress)."""

    model: str
    workspace: Workspace
    cache: PipelineCache
    jobs: Any      # studio.ui.jobs.JobQueue
    timer: Any     # gr.Timer

    def job_status(self) -> tuple[str, float, list[str]]:
        job = self.jobs.latest()
        if job is None:
            return "no training yet", 0.0, []
        fraction = job.step / job.steps if job.steps else 0.0
        return job.summary(), round(100 * fraction, 1), list(job.previews[:8])

    def stop_training(self) -> str:
        return "stopping…" if self.jobs.stop() else "no training is running"

    def follow_jobs(self, status) -> None:
        """Show the latest job's progress in `status` (a Markdown), every tick of the page's timer."""
        self.timer.tick(lambda: self.job_status()[0], None, status, show_progress="hidden")
