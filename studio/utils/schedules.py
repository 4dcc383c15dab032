"""Learning-rate factors shared by Studio's own training loops (pretraining stages, one-step distillation)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int = 0, time_progress: float = 0.0, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor`; with a time budget, the progress is the
    larger of the steps' share and `time_progress` (the budget's share spent)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
