"""Membrane settings: where the rank-1 adapters go, what they erase, and how they are trained."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.adapters.base import AdapterConfig, AdapterError

# every Linear/1x1 Conv of the transformer blocks (SPM's targets), matched as module-path suffixes
TRANSFORMER_LINEARS = [
    r"attentions\.\d+\.proj_(in|out)",
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
]


@dataclass
class SpmConfig(AdapterConfig):
    """One membrane erases `concepts`. Training is data-free: the model denoises `prompts` (default: the
    concepts themselves) with the membrane on, and the membrane learns to predict
    eps(surrogate) - eta * (eps(target) - eps(surrogate)) there (negative guidance away from the concept),
    while `anchors` random points of text-embedding space (plus the empty prompt) keep the frozen model's
    prediction, weighted by `anchor_weight` (Latent Anchoring)."""

    target_modules: list[str] = field(default_factory=lambda: list(TRANSFORMER_LINEARS))
    concepts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    surrogate: str = ""
    eta: float = 2.0               # the paper's 1.0 left 14-19% of circles on the embedded model (B3); 2.0: 3%
    anchor_weight: float = 1.0     # the paper's 1000 (SD 1.4) kept erasure from starting on the embedded model
    anchors: int = 3               # random anchors per step; the empty prompt is always a fourth
    anchor_empty: bool = True      # keep eps(empty prompt) too (what CFG's unconditional branch uses)
    rank: int = 1

    def __post_init__(self) -> None:
        self.concepts = [c.strip() for c in ([self.concepts] if isinstance(self.concepts, str) else self.concepts)
                         if c and c.strip()]
        if self.rank < 1:
            raise AdapterError(f"membrane rank must be at least 1, got {self.rank}")
        if self.anchors < 0 or self.anchor_weight < 0:
            raise AdapterError("anchors and anchor_weight must be >= 0")

    def target_prompts(self) -> list[str]:
        return list(self.prompts) or list(self.concepts)


@dataclass
class EraseSettings:
    """How a membrane is trained (not stored in the file)."""

    steps: int = 350
    lr: float = 5e-3
    batch: int = 4
    denoise_steps: int = 8         # the DDIM schedule the training latents are drawn from
    sample_guidance: float = 3.0   # CFG while denoising the training latents (membrane on)
    seed: int = 0
    resolution: int | None = None  # default: the model's native size
    warmup: int = 20


# the defaults are what the embedded model needs to erase a shape in under five CPU minutes (BENCHMARKS.md,
# B3); "sd15" keeps the paper's SD 1.x settings (rank 1, lr 1e-4 for 3000 steps, eta 1, lambda 1000, latents
# from a 30-step DDIM schedule, CFG 3)
PRESETS = {
    "shapes": {"settings": {}, "adapter": {}},
    "sd15": {"settings": {"steps": 3000, "lr": 1e-4, "batch": 1, "warmup": 500, "denoise_steps": 30},
             "adapter": {"anchor_weight": 1000.0, "anchors": 3, "eta": 1.0}},
}
