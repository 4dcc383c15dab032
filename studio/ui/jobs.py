"""Training jobs for the web UI: one at a time, in a queue, on a worker thread of the server process, so a
job outlives the page that started it and any page can read its progress."""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.loading import StudioError


@dataclass
class Job:
    id: int
    name: str
    settings: dict[str, Any]
    status: str = "queued"          # queued | running | done | stopped | failed
    step: int = 0
    steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    previews: list[str] = field(default_factory=list)
    message: str = ""
    adapter: str | None = None
    started: float | None = None
    finished: float | None = None
    stop_requested: bool = False

    def summary(self) -> str:
        if self.status == "queued":
            return f"**{self.name}**: queued"
        if self.status == "running":
            if not self.steps:
                return f"**{self.name}**: {self.message or 'preparing (checking images, caching latents)'}…"
            left = f", about {self.eta_seconds:.0f} s left" if self.eta_seconds is not None else ""
            loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
            return f"**{self.name}**: step {self.step}/{self.steps}{loss}{left}"
        if self.status == "done":
            return f"**{self.name}**: done in {self.finished - self.started:.0f} s → `{self.adapter}`"
        if self.status == "stopped":
            return f"**{self.name}**: stopped at step {self.step} (checkpoint kept; Train again with resume to go on)"
        return f"**{self.name}**: failed: {self.message}"


class JobQueue:
    """`submit(settings)` queues a training; `run_training(settings, on_event, should_stop)` does the work
    (studio.training.engine.Trainer by default) and returns the adapter path."""

    def __init__(self, run_training) -> None:
        self._run = run_training
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._loop, name="studio-training", daemon=True)
        self._worker.start()

    def submit(self, name: str, settings: dict[str, Any]) -> Job:
        with self._lock:
            job = Job(next(self._ids), name, settings)
            self._jobs[job.id] = job
            self._wake.notify()
            return job

    def stop(self, job_id: int | None = None) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id) if job_id else self._latest()
            if job and job.status in ("queued", "running"):
                job.stop_requested = True
                if job.status == "queued":
                    job.status = "stopped"
            return job

    def latest(self) -> Job | None:
        with self._lock:
            return self._latest()

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def busy(self) -> bool:
        with self._lock:
            return any(j.status in ("queued", "running") for j in self._jobs.values())

    def _latest(self) -> Job | None:
        return self._jobs[max(self._jobs)] if self._jobs else None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (queued := [j for j in self._jobs.values() if j.status == "queued"]):
                    self._wake.wait()
                job = min(queued, key=lambda j: j.id)
                job.status, job.started = "running", time.time()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        def on_event(event: dict) -> None:
            if event["kind"] == "step":
                job.step, job.steps, job.loss, job.eta_seconds = (event["step"], event["steps"], event["loss"],
                                                                  event["eta_seconds"])
            elif event["kind"] == "phase":  # what a job does before its steps start
                job.message = event["message"]
            elif event["kind"] == "preview":
                job.previews = event["paths"] + job.previews

        try:
            adapter = self._run(job.settings, on_event, lambda: job.stop_requested)
            job.adapter = str(adapter) if adapter else None
            job.status = "stopped" if job.stop_requested and adapter is None else "done"
        except StudioError as exc:
            job.status, job.message = "failed", str(exc)
        except Exception as exc:  # the page gets one line; the server log keeps the traceback
            traceback.print_exc()
            job.status, job.message = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            job.finished = time.time()


def library_entries(folder: Path) -> list[dict[str, Any]]:
    """Every adapter in the library folder, newest first, with what its header says."""
    from studio.adapters import AdapterError, read_adapter

    entries = []
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            file = read_adapter(path)
        except AdapterError:
            continue
        meta = file.metadata
        preview = path.with_suffix(".png")
        entries.append({"name": path.stem, "path": str(path), "method": file.method,
                        "base": meta.get("base_model_name") or file.base.get("family", "?"),
                        "trigger": meta.get("trigger", ""), "steps": meta.get("steps", ""),
                        "date": meta.get("trained_at", time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                      time.localtime(path.stat().st_mtime))),
                        "preview": str(preview) if preview.is_file() else None,
                        "config": file.config})
    return entries
