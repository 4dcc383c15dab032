"""Membrane settings: where the rank-1 adapters go, what they erase, and how they are trained."""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters.base import AdapterConfig, AdapterError
from studio.utils.settings import setting

# every Linear/1x1 Conv of the transformer blocks (SPM's targets), matched as module-path suffixes
TRANSFORMER_LINEARS = [
    # the UNet's (SD 1.x / 2.x, SDXL) transformer blocks: projections in and out, self- and cross-attention, ff
    r"attentions\.\d+\.proj_(in|out)",
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    # SD3 / Flux joint blocks (image and text streams) and Flux's single-stream blocks
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    r"transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)",
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)",
]


@dataclass
class SpmConfig(AdapterConfig):
    """One membrane erases `concepts`. Training is data-free: the model denoises `prompts` (default: the
    concepts themselves) with the membrane on, and the membrane learns to predict
    eps(surrogate) - eta * (eps(target) - eps(surrogate)) there (negative guidance away from the concept),
    while `anchors` random points of text-embedding space (plus the empty prompt) keep the frozen model's
    prediction, weighted by `anchor_weight` (Latent Anchoring)."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(TRANSFORMER_LINEARS), advanced=True,
        help="denoiser modules that carry the membrane: regexes matching a module path or a dotted suffix of it")
    concepts: list[str] = setting(default_factory=list, help="the concepts the membrane erases (e.g. 'circle')")
    prompts: list[str] = setting(default_factory=list,
                                 help="prompts the membrane is trained on; empty: the concepts themselves")
    surrogate: str = setting("", help="what the concept is pushed towards ('' : the empty prompt)")
    eta: float = setting(2.0, help="strength of the negative guidance away from the concept (the paper: 1.0; "
                                   "2.0 erases more on the embedded model, B3)")
    anchor_weight: float = setting(1.0, help="weight of the anchors' preservation loss (>= 0; the paper: 1000 on "
                                             "SD 1.4)")
    anchors: int = setting(3, help="random text-embedding anchors per step (>= 0)", advanced=True)
    anchor_empty: bool = setting(True, help="also keep the empty prompt's prediction (CFG's unconditional branch)",
                                 advanced=True)
    rank: int = setting(1, help="rank of the membrane's LoRA (>= 1; the paper: 1)")

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

    steps: int = setting(350, help="optimizer steps (>= 1)")
    lr: float = setting(5e-3, help="learning rate of the membrane (AdamW, > 0)")
    batch: int = setting(4, help="prompts per step (>= 1)")
    denoise_steps: int = setting(8, help="steps of the schedule the training latents are drawn along (DDIM; "
                                         "SD3 and Flux: their Euler schedule)")
    sample_guidance: float = setting(3.0, help="classifier-free guidance while denoising the training latents "
                                               "(membrane on; 1: none, which `studio erase` uses on Flux, whose "
                                               "guidance is distilled)")
    seed: int = setting(0, help="random seed of the latents, anchors and timesteps")
    resolution: int | None = setting(None, help="image side in pixels of the training latents; empty: the model's "
                                                "native size", advanced=True)
    warmup: int = setting(20, help="learning-rate warm-up steps (linear from 0)", advanced=True)


# the defaults are what the embedded model needs to erase a shape in under five CPU minutes (BENCHMARKS.md,
# B3); "sd15" keeps the paper's SD 1.x settings (rank 1, lr 1e-4 for 3000 steps, eta 1, lambda 1000, latents
# from a 30-step DDIM schedule, CFG 3)
PRESETS = {
    "shapes": {"settings": {}, "adapter": {}},
    "sd15": {"settings": {"steps": 3000, "lr": 1e-4, "batch": 1, "warmup": 500, "denoise_steps": 30},
             "adapter": {"anchor_weight": 1000.0, "anchors": 3, "eta": 1.0}},
}
