"""The Train tab: a concept adapter from uploaded pictures (or a workspace folder), with any registered concept
method; the method's own settings form is made from its config class."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from studio.data import DataError, load_examples, read_caption
from studio.loading import StudioError
from studio.ui.forms import bind, method_forms
from studio.ui.workspace import Context, Workspace, as_message, safe_name

KIND = "concept"
MAX_UPLOADS = 50
MIN_UPLOADS = 3


def upload_captions(files: list[str] | None) -> list[list[str]]:
    """[image name, caption] for every uploaded image: the caption from its same-name .txt if one was
    uploaded, else empty (the instance prompt or trigger word is used)."""
    paths = [Path(f) for f in files or []]
    texts = {p.stem: p for p in paths if p.suffix.lower() == ".txt"}
    rows = []
    for p in paths:
        if p.suffix.lower() == ".txt":
            continue
        caption = ""
        if p.stem in texts:
            try:
                caption = read_caption(texts[p.stem])
            except (OSError, DataError):
                caption = ""  # named when training starts
        rows.append([p.name, caption])
    return rows


def stage_uploads(files: list[str], dest: Path, captions: list[list[str]] | None = None) -> Path:
    """Copy uploaded images (and same-name .txt captions) into `dest` and check every image now, so a bad
    upload is named in the page before any training starts. Captions typed in the page win over files."""
    images = [Path(f) for f in files if Path(f).suffix.lower() != ".txt"]
    if not MIN_UPLOADS <= len(images) <= MAX_UPLOADS:
        raise StudioError(f"upload {MIN_UPLOADS} to {MAX_UPLOADS} images (got {len(images)})")
    dest.mkdir(parents=True, exist_ok=True)
    problems = []
    for src in map(Path, files):
        target = dest / src.name
        shutil.copyfile(src, target)
        if target.suffix.lower() == ".txt":
            continue
        try:
            load_examples([target], instance_prompt="check", min_size=32)
        except DataError as exc:
            problems.append(str(exc).replace(str(target), src.name))
    if problems:
        shutil.rmtree(dest, ignore_errors=True)
        raise StudioError("; ".join(problems))
    for row in captions or []:
        if len(row) >= 2 and str(row[0]).strip() and str(row[1]).strip() and (dest / str(row[0])).is_file():
            (dest / str(row[0])).with_suffix(".txt").write_text(str(row[1]).strip(), encoding="utf-8")
    return dest


def training_data(ws: Workspace, name: str, files, folder: str | None, captions) -> Path:
    """The folder a training reads: the uploads staged and checked, or a folder inside the workspace."""
    if files:
        rows = captions.get("data") if isinstance(captions, dict) else captions
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return stage_uploads([f if isinstance(f, str) else f.name for f in files], ws.uploads / f"{name}-{stamp}",
                             rows)
    if folder and folder.strip():
        return ws.inside(folder.strip())
    raise StudioError("upload pictures of the concept, or name a folder in the workspace")


def job_settings(ctx: Context, forms, values: dict[str, Any]) -> dict[str, Any]:
    """The queued job of the page's values: {"kind", "preset", "config": TrainConfig values by name}, checked."""
    from studio.training import config_with_preset

    name = safe_name(values["name"])
    trigger = (values.get("trigger") or "").strip() or None
    instance_prompt = (values.get("instance_prompt") or "").strip() or None
    if not trigger and not instance_prompt:
        raise StudioError("give a trigger word (e.g. sks) or an instance prompt")
    method = values["method"]
    adapter = forms.settings(method, values)  # before the uploads are staged: a wrong setting costs nothing
    data = training_data(ctx.workspace, name, values.get("files"), values.get("folder"), values.get("captions"))
    config = {"method": method, "model": ctx.model, "name": name, "data": str(data), "trigger": trigger,
              "instance_prompt": instance_prompt, "output_dir": str(ctx.workspace.runs / name),
              "progress_bar": False, "seed": int(values.get("seed") or 0),
              "resume": "latest" if values.get("resume") else None,
              "preview_prompts": [instance_prompt or f"a {trigger}"], "adapter": adapter}
    if values.get("trigger_token"):
        config["trigger_token"] = True
    for field, kind in (("steps", int), ("lr", float), ("batch_size", int), ("preview_every", int)):
        if values.get(field):  # 0: the preset's
            config[field] = kind(values[field])
    preset = values.get("preset")
    checked = config_with_preset(preset, **config)
    checked.validate()
    _check_method_settings(method, checked.adapter)
    return {"kind": KIND, "preset": preset, "config": config}


def _check_method_settings(method: str, adapter: dict[str, Any]) -> None:
    from studio.adapters import AdapterError, get_method

    try:
        get_method(method).config_class.from_dict(adapter)
    except AdapterError as exc:
        raise StudioError(f"{method}: {exc}") from None


def train_and_keep(ctx: Context, config, on_event, should_stop) -> Path | None:
    """Train `config` (a TrainConfig) on the engine and keep the adapter, and its last preview, in the library;
    None when the job was stopped."""
    from studio.training import Trainer

    result = Trainer(config, on_event, should_stop).run()
    if result.stopped:
        return None
    previews = sorted((Path(config.output_dir) / "previews").glob("*.png"))
    return ctx.workspace.keep(result.adapter_path, config.name, previews[-1] if previews else None)


def run_job(ctx: Context, settings: dict[str, Any], on_event, should_stop) -> Path | None:
    from studio.training import config_with_preset

    return train_and_keep(ctx, config_with_preset(settings["preset"], **settings["config"]), on_event, should_stop)


def build(ctx: Context) -> None:
    """The tab's layout and events (made inside the app's gr.Blocks)."""
    import gradio as gr

    from studio.adapters import method_names
    from studio.training import PRESETS, TrainConfig

    methods = method_names(KIND)
    methods.sort(key=lambda name: name != TrainConfig.method)  # the engine's default method first
    with gr.Row():
        with gr.Column():
            page = _inputs(methods, list(PRESETS))
            with gr.Accordion("Method settings", open=False):
                forms = method_forms(KIND, methods[0])
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column():
            status = gr.Markdown("no training yet", elem_id="train-status")
            progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False, elem_id="train-progress")
            previews = gr.Gallery(label="Previews", columns=4, height="auto", elem_id="train-previews")
    forms.follow(page["method"])
    page["files"].change(upload_captions, page["files"], page["captions"], show_progress="hidden")

    @as_message
    def start_training(values: dict[str, Any]) -> str:
        job = job_settings(ctx, forms, values)
        name, resume = job["config"]["name"], job["config"]["resume"]
        if not resume and (ctx.workspace.runs / name).exists():
            shutil.rmtree(ctx.workspace.runs / name)
        return f"queued **{name}** (job {ctx.jobs.submit(name, job).id})"

    inputs = {**page, **forms.components()}
    start.click(bind(start_training, inputs), inputs_kwargs=inputs, outputs=status, api_name="train")
    stop.click(ctx.stop_training, None, status, api_name="stop")
    ctx.timer.tick(ctx.job_status, None, [status, progress, previews], api_name="job_status", show_progress="hidden")


def _inputs(methods: list[str], presets: list[str]) -> dict[str, Any]:
    """The settings every concept training has (the engine's), by name."""
    import gradio as gr

    page = {"files": gr.File(label=f"Pictures of the concept ({MIN_UPLOADS}–{MAX_UPLOADS}; same-name .txt captions "
                                   "optional)", file_count="multiple", type="filepath", elem_id="train-files"),
            "captions": gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                                     interactive=True, label="Captions (edit; empty: the instance prompt or trigger "
                                                             "word is used)", elem_id="train-captions"),
            "folder": gr.Textbox(label="…or a folder inside the workspace", placeholder="uploads/stars"),
            "name": gr.Textbox(label="Name", value="my_concept")}
    with gr.Row():
        page["trigger"] = gr.Textbox(label="Trigger word", value="sks")
        page["instance_prompt"] = gr.Textbox(label="Instance prompt (for pictures without a caption)",
                                             placeholder="a sks")
    with gr.Row():
        page["method"] = gr.Dropdown(methods, value=methods[0], label="Method")
        page["preset"] = gr.Dropdown(presets, value=presets[0], label="Preset")
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            page["steps"] = gr.Number(value=0, precision=0, label="Steps (0: preset)")
            page["lr"] = gr.Number(value=0, label="Learning rate (0: preset)")
            page["batch_size"] = gr.Number(value=0, precision=0, label="Batch size (0: preset)")
        with gr.Row():
            page["preview_every"] = gr.Number(value=0, precision=0, label="Preview every N steps (0: preset)")
            page["seed"] = gr.Number(value=0, precision=0, label="Seed")
        page["trigger_token"] = gr.Checkbox(label="Train the trigger word as a new token (pivotal tuning: better "
                                            "editability, other prompts untouched)", value=False)
        page["resume"] = gr.Checkbox(label="Resume this name's last checkpoint", value=False)
    return page
