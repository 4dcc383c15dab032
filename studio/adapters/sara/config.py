"""SaRA settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from studio.adapters.base import AdapterConfig, AdapterError
from studio.utils.settings import setting


@dataclass
class SaraConfig(AdapterConfig):
    """Train the smallest-magnitude weights of the targeted linears and convolutions (Hu et al. 2024).

    Exactly one of `threshold` (train |w| < threshold) and `budget` (how many weights: "150k", "20M", a
    fraction "0.05" or "5%") picks them; with a budget the threshold is the one global θ that selects
    that many. Their update is penalised by `nuclear_weight`·‖ΔW‖_* on `nuclear_layers` layers per step
    (0: every eligible layer), chosen at random per step. Progressive re-selection: after `reselect_at` (by
    default `reselect` of the run's steps, the paper's half) the entries whose weight W + ΔW has grown past the
    threshold are frozen at their learned values; the others train on with their optimizer state."""

    target_modules: list[str] = setting(
        default_factory=lambda: [r".*"], advanced=True,
        help="denoiser (UNet or transformer) Linear/Conv2d modules whose small weights may train: regexes on a "
             "module path or its dotted suffix")
    threshold: float | None = setting(None, help="train the weights with |w| below this (> 0); give it or budget")
    budget: str | None = setting("3%", help="how many weights train: a count ('150k', '20M') or a fraction "
                                            "('0.05', '5%')")
    nuclear_weight: float = setting(5e-4, help="weight of the nuclear-norm penalty on the update ΔW (>= 0; 0 is off)")
    nuclear_layers: int = setting(1, help="layers penalised per step, drawn at random (0: every eligible layer)",
                                  advanced=True)
    nuclear_min_dim: int = setting(32, help="layers with min(out, in) below this are not penalised", advanced=True)
    reselect: float | None = setting(0.5, help="progressive re-selection after this fraction of the run's steps "
                                               "(the paper: 0.5); empty: off")
    reselect_at: int | None = setting(None, advanced=True, help="re-selection after this step instead (overrides "
                                                                "reselect)")

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.budget is None):
            raise AdapterError("SaRA takes one of threshold (e.g. 2e-3) or budget (e.g. '20M', '5%'), not both")
        if self.threshold is not None and not float(self.threshold) > 0:
            raise AdapterError(f"SaRA threshold must be positive, got {self.threshold}")
        if self.budget is not None:
            parse_budget(self.budget, None)  # a bad string fails here, before any work
        if self.reselect_at is not None and int(self.reselect_at) < 1:
            raise AdapterError(f"SaRA reselect_at must be a step >= 1, got {self.reselect_at}")
        if self.reselect is not None and not 0 < float(self.reselect) < 1:
            raise AdapterError(f"SaRA reselect is a fraction of the steps between 0 and 1, got {self.reselect}")
        if self.nuclear_weight < 0 or self.nuclear_layers < 0:
            raise AdapterError("SaRA nuclear_weight and nuclear_layers must not be negative")


    def for_run(self, steps: int) -> "SaraConfig":
        if self.reselect_at is not None or self.reselect is None:
            return self
        return replace(self, reselect_at=max(1, round(steps * float(self.reselect))))


def parse_budget(budget: str | float | int, total: int | None) -> int:
    """'150k' / '20M' / '1.5G' → a count; '0.05' / '5%' → that fraction of `total` (None: syntax check only)."""
    text = str(budget).strip().lower().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg%]?)", text)
    if not m:
        raise AdapterError(f"SaRA budget {budget!r} is not a count ('150k', '20M') or a fraction ('0.05', '5%')")
    value, unit = float(m.group(1)), m.group(2)
    if total is None:
        return 0
    if unit == "%":
        count = value / 100 * total
    elif unit:
        count = value * {"k": 1e3, "m": 1e6, "g": 1e9}[unit]
    elif value < 1:
        count = value * total
    else:
        count = value
    if not 0 < count <= total:
        raise AdapterError(f"SaRA budget {budget!r} asks for {int(count)} weights; the targets hold {total}")
    return int(count)
