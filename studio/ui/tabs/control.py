"""The Control tab: steer the layout with a control image (uploaded or drawn, turned into the condition by a
preprocessing), generate with one or two control adapters, and train a control adapter on shapes-world renders.
The methods come from the registry (kind "control"), each with a settings form made from its config class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.generate import GenerationSettings, generate, output_paths, save_images
from studio.loading import StudioError
from studio.ui.forms import bind, method_forms
from studio.ui.workspace import Context, as_error, as_message, output_stem, safe_name

KIND = "control"
# the config fields this tab sets itself (the condition kind, and the adapter a training starts from)
PAGE_FIELDS = ("condition", "init_from")
# the preprocessings: (label, value); any other value typed in is checked by studio.shapes.conditions
CONTROL_PREPROCESS = [("none (the image is the condition)", "none"), ("canny (edges of the image)", "canny"),
                      ("lineart (line drawing of the image)", "lineart"),
                      ("mask: render the prompt's shape (shapes world)", "mask"),
                      ("edges: render the prompt's shape's outline (shapes world)", "edges"),
                      ("box: render the prompt's shape's bounding box (shapes world)", "box"),
                      ("scribble: render strokes over the prompt's shape (shapes world)", "scribble")]
CONDITION_KINDS = ["mask", "edges", "mask,edges", "box", "scribble", "canny", "lineart"]


def editor_image(value):
    """The picture in the page's image editor (upload or drawing, strokes over the upload, transparent parts on
    black) as an RGB PIL image, or None when there is none."""
    from PIL import Image

    if value is None:
        return None
    picture = value
    if isinstance(value, dict):
        picture = value.get("composite")
        if picture is None:
            picture = value.get("background")
    if picture is None:
        return None
    if isinstance(picture, (str, Path)):
        picture = Image.open(picture)
    elif not isinstance(picture, Image.Image):
        import numpy as np

        picture = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    if "A" in picture.getbands() or "transparency" in picture.info:
        rgba = picture.convert("RGBA")
        if rgba.getchannel("A").getbbox() is None:
            return None  # an empty canvas
        picture = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return picture.convert("RGB")


def control_condition(image, preprocess: str, prompt: str, seed: int):
    """The condition image (HxWx3 uint8) the tab hands the adapter: the image itself, a weight-free annotator's
    output on it, or the shapes world's mask / edges / box / scribble of the shape the prompt describes."""
    import numpy as np

    from studio.shapes import world
    from studio.shapes.conditions import WORLD_CONDITIONS, annotate, check_kind, world_condition

    kind = (preprocess or "none").strip()
    if kind in WORLD_CONDITIONS:
        spec = world.parse_caption(prompt or "")
        if spec is None:
            raise StudioError(f"to render a {kind} from the prompt it must name a shape, a colour and a background, "
                              "e.g. \"a large red circle on a gray background\"")
        return world_condition(kind, spec, int(seed))
    if kind != "none":
        check_kind(kind)  # an annotator that needs downloaded weights is refused before any image is read
    picture = editor_image(image)
    if picture is None:
        raise StudioError("give a control image: upload one or draw on the canvas")
    return np.array(picture) if kind == "none" else annotate(kind, picture)


def preview_condition(values: dict[str, Any]):
    condition = control_condition(values["image"], values["preprocess"], values["prompt"], values["seed"])
    h, w = condition.shape[:2]
    empty = " (empty: all black)" if not condition.any() else ""
    return condition, f"condition {w}x{h}{empty}"


def run_control(ctx: Context, values: dict[str, Any]):
    """Generate under the first condition (and the second's, summed, when a second adapter is picked)."""
    from PIL import Image

    from studio.utils.files import atomic_path

    settings = GenerationSettings(values["prompt"], values["negative"], int(values["steps"]),
                                  float(values["guidance"]), int(values["seed"]), int(values["batch"]))
    settings.validate()
    if not values.get("adapter"):
        raise StudioError("pick a control adapter from the library (or train one below)")
    rows = [("adapter", "image", "preprocess", "scale")] + [("adapter2", "image2", "preprocess2", "scale2")] * bool(
        values.get("adapter2"))
    source = (values.get("model") or "").strip() or ctx.model
    stem = output_stem(ctx.workspace)
    start, end = float(values["start"]), float(values["end"])
    control, used = [], []
    for i, keys in enumerate(rows):
        name, picture, kind, weight = (values.get(key) for key in keys)
        kind, weight = kind or "none", float(1.0 if weight is None else weight)
        condition = control_condition(picture, kind, values["prompt"], values["seed"])
        control.append({"adapter": str(ctx.workspace.adapter(name)), "image": condition, "scale": weight,
                        "start": start, "end": end})
        path = stem.with_name(stem.name + ("-condition.png" if i == 0 else f"-condition-{i + 1}.png"))
        used.append({"adapter": name, "image": path.name, "preprocess": kind, "scale": weight, "start": start,
                     "end": end, "_array": condition, "_path": path})
    with ctx.cache.lock:
        images = generate(ctx.cache.get(source, control=control), settings)
    paths = output_paths(stem.with_suffix(".png"), len(images))
    for item in used:  # each condition is kept beside the images, which name it in their settings
        with atomic_path(item.pop("_path")) as tmp:
            Image.fromarray(item.pop("_array")).save(tmp, format="PNG")
    save_images(images, paths, settings, source, {"control": used})
    how = " + ".join(f"{u['adapter']} at {u['scale']:g}" for u in used)
    return [str(p) for p in paths], str(ctx.workspace.outputs / used[0]["image"]), (
        f"{len(images)} image(s), seed {settings.seed}..{settings.seed + settings.batch - 1}, "
        f"controlled by {how} (steps {start:g}–{end:g})")


def job_settings(ctx: Context, forms, values: dict[str, Any]) -> dict[str, Any]:
    """The queued job of the training form's values: {"kind", "config": studio.tasks.control.control_config's
    keywords}, checked now (without rendering the pairs)."""
    from studio.tasks.control import control_config

    condition = (values.get("condition") or "").strip()
    method = values["method"]
    name = safe_name(values.get("name") or f"{method}_{condition}")
    adapter = forms.settings(method, values)
    if values.get("start_from"):  # a library adapter of the same method: the second stage, or few-shot
        start = ctx.workspace.library / f"{values['start_from']}.safetensors"
        if not start.is_file():
            raise StudioError(f"no adapter named {values['start_from']!r} in the library to start from")
        adapter["init_from"] = str(start)
    config = {"condition": condition, "method": method, "examples": int(values.get("examples") or 0),
              "two_shapes": float(values.get("two_shapes") or 0.0),
              "overlay_scenes": bool(values.get("overlay_scenes")), "preset": values.get("preset") or None,
              "name": name, "seed": int(values.get("seed") or 0), "model": ctx.model,
              "output_dir": str(ctx.workspace.runs / name), "progress_bar": False, "adapter": adapter}
    if values.get("steps"):
        config["steps"] = int(values["steps"])
    control_config(**config, render=False).validate()
    return {"kind": KIND, "config": config}


def run_job(ctx: Context, settings: dict[str, Any], on_event, should_stop) -> Path | None:
    from studio.tasks.control import control_config
    from studio.ui.tabs.train import train_and_keep

    config = settings["config"]
    on_event({"kind": "phase", "message": f"rendering {config['examples']} {config['condition']} training pairs"})
    return train_and_keep(ctx, control_config(**config), on_event, should_stop)


def control_choices(ctx: Context):
    """The library's control adapters: for the first and the second condition, and to start a training from."""
    import gradio as gr

    names = ctx.workspace.names(KIND)
    return gr.update(choices=names), gr.update(choices=names), gr.update(choices=[""] + names)


def _editor(height: int, label: str, elem_id: str | None = None):
    import gradio as gr
    from PIL import Image

    return gr.ImageEditor(value={"background": Image.new("RGB", (128, 128)), "layers": [], "composite": None},
                          type="pil", sources=["upload", "clipboard"], canvas_size=(128, 128), height=height,
                          brush=gr.Brush(default_size=6, colors=["#ffffff", "#000000"], default_color="#ffffff"),
                          label=label, elem_id=elem_id)


def _generation_inputs(ctx: Context, model_box) -> dict[str, Any]:
    import gradio as gr

    page = {"model": model_box}
    with gr.Row():
        page["adapter"] = gr.Dropdown([], value=None, label="Control adapter (from the library)", scale=4)
        page["refresh"] = gr.Button("↻", scale=0, min_width=40)
    page["image"] = _editor(360, "Control image (upload, or draw)", "control-image")
    page["preprocess"] = gr.Dropdown(CONTROL_PREPROCESS, value="none", allow_custom_value=True,
                                     label="Preprocess (the image becomes the condition)")
    page["prompt"] = gr.Textbox(value="a large red circle on a gray background",
                                label="Prompt (also what mask / edges render)")
    page["negative"] = gr.Textbox(value="", label="Negative prompt (control)")
    with gr.Row():
        page["scale"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
        page["start"] = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (fraction of steps)")
        page["end"] = gr.Slider(0, 1, value=1.0, step=0.05, label="End (fraction of steps)")
    with gr.Accordion("Second condition (optional: its effect is added to the first's)", open=False):
        page["adapter2"] = gr.Dropdown([], value=None, label="Second control adapter")
        page["image2"] = _editor(300, "Second control image")
        with gr.Row():
            page["preprocess2"] = gr.Dropdown(CONTROL_PREPROCESS, value="none", allow_custom_value=True,
                                              label="Second preprocess")
            page["scale2"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Second conditioning scale")
    with gr.Row():
        page["steps"] = gr.Slider(1, 100, value=25, step=1, label="Sampling steps")
        page["guidance"] = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance scale")
    with gr.Row():
        page["seed"] = gr.Number(value=0, precision=0, label="Seed (also of the rendered shape)")
        page["batch"] = gr.Slider(1, 8, value=4, step=1, label="Images")
    return page


def _training_inputs() -> tuple[dict[str, Any], Any]:
    import gradio as gr

    from studio.adapters import method_names
    from studio.tasks.control import DEFAULT_EXAMPLES, DEFAULT_METHOD, DEFAULT_RECIPE
    from studio.training import PRESETS

    gr.Markdown("Trains on shapes-world renders and their condition images, drawn here (what `studio "
                "control-train` does without --data); the adapter goes into the library.")
    with gr.Row():
        page = {"name": gr.Textbox(value="mask_control", label="Adapter name"),
                "method": gr.Dropdown(method_names(KIND), value=DEFAULT_METHOD, label="Control method"),
                "condition": gr.Dropdown(CONDITION_KINDS, value="mask", allow_custom_value=True,
                                         label="Condition kind")}
    with gr.Row():
        recipe = f"control recipe ({DEFAULT_RECIPE['steps']} steps x {DEFAULT_RECIPE['batch_size']})"
        page["preset"] = gr.Dropdown([(recipe, "")] + [(name, name) for name in PRESETS], value="",
                                     label="Training preset")
        page["steps"] = gr.Number(value=0, precision=0, label="Training steps (0: preset)")
        page["examples"] = gr.Number(value=DEFAULT_EXAMPLES, precision=0, label="Rendered examples")
        page["seed"] = gr.Number(value=0, precision=0, label="Training seed")
    with gr.Row():
        page["two_shapes"] = gr.Slider(0, 1, value=0.0, step=0.05, label="Two-shape scenes (fraction)",
                                       info="each scene's two conditions are two inputs, summed as at generation: "
                                            "multi-condition control")
        page["overlay_scenes"] = gr.Checkbox(value=False, label="Overlay a scene's conditions in one image",
                                             info="a first stage: the adapter learns to read them")
        page["start_from"] = gr.Dropdown([""], value="", allow_custom_value=True,
                                         label="Start from (library adapter, same method)",
                                         info="the second stage, or few-shot adaptation to a new kind")
    with gr.Accordion("Method settings", open=False):
        forms = method_forms(KIND, DEFAULT_METHOD, skip=PAGE_FIELDS)
    forms.follow(page["method"])
    return page, forms


def build(ctx: Context, model_box) -> tuple[Any, list[Any]]:
    """The tab's layout and events; `model_box` is the Generate tab's model. Returns the Tab and the Dropdowns
    of the library's control adapters (other tabs refresh them with `control_choices`)."""
    import gradio as gr

    gr.Markdown("Steer the layout with a control image: upload one or draw on the canvas (white on black, as "
                "masks and edges are), pick how it becomes the condition, preview it, generate. A control adapter "
                "is trained for the kinds of condition it saw (mask, edges, box, scribble, canny, lineart; "
                "mask,edges for both): train one below.")
    with gr.Row():
        with gr.Column():
            page = _generation_inputs(ctx, model_box)
            with gr.Row():
                preview_button = gr.Button("Preview condition")
                go = gr.Button("Generate with control", variant="primary")
        with gr.Column():
            condition = gr.Image(label="Condition", type="filepath", format="png", height=260, interactive=False,
                                 elem_id="control-condition")
            gallery = gr.Gallery(label="Controlled images", columns=4, height="auto", format="png",
                                 elem_id="control-gallery")
            status = gr.Markdown()
    with gr.Accordion("Train a control adapter", open=False):
        train, forms = _training_inputs()
        with gr.Row():
            start = gr.Button("Train control adapter", variant="primary")
            stop = gr.Button("Stop")
        train_status = gr.Markdown("", elem_id="control-train-status")
    choices = [page["adapter"], page["adapter2"], train["start_from"]]
    page["refresh"].click(lambda: control_choices(ctx), None, choices, show_progress="hidden",
                          api_name="control_adapters")
    shown = {key: page[key] for key in ("image", "preprocess", "prompt", "seed")}
    preview_button.click(bind(as_error(preview_condition), shown), inputs_kwargs=shown,
                         outputs=[condition, status], api_name="control_preview")
    generation = {key: component for key, component in page.items() if key != "refresh"}
    go.click(bind(as_error(lambda values: run_control(ctx, values)), generation), inputs_kwargs=generation,
             outputs=[gallery, condition, status], api_name="control_generate")

    @as_message
    def start_training(values: dict[str, Any]) -> str:
        import shutil

        job = job_settings(ctx, forms, values)
        config = job["config"]
        if (ctx.workspace.runs / config["name"]).exists():
            shutil.rmtree(ctx.workspace.runs / config["name"])
        queued = ctx.jobs.submit(config["name"], job)
        return (f"queued control adapter **{config['name']}** ({config['method']} on {config['condition']} "
                f"conditions, job {queued.id})")

    inputs = {**train, **forms.components()}
    start.click(bind(start_training, inputs), inputs_kwargs=inputs, outputs=train_status, api_name="control_train")
    stop.click(ctx.stop_training, None, train_status, api_name="control_stop")
    ctx.follow_jobs(train_status)
    return choices
