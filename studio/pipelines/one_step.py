"""One-step generation: a HiPA adaptor attached and the scheduler set so one inference step calls the UNet
at the last training timestep (trailing spacing) and lands on x0. A flow model (SD3, Flux) keeps its Euler
scheduler: one step runs the transformer at σ = 1 and lands on x0 = z − v.

    pipe = load_pipeline("shapes", one_step="hipa.safetensors")
    pipe("a red circle on a gray background", num_inference_steps=1, guidance_scale=0.0)
    # or, as SD-Turbo is called: pipe(prompt, timesteps=[999], guidance_scale=0.0)
"""

from __future__ import annotations

from pathlib import Path

from studio.adapters.hipa.schedule import one_step_scheduler, one_step_timestep
from studio.adapters.sampling import is_flow


def use_one_step(pipe):
    """Give `pipe` the one-step scheduler (in place; a flow model's own one already is); `pipe.studio_one_step`
    holds the timestep it runs at."""
    if not is_flow(pipe):
        pipe.scheduler = one_step_scheduler(pipe.scheduler.config)
    pipe.studio_one_step = one_step_timestep(pipe)
    return pipe


def load_one_step(pipe, path: str | Path, weight: float = 1.0) -> str:
    """Attach a HiPA adaptor file and switch to the one-step scheduler; returns the adapter's name."""
    from studio.adapters import AdapterError, load_adapters, read_adapter

    file = read_adapter(path)
    if file.method != "hipa":
        raise AdapterError(f"{path} is a {file.method} adapter, not a one-step (HiPA) adaptor")
    timestep = int(file.config.get("timestep", -1))
    if timestep != one_step_timestep(pipe):
        raise AdapterError(f"{path} was trained at timestep {timestep}, but this model's one-step timestep is "
                           f"{one_step_timestep(pipe)}")
    name = load_adapters(pipe, {path: weight})[0]
    use_one_step(pipe)
    return name
