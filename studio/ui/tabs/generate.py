"""The Generate tab: images from a prompt, with library adapters at a weight and, optionally, a one-step
adaptor (one UNet call, no guidance)."""

from __future__ import annotations

from typing import Any

from studio.generate import GenerationSettings, generate, output_paths, save_images
from studio.ui.forms import bind
from studio.ui.workspace import Context, as_error, output_stem

ONE_STEP = "one-step"


def run_generate(ctx: Context, values: dict[str, Any]) -> tuple[list[str], str]:
    adapters, weight, one_step = values.get("adapters") or [], float(values.get("weight", 1.0)), values.get("one_step")
    steps, guidance = (1, 0.0) if one_step else (values["steps"], values["guidance"])  # one UNet call, unguided
    settings = GenerationSettings(values["prompt"], values["negative"], int(steps), float(guidance),
                                  int(values["seed"]), int(values["batch"]))
    settings.validate()
    ws = ctx.workspace
    chosen = {str(ws.adapter(n)): weight for n in adapters}
    source = (values.get("model") or "").strip() or ctx.model
    fast = str(ws.adapter(one_step)) if one_step else None
    with ctx.cache.lock:
        images = generate(ctx.cache.get(source, chosen, one_step=fast), settings)
    # saved with their settings in the PNG, so a downloaded image says how it was made
    paths = output_paths(output_stem(ws).with_suffix(".png"), len(images))
    extra: dict[str, Any] = {"adapters": {n: weight for n in adapters}}
    if one_step:
        extra["one_step"] = one_step
    save_images(images, paths, settings, source, extra)
    used = f" with {', '.join(adapters)} at {weight:g}" if adapters else ""
    used += f", one step with {one_step}" if one_step else ""
    seeds = f"{settings.seed}..{settings.seed + settings.batch - 1}"
    return [str(p) for p in paths], f"{len(images)} image(s), seed {seeds}{used}"


def build(ctx: Context) -> dict[str, Any]:
    """The tab's layout and events; returns the components other tabs refresh: "adapters" (the library's
    plain adapters) and "one_step" (its one-step adaptors)."""
    import gradio as gr

    with gr.Row():
        with gr.Column():
            page = {"model": gr.Textbox(value=ctx.model, label="Model"),
                    "prompt": gr.Textbox(value="a large blue square on a yellow background", label="Prompt"),
                    "negative": gr.Textbox(value="", label="Negative prompt")}
            with gr.Row():
                page["adapters"] = gr.Dropdown([], multiselect=True, label="Adapters from the library")
                page["weight"] = gr.Slider(-1, 2, value=1.0, step=0.05, label="Adapter weight")
            page["one_step"] = gr.Dropdown([], value=None, label="One step (a one-step adaptor from the library; "
                                                                 "sets 1 step, guidance 0)")
            with gr.Row():
                page["steps"] = gr.Slider(1, 100, value=25, step=1, label="Steps")
                page["guidance"] = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
            with gr.Row():
                page["seed"] = gr.Number(value=0, precision=0, label="Seed")
                page["batch"] = gr.Slider(1, 8, value=4, step=1, label="Batch")
            button = gr.Button("Generate", variant="primary")
        with gr.Column():
            gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png", elem_id="gallery")
            status = gr.Markdown()
    button.click(bind(as_error(lambda values: run_generate(ctx, values)), page), inputs_kwargs=page,
                 outputs=[gallery, status], api_name="generate")
    return page


def one_step_choices(ctx: Context):
    import gradio as gr

    return gr.update(choices=ctx.workspace.names(ONE_STEP))
