"""The training engine: one loop for every trained artefact (it knows no method by name). A Recipe supplies
the adapter, the data and the loss; the engine owns accelerate (devices, mixed precision, gradient accumulation
and clipping, DDP), the LR schedule, NaN/inf stop, Ctrl+C, atomic checkpoints and exact resume, events and the
progress bar, TensorBoard, previews and the result file.

Randomness is a function of (seed, step): each loss call gets a generator made from them and the global RNG
(dropout) is re-seeded every step, so a resumed run and a run split over processes draw exactly what an
uninterrupted single-process run draws."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from studio.training.checkpoint import (checkpoint_dirs, checkpoint_name, flatten_optimizer, read_checkpoint,
                                        resume_dir, unflatten_optimizer, write_checkpoint)
from studio.training.config import PRESETS, LoopSettings, TrainConfig, TrainingError, config_with_preset
from studio.training.objectives import (denoising_loss, sample_timesteps, signal_to_noise, timestep_weights,
                                        x0_weights)
from studio.training.recipe import AdapterOutput, Recipe, Share, Trainables
from studio.utils.files import atomic_path

__all__ = ["PRESETS", "AdapterOutput", "Engine", "LoopSettings", "Recipe", "Share", "TrainConfig", "TrainResult",
           "Trainables", "Trainer", "TrainingError", "checkpoint_dirs", "config_with_preset", "denoising_loss",
           "sample_timesteps", "signal_to_noise", "step_generator", "timestep_weights", "train", "x0_weights"]


@dataclass
class TrainResult:
    adapter_path: Path | None
    steps: int
    final_loss: float
    seconds: float
    trainable_parameters: int
    stopped: bool = False

    @property
    def path(self) -> Path | None:  # the names erase and distill results had
        return self.adapter_path

    @property
    def last_loss(self) -> float:
        return self.final_loss


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def make_accelerator(settings: LoopSettings):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    log_with = None
    if settings.tensorboard and settings.output_dir:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            pass
    cpu = settings.device == "cpu" or (settings.device is None and not torch.cuda.is_available())
    # one process may run many trainings (the UI, tests): the precision is per run, the process group is kept
    AcceleratorState._reset_state()
    project = (ProjectConfiguration(project_dir=settings.output_dir,
                                    logging_dir=str(Path(settings.output_dir) / "logs"))
               if settings.output_dir else None)
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=cpu, log_with=log_with, project_config=project)


class Engine:
    """One run of a Recipe. `on_event` receives {"kind": "step"|"log"|"preview"|"checkpoint"|"phase"|"done", ...};
    `should_stop()` is polled every step (the UI's Stop button): the run then checkpoints and returns, stopped.
    `adapter_path`: the result file (None: none is written); `training_config`: the header's record of it."""

    def __init__(self, settings: LoopSettings, *, adapter_path: str | Path | None = None,
                 training_config: dict[str, Any] | None = None, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.out = Path(settings.output_dir) if settings.output_dir else None
        self.adapter_path = Path(adapter_path) if adapter_path else None
        self.training_config = training_config if training_config is not None else asdict(settings)
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)

    def log(self, message: str) -> None:
        self.on_event({"kind": "log", "message": message})

    # -- set-up --

    def _setup(self, recipe: Recipe) -> None:
        from diffusers.optimization import get_scheduler

        s, acc = self.settings, self.accelerator
        if s.batch_size % acc.num_processes:
            raise TrainingError(f"batch_size {s.batch_size} does not split over {acc.num_processes} processes")
        if self.out is not None and acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        trainables: Trainables = recipe.setup(acc)
        if not trainables.params:
            raise TrainingError(f"the {recipe.method} adapter has no trainable parameters on this model")
        self.params = trainables.params
        self.n_trainable = trainables.trainable_parameters or sum(p.numel() for p in trainables.params)
        optimizer = trainables.optimizer or torch.optim.AdamW(trainables.params, lr=s.lr,
                                                              weight_decay=s.weight_decay)
        if trainables.lr_lambda is not None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, trainables.lr_lambda)
        else:
            self.lr_scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps,
                                              num_training_steps=s.steps)
        self.modules = {name: acc.prepare(module) for name, module in trainables.modules.items()}
        recipe.prepared(self.modules)
        self.optimizer = acc.prepare(optimizer)  # the LR schedule is stepped by hand: once per global step

    def _micro_batches(self):
        """(share, last) for this process's part of each micro-batch of a step's global batch."""
        s, acc = self.settings, self.accelerator
        micro, world = max(1, s.batch_size // s.grad_accum), acc.num_processes
        for start in range(0, s.batch_size, micro):
            n = min(micro, s.batch_size - start)
            rows = slice(start + n * acc.process_index // world, start + n * (acc.process_index + 1) // world)
            yield Share(rows, s.batch_size), start + micro >= s.batch_size

    def _step(self, recipe: Recipe, step: int, last_good: Path | None) -> float:
        s, acc = self.settings, self.accelerator
        torch.manual_seed((s.seed * 1_000_003 + step) * acc.num_processes + acc.process_index)  # dropout etc.
        total = torch.zeros((), device=acc.device)
        for share, last in self._micro_batches():
            with acc.autocast(), ExitStack() as stack:
                if not last:
                    for module in self.modules.values():
                        stack.enter_context(acc.no_sync(module))
                loss = recipe.loss(step, share, step_generator(s.seed, step))
                if not torch.isfinite(acc.reduce(loss.detach(), "sum")):
                    raise TrainingError(self._nan_message(step, last_good))
                acc.backward(loss * acc.num_processes)  # DDP averages the processes' gradients
            total = total + loss.detach()
        if s.max_grad_norm:
            acc.clip_grad_norm_(self.params, s.max_grad_norm)
        self.optimizer.step()
        note = recipe.after_step(step, self.optimizer)
        if note:
            self.log(note)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(total, "sum"))

    def _nan_message(self, step: int, last_good: Path | None) -> str:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
        return (f"the loss became NaN/inf at step {step} (lr {self.settings.lr:g}); training stopped and {kept}; "
                "try a lower learning rate or mixed_precision 'no'")

    # -- the run --

    def run(self, recipe: Recipe) -> TrainResult:
        from tqdm.auto import tqdm

        s = self.settings
        started = time.perf_counter()
        self.accelerator = acc = make_accelerator(s)
        self._setup(recipe)
        start_step = 0
        last_good = resume_dir(self.out, s.resume, self.log)
        if last_good is not None:
            start_step = self._load_checkpoint(last_good, recipe)
        if acc.log_with:
            acc.init_trackers("studio", config={k: v for k, v in self.training_config.items()
                                                if isinstance(v, (int, float, str, bool))})
        progress = tqdm(total=s.steps, initial=start_step, desc=recipe.label, unit="step", dynamic_ncols=True,
                        disable=not (s.progress_bar and acc.is_local_main_process))
        loss_value, stopped, step, completed = float("nan"), False, start_step, start_step
        run_started = time.perf_counter()
        restore = self._catch_ctrl_c()
        try:
            for step in range(start_step + 1, s.steps + 1):
                loss_value = self._step(recipe, step, last_good)
                completed = step
                if self._ctrl_c_seen():
                    raise KeyboardInterrupt
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                acc.log({"loss": loss_value, "lr": self.lr_scheduler.get_last_lr()[0]}, step=step)
                eta = (time.perf_counter() - run_started) / (step - start_step) * (s.steps - step)
                self.on_event({"kind": "step", "step": step, "steps": s.steps, "loss": loss_value,
                               "eta_seconds": eta})
                if s.preview_every and step % s.preview_every == 0 and step < s.steps:
                    self._preview(recipe, step)
                stop_now = self.should_stop()
                if step % s.checkpoint_every == 0 or step == s.steps or stop_now:
                    last_good = self._save_checkpoint(step, recipe) or last_good
                if stop_now and step < s.steps:
                    stopped = True
                    break
        except KeyboardInterrupt:
            raise self._interrupted(recipe, completed, start_step, last_good) from None
        finally:
            restore()
            progress.close()
        return self._finish(recipe, step, loss_value, stopped, started)

    def _catch_ctrl_c(self) -> Callable[[], None]:
        """Ctrl+C ends the step under way, then the run (a second one ends it at once): a KeyboardInterrupt raised
        anywhere in a step can be swallowed (inside a __del__, say) and the run would go on. Only where Python's
        own handler is in place, on the main thread; returns what puts it back."""
        self._ctrl_c = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return lambda: None

        def handler(signum, frame):
            if self._ctrl_c:
                raise KeyboardInterrupt
            self._ctrl_c = True

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, signal.default_int_handler)

    def _ctrl_c_seen(self) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._ctrl_c
        return bool(acc.reduce(torch.tensor(float(self._ctrl_c), device=acc.device), "sum") > 0)  # all stop together

    def _interrupted(self, recipe: Recipe, completed: int, start_step: int, last_good: Path | None) -> TrainingError:
        """Keep every finished step: the weights and optimizer now are those after `completed` steps."""
        if self.out is None:
            recipe.finish()
            return TrainingError(f"interrupted at step {completed}; nothing was kept (the run has no output folder)")
        if completed > start_step and (last_good is None or last_good.name != checkpoint_name(completed)):
            self._save_checkpoint(completed, recipe)
        recipe.finish()
        return TrainingError(f"interrupted; progress is kept in {self.out / 'checkpoints'} "
                             "(resume with --resume latest)")

    def _finish(self, recipe: Recipe, step: int, loss_value: float, stopped: bool, started: float) -> TrainResult:
        from studio.adapters import save_adapter

        acc = self.accelerator
        recipe.finish()
        output = recipe.result_file()
        written = None
        if acc.is_main_process and not stopped and self.adapter_path is not None and output is not None:
            if self.settings.preview_every:
                self._preview(recipe, step)
            extra = {**output.extra, "trigger": recipe.trigger or "", "steps": str(step),
                     "training_config": json.dumps(self.training_config, sort_keys=True, default=str),
                     "training_seconds": f"{time.perf_counter() - started:.1f}",
                     "trainable_parameters": str(self.n_trainable)}
            written = save_adapter(self.adapter_path, output.method, output.config, output.tensors, output.base, extra)
        acc.wait_for_everyone()
        acc.end_training()
        path = self.adapter_path if (output is not None and not stopped) else None
        result = TrainResult(path, step, loss_value, time.perf_counter() - started, self.n_trainable, stopped)
        self.on_event({"kind": "done", "step": step, "adapter": str(written or path or ""), "stopped": stopped})
        return result

    # -- previews --

    @torch.no_grad()
    def _preview(self, recipe: Recipe, step: int) -> None:
        if not self.accelerator.is_main_process or self.out is None:
            return
        drawn = recipe.preview(step)
        if drawn is None:
            return
        prompts, images = drawn
        folder = self.out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            path = folder / f"step_{step:07d}_{i}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(str(path))
        self.on_event({"kind": "preview", "step": step, "paths": paths, "prompts": prompts})

    # -- checkpoints --

    def _save_checkpoint(self, step: int, recipe: Recipe) -> Path | None:
        from studio.adapters import save_adapter
        from studio.adapters.files import write_safetensors

        acc = self.accelerator
        if self.out is None:
            return None
        final = self.out / "checkpoints" / checkpoint_name(step)
        if acc.is_main_process:
            opt_tensors, opt_info = flatten_optimizer(self.optimizer.state_dict())
            now = recipe.checkpoint_file()
            state = {"optimizer": opt_info, "lr_scheduler": self.lr_scheduler.state_dict(),
                     "identity": recipe.identity, "config": self.training_config, "world_size": acc.num_processes}
            if now.method:
                def write(path):
                    return save_adapter(path, now.method, now.config, now.tensors, now.base,
                                        {"trigger": recipe.trigger or "", **now.extra})
            else:  # a recipe whose tensors are no adapter (pretraining's whole UNet)
                def write(path):
                    return write_safetensors(path, now.tensors, {"format": "studio-checkpoint"})
            write_checkpoint(self.out, step, state, {"optimizer": opt_tensors, "extra": recipe.extra_state()}, write,
                             self.settings.keep_checkpoints)
            self.on_event({"kind": "checkpoint", "step": step, "path": str(final)})
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, path: Path, recipe: Recipe) -> int:
        state, tensors = read_checkpoint(path)
        saved = state.get("identity") or state.get("config", {})  # (checkpoints from before the identity)
        for key, value in recipe.identity.items():
            if saved.get(key) != value:
                raise TrainingError(f"{path} was trained with {key}={saved.get(key)!r}, this run has {value!r}; "
                                    "start a new output folder")
        if state["step"] > self.settings.steps:
            raise TrainingError(f"{path} is at step {state['step']}, beyond this run's {self.settings.steps} steps")
        recipe.load_tensors(tensors.get("adapter", {}))
        recipe.load_extra_state(tensors.get("extra", {}))
        self.optimizer.load_state_dict(unflatten_optimizer(tensors.get("optimizer", {}), state["optimizer"]))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.log(f"resumed from {path} at step {state['step']}")
        return int(state["step"])


def run_recipe(recipe: Recipe, settings: LoopSettings, **engine_options) -> TrainResult:
    """Engine(settings, **engine_options).run(recipe)."""
    return Engine(settings, **engine_options).run(recipe)


class Trainer:
    """A concept (or control) adapter run: TrainConfig -> the concept recipe on the engine."""

    def __init__(self, config: TrainConfig, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        config.validate()
        self.config = config
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop

    def run(self) -> TrainResult:
        from studio.training.concept import ConceptRecipe

        cfg = self.config
        engine = Engine(cfg.loop_settings(), adapter_path=Path(cfg.output_dir) / f"{cfg.name}.safetensors",
                        training_config=asdict(cfg), on_event=self.on_event, should_stop=self.should_stop)
        return engine.run(ConceptRecipe(cfg, engine.log))


def train(config: TrainConfig | None = None, *, preset: str | None = None, on_event=None, should_stop=None,
          **settings) -> TrainResult:
    """`studio.training.train(data="photos/", trigger="sks", preset="quick")` -> TrainResult (the adapter file)."""
    if config is None:
        config = config_with_preset(preset, **settings)
    return Trainer(config, on_event, should_stop).run()

