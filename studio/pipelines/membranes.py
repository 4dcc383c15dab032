"""Pipelines whose call applies each membrane at its per-prompt permeability (Facilitated Transport)."""

from __future__ import annotations

from studio.adapters.spm.model import membranes
from studio.adapters.spm.transport import METRICS, membrane_strengths, permeability

_CLASSES: dict[type, type] = {}


class MembraneMixin:
    """`pipe(prompts, ...)` computes, for every active membrane, the strength gamma of each prompt and runs
    the images of that prompt with the membrane at gamma times its weight. With `prompt_embeds` instead of
    prompts there is nothing to compare, and membranes act at their weight (full erasure)."""

    studio_permeability_metric = "tokensim"

    def __call__(self, prompt=None, *args, num_images_per_prompt: int | None = 1, **kwargs):
        from studio.adapters import attached_adapters

        attached = attached_adapters(self)
        names = {n: c for n, c in membranes(self).items() if attached.get(n, {}).get("weight", 1.0)}
        self.studio_last_permeability = {}
        if prompt is None or not names:
            return super().__call__(prompt, *args, num_images_per_prompt=num_images_per_prompt, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = {n: permeability(self, prompts, concepts, self.studio_permeability_metric)
                      for n, concepts in names.items()}
        self.studio_last_permeability = {n: g.tolist() for n, g in per_prompt.items()}
        strengths = {n: g.repeat_interleave(num_images_per_prompt or 1) for n, g in per_prompt.items()}
        with membrane_strengths(self, strengths):
            return super().__call__(prompt, *args, num_images_per_prompt=num_images_per_prompt, **kwargs)


def use_membranes(pipe, metric: str | None = "tokensim"):
    """Turn Facilitated Transport on for `pipe` (in place; metric None turns it off). The pipeline keeps
    its class's behaviour otherwise: it becomes a subclass of its own class with MembraneMixin's call."""
    from studio.adapters import AdapterError

    base = pipe.__class__.__bases__[1] if isinstance(pipe, MembraneMixin) else pipe.__class__
    if metric is None:
        pipe.__class__ = base
        return pipe
    if metric not in METRICS:
        raise AdapterError(f"unknown permeability metric {metric!r}; use one of {', '.join(METRICS)}")
    if base not in _CLASSES:
        # same name as the base class: diffusers writes the class name into model_index.json on save
        _CLASSES[base] = type(base.__name__, (MembraneMixin, base), {"__module__": __name__})
    pipe.__class__ = _CLASSES[base]
    pipe.studio_permeability_metric = metric
    return pipe


def load_membranes(pipe, files: dict | list, metric: str | None = "tokensim") -> list[str]:
    """Attach membrane files ({file: weight} or a list) and turn Facilitated Transport on with `metric`
    (None: each membrane acts at its weight on every prompt, as a plain LoRA would)."""
    from studio.adapters import AdapterError, load_adapters, read_adapter

    for path in files:
        method = read_adapter(path).method
        if method != "spm":
            raise AdapterError(f"{path} is a {method} adapter, not a membrane (pass it as an adapter instead)")
    names = load_adapters(pipe, files)
    use_membranes(pipe, metric)
    return names
