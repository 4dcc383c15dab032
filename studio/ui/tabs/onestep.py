"""The One step tab: distil the model to one step (a small adaptor learns to draw in one UNet call what the
model draws in many guided steps, on images the model makes itself). The settings form is made from the
distill task's SETTINGS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.loading import StudioError
from studio.ui.forms import bind, settings_form, settings_kwargs
from studio.ui.workspace import Context, as_message, safe_name

KIND = "one-step"


def job_settings(values: dict[str, Any]) -> dict[str, Any]:
    from studio.tasks.distill import SETTINGS
    from studio.utils.settings import from_values

    name = safe_name(values.get("name") or "one_step")
    rank = int(values.get("rank") or 0)
    if rank < 1:
        raise StudioError("the adaptor's rank must be at least 1")
    settings = settings_kwargs(SETTINGS, values, changed_only=True)
    checked = from_values(SETTINGS, settings, StudioError, "distill")
    if hasattr(checked, "validate"):
        checked.validate()  # refuse bad settings now, not in the queue
    return {"kind": KIND, "name": name, "settings": settings, "rank": rank}


def run_job(ctx: Context, settings: dict[str, Any], on_event, should_stop) -> Path | None:
    from studio.tasks.distill import distill

    name = settings["name"]
    result = distill(ctx.workspace.runs / f"{name}.safetensors", model=ctx.model, settings=settings["settings"],
                     rank=settings["rank"], cache=ctx.workspace.runs / f"{name}.teacher.safetensors",
                     on_event=on_event, should_stop=should_stop)
    return None if result.stopped else ctx.workspace.keep(result.adapter_path, name)


def build(ctx: Context) -> None:
    import gradio as gr

    from studio.tasks.distill import SETTINGS

    gr.Markdown("Distil the model to one step: a small adaptor learns to draw in one UNet call what the model "
                "draws in 25 guided steps. It trains on images the model makes itself; pick it in the Generate "
                "tab's *One step* box when it is done.")
    with gr.Row():
        with gr.Column():
            page = {"name": gr.Textbox(value="one_step", label="Name"),
                    "rank": gr.Number(value=4, precision=0, label="Rank (of the adaptor)")}
            with gr.Accordion("Training settings", open=True):
                page.update(settings_form(SETTINGS))
            with gr.Row():
                start = gr.Button("Distil", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column():
            status = gr.Markdown("", elem_id="distill-status")

    @as_message
    def start_distill(values: dict[str, Any]) -> str:
        job = job_settings(values)
        return f"queued one-step adaptor **{job['name']}** (job {ctx.jobs.submit(job['name'], job).id})"

    start.click(bind(start_distill, page), inputs_kwargs=page, outputs=status, api_name="distill")
    stop.click(ctx.stop_training, None, status, api_name="distill_stop")
    ctx.follow_jobs(status)
