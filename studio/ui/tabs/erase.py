"""The Erase tab: train a membrane that makes the model unable to draw a concept, then compare the test prompts
without and with the chosen membranes. The training settings form is made from the erase task's SETTINGS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.generate import GenerationSettings, generate
from studio.loading import StudioError
from studio.ui.forms import bind, settings_form, settings_kwargs
from studio.ui.workspace import Context, as_error, as_message, safe_name

KIND = "erase"


def job_settings(values: dict[str, Any]) -> dict[str, Any]:
    from studio.tasks.erase import SETTINGS
    from studio.utils.settings import from_values

    words = [c.strip() for c in (values.get("concepts") or "").split(",") if c.strip()]
    if not words:
        raise StudioError("name what to erase, e.g. circle (several: circle, red)")
    name = safe_name(values.get("name") or "erase_" + "_".join(words))
    settings = settings_kwargs(SETTINGS, values, changed_only=True)
    checked = from_values(SETTINGS, settings, StudioError, "erase")  # refuse bad settings now, not in the queue
    if hasattr(checked, "validate"):
        checked.validate()
    return {"kind": KIND, "name": name, "concepts": words, "settings": settings}


def run_job(ctx: Context, settings: dict[str, Any], on_event, should_stop) -> Path | None:
    from studio.tasks.erase import erase

    name = settings["name"]
    result = erase(settings["concepts"], ctx.workspace.runs / f"{name}.safetensors", model=ctx.model,
                   settings=settings["settings"], on_event=on_event, should_stop=should_stop)
    return None if result.stopped else ctx.workspace.keep(result.adapter_path, name)


def compare(ctx: Context, values: dict[str, Any]) -> tuple[list, str]:
    """The test prompts without and with the chosen membranes (same seeds), and each prompt's strength."""
    prompts = [p.strip() for p in (values.get("prompts") or "").splitlines() if p.strip()]
    if not values.get("membranes"):
        raise StudioError("pick one or more membranes from the library")
    if not prompts:
        raise StudioError("write one or more test prompts, one per line")
    source = (values.get("model") or "").strip() or ctx.model
    paths = {str(ctx.workspace.adapter(n)): 1.0 for n in values["membranes"]}
    seed = int(values.get("seed") or 0)
    images, strengths = [], []
    with ctx.cache.lock:
        for chosen in ({}, paths):
            pipe = ctx.cache.get(source, chosen)
            for i, prompt in enumerate(prompts):
                settings = GenerationSettings(prompt, "", int(values["steps"]), float(values["guidance"]), seed + i, 1)
                images.append((generate(pipe, settings)[0], ("after: " if chosen else "before: ") + prompt))
                if chosen:
                    strengths.append(f"- {prompt}: " + ", ".join(
                        f"{n} {g[0]:.2f}" for n, g in (pipe.studio_last_permeability or {}).items()))
    return images, "Membrane strength per prompt:\n" + "\n".join(strengths)


def membrane_choices(ctx: Context):
    import gradio as gr

    return gr.update(choices=ctx.workspace.names(KIND))


def build(ctx: Context, model_box) -> Any:
    """The tab's layout and events; `model_box` is the Generate tab's model. Returns the membrane Dropdown
    (the library's erase adapters), which other tabs refresh."""
    import gradio as gr

    from studio.tasks.erase import SETTINGS

    gr.Markdown("Train a membrane that makes the model unable to draw a concept. It acts only on prompts that "
                "name the concept: others pass through unchanged.")
    with gr.Row():
        with gr.Column():
            train = {"concepts": gr.Textbox(value="circle", label="Concepts to erase (comma-separated)"),
                     "name": gr.Textbox(value="no_circle", label="Name")}
            with gr.Accordion("Training settings", open=False):
                train.update(settings_form(SETTINGS))
            with gr.Row():
                start = gr.Button("Train membrane", variant="primary")
                stop = gr.Button("Stop")
            status = gr.Markdown("", elem_id="erase-status")
            test = {"model": model_box, "seed": train["seed"],
                    "membranes": gr.Dropdown([], multiselect=True, label="Membranes (from the library)"),
                    "prompts": gr.Textbox(value="a large red circle on a blue background\n"
                                                "a large red square on a blue background",
                                          lines=4, label="Test prompts (one per line)")}
            with gr.Row():
                test["steps"] = gr.Slider(1, 100, value=25, step=1, label="Steps")
                test["guidance"] = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
            compare_button = gr.Button("Compare before / after")
        with gr.Column():
            gallery = gr.Gallery(label="Before / after", columns=2, height="auto", format="png",
                                 elem_id="erase-gallery")
            strengths = gr.Markdown()

    @as_message
    def start_erase(values: dict[str, Any]) -> str:
        job = job_settings(values)
        queued = ctx.jobs.submit(job["name"], job)
        return f"queued membrane **{job['name']}** erasing {', '.join(job['concepts'])} (job {queued.id})"

    start.click(bind(start_erase, train), inputs_kwargs=train, outputs=status, api_name="erase")
    stop.click(ctx.stop_training, None, status, api_name="erase_stop")
    compare_button.click(bind(as_error(lambda values: compare(ctx, values)), test), inputs_kwargs=test,
                         outputs=[gallery, strengths], api_name="compare_erase")
    ctx.follow_jobs(status)
    return test["membranes"]
