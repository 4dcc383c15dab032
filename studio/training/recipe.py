"""What a task hands the engine: a Recipe. The engine owns the loop (accelerate, the LR schedule, NaN stop,
Ctrl+C, checkpoints and exact resume, events, TensorBoard, previews, the result file); a recipe owns what is
its own (the adapter it attaches, its data, its per-step loss, its extra state, the file's tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Trainables:
    """What `Recipe.setup` returns. `params` are clipped and counted; `optimizer` is the recipe's own (None:
    AdamW over `params` with the run's lr and weight decay); `lr_lambda` its own LR factor of the step (None:
    the run's named schedule); `modules` are prepared by accelerate (DDP) and handed back to `Recipe.prepared`."""

    params: list[torch.nn.Parameter]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    lr_lambda: Callable[[int], float] | None = None
    trainable_parameters: int | None = None  # None: the elements of `params`


@dataclass(frozen=True)
class Share:
    """The rows of a step's global batch one loss call computes (this process's part of this micro-batch).
    A loss returns its rows' part of the global mean: sum over its rows of the per-row loss / `batch`."""

    rows: slice
    batch: int

    def __len__(self) -> int:
        return self.rows.stop - self.rows.start

    def indices(self) -> range:
        return range(self.rows.start, self.rows.stop)


@dataclass
class AdapterOutput:
    """An adapter file's content: what `studio.adapters.save_adapter` writes."""

    method: str
    config: Any
    tensors: dict[str, torch.Tensor]
    base: dict
    extra: dict[str, str] = field(default_factory=dict)


class Recipe:
    """The protocol a task implements (override what applies; the defaults do nothing). Every random draw in
    `loss` comes from its `generator` (a function of (seed, step)), so a resumed run and a run split over
    processes compute what one uninterrupted process does."""

    method: str = ""                 # the registry name the file's header carries
    label: str = "training"          # the progress bar's
    trigger: str = ""                # the header's trigger word (concept adapters)
    identity: dict[str, Any] = {}    # what a checkpoint must match for this run to resume from it

    def setup(self, accelerator) -> Trainables:
        """Attach what trains to the pipeline (on accelerator.device), load and cache the data."""
        raise NotImplementedError

    def prepared(self, modules: dict[str, torch.nn.Module]) -> None:
        """The Trainables' modules as accelerate prepared them: the loss must call these."""

    def loss(self, step: int, share: Share, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, optimizer) -> str | None:
        """After the optimizer's step (EMA, a discriminator, a method's schedule); a line to log, or None."""
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State beyond the trained tensors and the optimizer that a checkpoint must hold."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def checkpoint_file(self) -> AdapterOutput:
        """The trained tensors now (a checkpoint's adapter.safetensors)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors from a checkpoint's adapter.safetensors."""
        raise NotImplementedError

    def finish(self) -> None:
        """Training is over (done, stopped or interrupted): eval mode, EMA weights in place."""

    def result_file(self) -> AdapterOutput | None:
        """What the run's adapter file holds (None: the run writes none)."""
        return self.checkpoint_file()

    def preview(self, step: int) -> tuple[list[str], list[Any]] | None:
        """Preview prompts and images (main process only), or None."""
        return None
