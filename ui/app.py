"""The web UI (`studio ui`): train a concept from uploaded pictures, generate with it, and manage the
library of trained adapters. Trainings run one at a time on a server-side queue, so closing or reloading
the page does not stop them; the page polls the queue and reconnects to the running job."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

from studio.data import DataError, load_examples, read_caption
from studio.utils.files import atomic_path
from studio.generate import GenerationSettings, generate, output_paths, save_images
from studio.loading import StudioError, load_pipeline
from studio.ui.jobs import JobQueue, library_entries

DEFAULT_WORKSPACE = Path(os.environ.get("STUDIO_WORKSPACE", "studio-workspace"))
MAX_UPLOADS = 50
MIN_UPLOADS = 3


class PipelineCache:
    """One loaded pipeline per model source, loaded on first use; generation is serialised."""

    def __init__(self) -> None:
        self._pipes: dict[str, object] = {}
        self._adapters: dict[tuple[str, str, float], str] = {}  # (pipeline, file, mtime) -> adapter name
        self.lock = threading.Lock()

    def get(self, model: str, adapters: dict[str, float] | None = None, one_step: str | None = None,
            control: list[dict] | None = None):
        """The pipeline for `model` with these adapters active; with `one_step` (a HiPA file), a separate
        pipeline with that adaptor and the one-step scheduler; with `control` ([{"adapter": control adapter file,
        "image", "scale", "start", "end"}]), a separate pipeline with those control adapters and exactly these
        control inputs set (a ControlNeXt file may tune UNet layers, so control never shares the plain pipeline)."""
        from studio.adapters import load_adapters, set_adapter_weights

        if control is not None:
            pipe_key = f"{model}|control"
        elif one_step:
            pipe_key = f"{model}|{Path(one_step).resolve()}|{Path(one_step).stat().st_mtime}"
        else:
            pipe_key = model
        if pipe_key not in self._pipes:
            self._pipes[pipe_key] = load_pipeline(model, one_step=one_step)
        pipe = self._pipes[pipe_key]
        weights = {}
        for path, weight in (adapters or {}).items():
            key = (pipe_key, str(Path(path).resolve()), Path(path).stat().st_mtime)
            if key not in self._adapters:
                self._adapters[key] = load_adapters(pipe, {path: 0.0})[0]
            weights[self._adapters[key]] = weight
        if one_step:  # the one-step adaptor stays on beside whatever concept adapters are chosen
            weights.update({n: 1.0 for n, info in pipe._studio_adapters.items() if info["method"] == "hipa"})
        inputs = []
        for item in control or []:
            name = self._control_adapter(pipe_key, pipe, item["adapter"])
            inputs.append({**item, "adapter": name})
            weights[name] = float(item.get("scale", 1.0))
        if self._adapters or adapters:
            set_adapter_weights(pipe, weights)
        if control is not None:
            from studio.adapters.control import set_control

            set_control(pipe, inputs)
        if any(info["method"] == "spm" for info in getattr(pipe, "_studio_adapters", {}).values()):
            from studio.pipelines.membranes import use_membranes

            use_membranes(pipe)  # membranes act per prompt (Facilitated Transport)
        return pipe

    def _control_adapter(self, pipe_key: str, pipe, path: str) -> str:
        """The name of control adapter file `path` in the pipeline, loaded on first use; an older version of the
        same file (retrained under its name) is taken out first, UNet deltas and all."""
        from studio.adapters import attached_adapters, get_method, load_adapters, read_adapter
        from studio.pipelines.control import CONTROL_METHODS

        resolved = str(Path(path).resolve())
        key = (pipe_key, resolved, Path(path).stat().st_mtime)
        if key not in self._adapters:
            method = read_adapter(path).method
            if method not in CONTROL_METHODS:
                raise StudioError(f"{Path(path).stem} is a {method} adapter, not a control adapter "
                                  f"({', '.join(CONTROL_METHODS)})")
            for old in [k for k in self._adapters if k[:2] == key[:2]]:
                name = self._adapters.pop(old)
                info = attached_adapters(pipe).pop(name, None)
                if info:
                    get_method(info["method"]).remove(pipe, name)
            self._adapters[key] = load_adapters(pipe, {path: 0.0})[0]
        return self._adapters[key]


class Workspace:
    """Where the UI keeps uploads, runs and the adapter library; folder paths typed into the page must lie
    inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.library = self.root / "adapters"
        self.runs = self.root / "runs"
        self.uploads = self.root / "uploads"
        self.outputs = self.root / "outputs"
        for folder in (self.library, self.runs, self.uploads, self.outputs):
            folder.mkdir(parents=True, exist_ok=True)

    def inside(self, folder: str) -> Path:
        path = (self.root / folder).resolve()  # an absolute `folder` replaces the root in the join
        if path != self.root and self.root not in path.parents:
            raise StudioError(f"{folder}: folders must be inside the workspace {self.root}")
        if not path.is_dir():
            raise StudioError(f"{folder}: no such folder in the workspace")
        return path

    def adapter(self, name: str) -> Path:
        path = self.library / f"{name}.safetensors"
        if not name or not path.is_file():
            raise StudioError(f"no adapter named {name!r} in the library")
        return path


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_")
    if not name:
        raise StudioError("give the concept a name (letters, digits, - and _)")
    return name


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


# The Control tab's preprocessings: (label, value); any other value typed in is checked by studio.shapes.conditions
CONTROL_PREPROCESS = [("none (the image is the condition)", "none"), ("canny (edges of the image)", "canny"),
                      ("lineart (line drawing of the image)", "lineart"),
                      ("mask: render the prompt's shape (shapes world)", "mask"),
                      ("edges: render the prompt's shape's outline (shapes world)", "edges"),
                      ("box: render the prompt's shape's bounding box (shapes world)", "box"),
                      ("scribble: render strokes over the prompt's shape (shapes world)", "scribble")]


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
    """The condition image (HxWx3 uint8) the Control tab hands the adapter: the image itself, a weight-free
    annotator's output on it, or the shapes world's mask / edges / box / scribble of the shape the prompt
    describes."""
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


def build_app(model: str = "shapes", workspace: str | Path | None = None):
    import gradio as gr
    from PIL import Image

    from studio.adapters import get_method, method_names
    from studio.training.engine import PRESETS, Trainer, config_with_preset

    ws = Workspace(Path(workspace) if workspace else DEFAULT_WORKSPACE)
    cache = PipelineCache()
    concept_methods = [m for m in method_names() if not get_method(m).trained_by and not get_method(m).conditioned]  # membranes etc. have tabs

    def run_training(settings: dict, on_event, should_stop):
        if settings.get("kind") == "erase":
            return run_erase(settings, on_event, should_stop)
        if settings.get("kind") == "distill":
            return run_distill_job(settings, on_event, should_stop)
        name = settings["name"]
        if settings.get("kind") == "control":  # `studio control-train`'s own config: it renders the data
            from studio.cli import control_train_config

            on_event({"kind": "phase", "message": f"rendering {settings['examples']} {settings['condition']} "
                                                  "training pairs"})
            config = control_train_config(control_train_args(settings))
        else:
            config = config_with_preset(settings.pop("preset"), **settings)
        result = Trainer(config, on_event, should_stop).run()
        if result.stopped:
            return None
        target = ws.library / f"{name}.safetensors"
        with atomic_path(target) as tmp:
            shutil.copyfile(result.adapter_path, tmp)
        previews = sorted((Path(config.output_dir) / "previews").glob("*.png"))
        if previews:
            shutil.copyfile(previews[-1], target.with_suffix(".png"))
        return target

    def control_train_args(settings: dict):
        """The `studio control-train` arguments of a Control-tab training (flags not given stay unset)."""
        import argparse

        values = {k: settings[k] for k in ("name", "method", "condition", "examples", "seed", "preset")}
        if settings.get("steps"):
            values["steps"] = settings["steps"]
        if settings.get("start_from"):  # a library adapter of the same method: stage 2, or few-shot
            values["adapter"] = [f"init_from={settings['start_from']}"]
        return argparse.Namespace(**values, model=model, output_dir=str(ws.runs / settings["name"]),
                                  config_file=None, progress_bar=False, two_shapes=settings.get("two_shapes", 0.0),
                                  overlay_scenes=settings.get("overlay_scenes", False))

    def run_erase(settings: dict, on_event, should_stop):
        from studio.tasks.erase import default_prompts
        from studio.adapters.spm.erase import erase_config, train_membrane

        config, run = erase_config(settings["concepts"], "shapes", settings=settings["settings"])
        pipe = load_pipeline(model)
        config.prompts = default_prompts(pipe, config.concepts, seed=run.seed)
        started = time.time()

        def on_step(step: int, loss: float) -> None:
            eta = (time.time() - started) / step * (run.steps - step)
            on_event({"kind": "step", "step": step, "steps": run.steps, "loss": loss, "eta_seconds": eta})

        target = ws.library / f"{settings['name']}.safetensors"
        result = train_membrane(pipe, config, run, ws.runs / f"{settings['name']}.safetensors", on_step=on_step,
                                should_stop=should_stop)
        if result.steps < run.steps:
            return None
        with atomic_path(target) as tmp:
            shutil.copyfile(result.path, tmp)
        return target

    def run_distill_job(settings: dict, on_event, should_stop):
        from studio.adapters.hipa.config import DistillSettings
        from studio.tasks.distill import run_distill

        run = DistillSettings(**settings["settings"])
        name = settings["name"]
        started = []

        def on_teacher(done: int, total: int) -> None:
            on_event({"kind": "phase", "message": f"teacher images {done}/{total}"})

        def on_step(step: int, loss: float) -> None:
            started.append(time.time()) if not started else None
            eta = (time.time() - started[0]) / step * (run.steps - step)
            on_event({"kind": "step", "step": step, "steps": run.steps, "loss": loss, "eta_seconds": eta})

        result = run_distill(load_pipeline(model), run, ws.runs / f"{name}.safetensors", rank=settings["rank"],
                             cache=ws.runs / f"{name}.teacher.safetensors", log=lambda m: None,
                             on_teacher=on_teacher, on_step=on_step, should_stop=should_stop)
        if result.steps < run.steps:
            return None
        target = ws.library / f"{name}.safetensors"
        with atomic_path(target) as tmp:
            shutil.copyfile(result.path, tmp)
        return target

    jobs = JobQueue(run_training)

    # ---- handlers (every StudioError becomes a message in the page, never a traceback) ----

    def start_training(files, folder, name, trigger, instance_prompt, method, preset, steps, lr, rank, batch,
                       preview_every, seed, resume, captions=None, sara_budget="", soda_rotate="", oft_block=0,
                       trigger_token=False):
        try:
            name = safe_name(name)
            if files:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                rows = captions.get("data") if isinstance(captions, dict) else captions
                data = stage_uploads([f if isinstance(f, str) else f.name for f in files],
                                     ws.uploads / f"{name}-{stamp}", rows)
            elif folder and folder.strip():
                data = ws.inside(folder.strip())
            else:
                raise StudioError("upload pictures of the concept, or name a folder in the workspace")
            trigger = (trigger or "").strip() or None
            instance_prompt = (instance_prompt or "").strip() or None
            if not trigger and not instance_prompt:
                raise StudioError("give a trigger word (e.g. sks) or an instance prompt")
            settings = {"preset": preset, "method": method, "model": model, "name": name, "data": str(data),
                        "trigger": trigger, "instance_prompt": instance_prompt,
                        "output_dir": str(ws.runs / name), "progress_bar": False, "seed": int(seed),
                        "resume": "latest" if resume else None,
                        "preview_prompts": [instance_prompt or f"a {trigger}"]}
            if trigger_token:
                settings["trigger_token"] = True
            if steps:
                settings["steps"] = int(steps)
            if lr:
                settings["lr"] = float(lr)
            adapter = {}
            if rank:
                if method not in ("lora", "hra"):
                    raise StudioError(f"rank is a LoRA or HRA setting; {method} does not take it")
                adapter["rank"] = int(rank)
            if (sara_budget or "").strip():
                if method != "sara":
                    raise StudioError("the budget is a SaRA setting; pick the sara method or clear it")
                adapter["budget"] = sara_budget.strip()
            if soda_rotate:
                if method != "soda":
                    raise StudioError("the rotated bases are a SODA setting; pick the soda method or clear it")
                adapter["rotate"] = soda_rotate
            if oft_block:
                if method != "oft":
                    raise StudioError("the block size is an OFT setting; pick the oft method or set it to 0")
                adapter["block_size"] = int(oft_block)
            if adapter:
                settings["adapter"] = adapter
            if batch:
                settings["batch_size"] = int(batch)
            if preview_every:
                settings["preview_every"] = int(preview_every)
            config_with_preset(preset, **{k: v for k, v in settings.items() if k != "preset"}).validate()
            if not resume and (ws.runs / name).exists():
                shutil.rmtree(ws.runs / name)
            job = jobs.submit(name, settings)
            return f"queued **{name}** (job {job.id})"
        except (StudioError, ValueError) as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"

    def start_erase(concepts, name, steps, lr, seed):
        try:
            words = [c.strip() for c in (concepts or "").split(",") if c.strip()]
            if not words:
                raise StudioError("name what to erase, e.g. circle (several: circle, red)")
            name = safe_name(name or "erase_" + "_".join(words))
            settings = {"seed": int(seed)}
            if steps:
                settings["steps"] = int(steps)
            if lr:
                settings["lr"] = float(lr)
            from studio.adapters.spm.erase import erase_config

            erase_config(words, "shapes", settings=settings)  # refuse bad settings now, not in the queue
            job = jobs.submit(name, {"kind": "erase", "name": name, "concepts": words, "settings": settings})
            return f"queued membrane **{name}** erasing {', '.join(words)} (job {job.id})"
        except (StudioError, ValueError) as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"

    def start_distill(name, steps, pairs, rank, high_frequency, seed, adversarial=0.0):
        from studio.adapters.hipa.config import DistillSettings

        try:
            name = safe_name(name or "one_step")
            settings = {"seed": int(seed)}
            if steps:
                settings["steps"] = int(steps)
            if pairs:
                settings["pairs"] = int(pairs)
            if not high_frequency:
                settings.update(fourier_weight=0.0, edge_weight=0.0)
            if adversarial:
                settings["adversarial_weight"] = float(adversarial)
            if int(rank or 0) < 1:
                raise StudioError("the adaptor's rank must be at least 1")
            DistillSettings(**settings).validate()  # refuse bad settings now, not in the queue
            job = jobs.submit(name, {"kind": "distill", "name": name, "settings": settings, "rank": int(rank)})
            return f"queued one-step adaptor **{name}** (job {job.id})"
        except (StudioError, ValueError) as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"

    def start_control_train(name, method, condition, preset, steps, examples, seed, two_shapes=0.0,
                            overlay_scenes=False, start_from=None):
        from studio.cli import control_train_config

        try:
            condition = (condition or "").strip()
            name = safe_name(name or f"{method}_{condition}")
            settings = {"kind": "control", "name": name, "method": method, "condition": condition,
                        "preset": preset or None, "examples": int(examples or 0), "seed": int(seed or 0),
                        "two_shapes": float(two_shapes or 0.0), "overlay_scenes": bool(overlay_scenes)}
            if steps:
                settings["steps"] = int(steps)
            if start_from:
                start = ws.library / f"{start_from}.safetensors"
                if not start.is_file():
                    raise StudioError(f"no adapter named {start_from!r} in the library to start from")
                settings["start_from"] = str(start)
            control_train_config(control_train_args(settings), render=False).validate()  # refuse bad settings now
            if (ws.runs / name).exists():
                shutil.rmtree(ws.runs / name)
            job = jobs.submit(name, settings)
            return f"queued control adapter **{name}** ({method} on {condition} conditions, job {job.id})"
        except (StudioError, ValueError) as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"

    def control_choices():
        from studio.pipelines.control import CONTROL_METHODS

        names = [e["name"] for e in library_entries(ws.library) if e["method"] in CONTROL_METHODS]
        # the first and the second condition's, and the adapters a training can start from
        return gr.update(choices=names), gr.update(choices=names), gr.update(choices=[""] + names)

    def preview_condition(image, preprocess, prompt, seed):
        try:
            condition = control_condition(image, preprocess, prompt, seed)
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc))
        h, w = condition.shape[:2]
        empty = " (empty: all black)" if not condition.any() else ""
        return condition, f"condition {w}x{h}{empty}"

    def run_control(model_src, adapter, image, preprocess, scale, start, end, prompt, negative, steps, guidance,
                    seed, batch, adapter2=None, image2=None, preprocess2="none", scale2=1.0):
        """Generate under the first condition (and the second's, summed, when a second adapter is picked)."""
        settings = GenerationSettings(prompt, negative, int(steps), float(guidance), int(seed), int(batch))
        rows = [(adapter, image, preprocess, scale)] + ([(adapter2, image2, preprocess2, scale2)] if adapter2 else [])
        try:
            settings.validate()
            if not adapter:
                raise StudioError("pick a control adapter from the library (or train one below)")
            source = (model_src or "").strip() or "shapes"
            stem = ws.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
            control, used = [], []
            for i, (name, picture, kind, weight) in enumerate(rows):
                condition = control_condition(picture, kind, prompt, seed)
                control.append({"adapter": str(ws.adapter(name)), "image": condition, "scale": float(weight),
                                "start": float(start), "end": float(end)})
                path = stem.with_name(stem.name + ("-condition.png" if i == 0 else f"-condition-{i + 1}.png"))
                used.append({"adapter": name, "image": path.name, "preprocess": kind, "scale": float(weight),
                             "start": float(start), "end": float(end), "_array": condition, "_path": path})
            with cache.lock:
                images = generate(cache.get(source, control=control), settings)
            paths = output_paths(stem.with_suffix(".png"), len(images))
            for item in used:  # each condition is kept beside the images, which name it in their settings
                with atomic_path(item.pop("_path")) as tmp:
                    Image.fromarray(item.pop("_array")).save(tmp, format="PNG")
            save_images(images, paths, settings, source, {"control": used})
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc))
        how = " + ".join(f"{u['adapter']} at {u['scale']:g}" for u in used)
        return [str(p) for p in paths], str(ws.outputs / used[0]["image"]), (
            f"{len(images)} image(s), seed {settings.seed}..{settings.seed + settings.batch - 1}, "
            f"controlled by {how} (steps {float(start):g}–{float(end):g})")

    def one_step_choices():
        return gr.update(choices=[e["name"] for e in library_entries(ws.library) if e["method"] == "hipa"])

    def compare_erase(model_src, membranes, prompts_text, steps, guidance, seed):
        """The test prompts without and with the chosen membranes (same seeds), and each prompt's strength."""
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
        try:
            if not membranes:
                raise StudioError("pick one or more membranes from the library")
            if not prompts:
                raise StudioError("write one or more test prompts, one per line")
            source = (model_src or "").strip() or "shapes"
            paths = {str(ws.adapter(n)): 1.0 for n in membranes}
            images, strengths = [], []
            with cache.lock:
                for chosen in ({}, paths):
                    pipe = cache.get(source, chosen)
                    for i, prompt in enumerate(prompts):
                        settings = GenerationSettings(prompt, "", int(steps), float(guidance), int(seed) + i, 1)
                        images.append((generate(pipe, settings)[0], ("after: " if chosen else "before: ") + prompt))
                        if chosen:
                            strengths.append(f"- {prompt}: " + ", ".join(
                                f"{n} {g[0]:.2f}" for n, g in (pipe.studio_last_permeability or {}).items()))
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc))
        return images, "Membrane strength per prompt:\n" + "\n".join(strengths)

    def membrane_choices():
        names = [e["name"] for e in library_entries(ws.library) if e["method"] == "spm"]
        return gr.update(choices=names)

    def stop_training():
        job = jobs.stop()
        return "stopping…" if job else "no training is running"

    def job_status():
        job = jobs.latest()
        if job is None:
            return "no training yet", 0.0, []
        fraction = job.step / job.steps if job.steps else 0.0
        return job.summary(), round(100 * fraction, 1), list(job.previews[:8])

    def library_table():
        from studio.pipelines.control import CONTROL_METHODS

        rows = [[e["name"], e["method"], e["base"], e["trigger"], e["steps"], e["date"]]
                for e in library_entries(ws.library)]
        names = [r[0] for r in rows]
        plain = [r[0] for r in rows if r[1] not in CONTROL_METHODS]  # control adapters need an image: Control tab
        return rows, gr.update(choices=names), gr.update(choices=plain)

    def run_generate(model_src, prompt, negative, steps, guidance, seed, batch, adapters=None, weight=1.0,
                     one_step=None):
        if one_step:  # a one-step adaptor runs one UNet call without guidance, whatever the sliders say
            steps, guidance = 1, 0.0
        settings = GenerationSettings(prompt, negative, int(steps), float(guidance), int(seed), int(batch))
        try:
            settings.validate()
            chosen = {str(ws.adapter(n)): float(weight) for n in (adapters or [])}
            source = (model_src or "").strip() or "shapes"
            fast = str(ws.adapter(one_step)) if one_step else None
            with cache.lock:
                images = generate(cache.get(source, chosen, one_step=fast), settings)
            # saved with their settings in the PNG, so a downloaded image says how it was made
            paths = output_paths(ws.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.png",
                                 len(images))
            extra = {"adapters": {n: float(weight) for n in adapters or []}}
            if one_step:
                extra["one_step"] = one_step
            save_images(images, paths, settings, source, extra)
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc))
        used = f" with {', '.join(adapters)} at {weight:g}" if adapters else ""
        used += f", one step with {one_step}" if one_step else ""
        return [str(p) for p in paths], (f"{len(images)} image(s), seed {settings.seed}.."
                                         f"{settings.seed + settings.batch - 1}{used}")

    def show_adapter(name):
        if not name:
            return None, ""
        entry = next((e for e in library_entries(ws.library) if e["name"] == name), None)
        if entry is None:
            return None, "not found"
        details = {k: entry[k] for k in ("method", "base", "trigger", "steps", "date", "config")}
        return entry["preview"], "```json\n" + json.dumps(details, indent=2) + "\n```"

    def export(name, fmt):
        from studio.adapters.io import export_adapter

        try:
            files = export_adapter(ws.adapter(name), fmt, ws.root / "exports" / f"{name}.{fmt}.safetensors")
        except (StudioError, ValueError) as exc:
            raise gr.Error(str(exc))
        token = f", with its trigger token as the embedding {files[1].name}" if len(files) > 1 else ""
        return [str(f) for f in files], f"exported {name} in {fmt} keys{token}"

    def rename(name, new_name):
        try:
            src, new = ws.adapter(name), safe_name(new_name)
            dst = ws.library / f"{new}.safetensors"
            if dst.exists():
                raise StudioError(f"an adapter named {new} already exists")
            src.replace(dst)
            if src.with_suffix(".png").is_file():
                src.with_suffix(".png").replace(dst.with_suffix(".png"))
        except StudioError as exc:
            raise gr.Error(str(exc))
        return (*library_table(), f"renamed {name} to {new}")

    def delete(name, confirmed):
        try:
            path = ws.adapter(name)
            if not confirmed:
                raise StudioError("tick 'really delete' first")
            path.unlink()
            path.with_suffix(".png").unlink(missing_ok=True)
        except StudioError as exc:
            raise gr.Error(str(exc))
        return (*library_table(), f"deleted {name}")

    # ---- layout ----

    with gr.Blocks(title="Studio") as app:
        gr.Markdown("# Studio\nTeach the embedded *shapes* model (or any diffusers model) a concept, generate "
                    "with it, and keep what you trained.")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label=f"Pictures of the concept ({MIN_UPLOADS}–{MAX_UPLOADS}; same-name .txt "
                                          "captions optional)", file_count="multiple", type="filepath",
                                    elem_id="train-files")
                    captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                                            interactive=True, label="Captions (edit; empty: the instance prompt or "
                                                                    "trigger word is used)", elem_id="train-captions")
                    folder = gr.Textbox(label="…or a folder inside the workspace", placeholder="uploads/stars")
                    name = gr.Textbox(label="Name", value="my_concept")
                    with gr.Row():
                        trigger = gr.Textbox(label="Trigger word", value="sks")
                        instance_prompt = gr.Textbox(label="Instance prompt (for pictures without a caption)",
                                                     placeholder="a sks")
                    with gr.Row():
                        method = gr.Dropdown(concept_methods, value="lora", label="Method")
                        preset = gr.Dropdown(list(PRESETS), value="quick", label="Preset")
                    with gr.Accordion("Advanced settings", open=False):
                        with gr.Row():
                            steps_t = gr.Number(value=0, precision=0, label="Steps (0: preset)")
                            lr = gr.Number(value=0, label="Learning rate (0: preset)")
                            rank = gr.Number(value=0, precision=0, label="Rank (0: preset)")
                        with gr.Row():
                            batch_t = gr.Number(value=0, precision=0, label="Batch size (0: preset)")
                            preview_every = gr.Number(value=0, precision=0, label="Preview every N steps (0: preset)")
                            seed_t = gr.Number(value=0, precision=0, label="Seed")
                        with gr.Row():
                            sara_budget = gr.Textbox(value="", label="SaRA budget: weights to train (150k, 20M "
                                                     "or a fraction such as 3%; empty: preset)")
                        with gr.Row():
                            soda_rotate = gr.Dropdown(["", "input", "both"], value="", label="SODA: singular "
                                                      "bases rotated (input: the paper's; empty: preset)")
                            oft_block = gr.Number(value=0, precision=0, label="OFT block size (0: preset, 32)")
                        trigger_token = gr.Checkbox(label="Train the trigger word as a new token (pivotal tuning: "
                                                    "better editability, other prompts untouched)", value=False)
                        resume = gr.Checkbox(label="Resume this name's last checkpoint", value=False)
                    with gr.Row():
                        start = gr.Button("Start training", variant="primary")
                        stop = gr.Button("Stop")
                with gr.Column():
                    train_status = gr.Markdown("no training yet", elem_id="train-status")
                    progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False,
                                         elem_id="train-progress")
                    previews = gr.Gallery(label="Previews", columns=4, height="auto", elem_id="train-previews")
            files.change(upload_captions, files, captions, show_progress="hidden")
            start.click(start_training, [files, folder, name, trigger, instance_prompt, method, preset, steps_t, lr,
                                         rank, batch_t, preview_every, seed_t, resume, captions, sara_budget,
                                         soda_rotate, oft_block, trigger_token],
                        train_status,
                        api_name="train")
            stop.click(stop_training, None, train_status, api_name="stop")
            timer = gr.Timer(1.0)
            timer.tick(job_status, None, [train_status, progress, previews], api_name="job_status",
                       show_progress="hidden")

        with gr.Tab("Generate") as generate_tab:
            with gr.Row():
                with gr.Column():
                    model_box = gr.Textbox(value=model, label="Model")
                    prompt = gr.Textbox(value="a large blue square on a yellow background", label="Prompt")
                    negative = gr.Textbox(value="", label="Negative prompt")
                    with gr.Row():
                        adapters = gr.Dropdown([], multiselect=True, label="Adapters from the library")
                        weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="Adapter weight")
                    one_step_pick = gr.Dropdown([], value=None, label="One step (a HiPA adaptor from the library; "
                                                                      "sets 1 step, guidance 0)")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        batch = gr.Slider(1, 8, value=4, step=1, label="Batch")
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png", elem_id="gallery")
                    status = gr.Markdown()
            button.click(run_generate, [model_box, prompt, negative, steps, guidance, seed, batch, adapters, weight,
                                        one_step_pick], [gallery, status], api_name="generate")

        with gr.Tab("One step"):
            gr.Markdown("Distil the model to one step (HiPA): a small adaptor learns to draw in one UNet call what "
                        "the model draws in 25 guided steps. It trains on images the model makes itself; pick it "
                        "in the Generate tab's *One step* box when it is done.")
            with gr.Row():
                with gr.Column():
                    distill_name = gr.Textbox(value="one_step", label="Name")
                    with gr.Row():
                        distill_steps = gr.Number(value=0, precision=0, label="Steps (0: default)")
                        distill_pairs = gr.Number(value=0, precision=0, label="Teacher images (0: default)")
                    with gr.Row():
                        distill_rank = gr.Number(value=4, precision=0, label="Rank")
                        distill_seed = gr.Number(value=0, precision=0, label="Seed")
                    distill_hf = gr.Checkbox(value=True, label="High-frequency loss (Fourier high-pass + edges)")
                    distill_adversarial = gr.Number(
                        value=0, label="Adversarial term weight (not HiPA's; 0 is off; 1 measured best, at 4000 steps)")
                    with gr.Row():
                        distill_start = gr.Button("Distil", variant="primary")
                        distill_stop = gr.Button("Stop")
                with gr.Column():
                    distill_status = gr.Markdown("", elem_id="distill-status")
            distill_start.click(start_distill, [distill_name, distill_steps, distill_pairs, distill_rank, distill_hf,
                                                distill_seed, distill_adversarial], distill_status, api_name="distill")
            distill_stop.click(stop_training, None, distill_status, api_name="distill_stop")

        with gr.Tab("Erase") as erase_tab:
            gr.Markdown("Train a membrane that makes the model unable to draw a concept (SPM). It acts only on "
                        "prompts that name the concept: others pass through unchanged.")
            with gr.Row():
                with gr.Column():
                    concepts = gr.Textbox(value="circle", label="Concepts to erase (comma-separated)")
                    erase_name = gr.Textbox(value="no_circle", label="Name")
                    with gr.Row():
                        erase_steps = gr.Number(value=0, precision=0, label="Steps (0: preset)")
                        erase_lr = gr.Number(value=0, label="Learning rate (0: preset)")
                        erase_seed = gr.Number(value=0, precision=0, label="Seed")
                    with gr.Row():
                        erase_start = gr.Button("Train membrane", variant="primary")
                        erase_stop = gr.Button("Stop")
                    erase_status = gr.Markdown("", elem_id="erase-status")
                    membrane_pick = gr.Dropdown([], multiselect=True, label="Membranes (from the library)")
                    test_prompts = gr.Textbox(value="a large red circle on a blue background\n"
                                                    "a large red square on a blue background",
                                              lines=4, label="Test prompts (one per line)")
                    with gr.Row():
                        erase_steps_g = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        erase_guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                    compare = gr.Button("Compare before / after")
                with gr.Column():
                    erase_gallery = gr.Gallery(label="Before / after", columns=2, height="auto", format="png",
                                               elem_id="erase-gallery")
                    erase_strengths = gr.Markdown()
            erase_start.click(start_erase, [concepts, erase_name, erase_steps, erase_lr, erase_seed], erase_status,
                              api_name="erase")
            erase_stop.click(stop_training, None, erase_status, api_name="erase_stop")
            compare.click(compare_erase, [model_box, membrane_pick, test_prompts, erase_steps_g, erase_guidance,
                                          erase_seed], [erase_gallery, erase_strengths], api_name="compare_erase")

        with gr.Tab("Control") as control_tab:
            gr.Markdown("Steer the layout with a control image: upload one or draw on the canvas (white on black, as "
                        "masks and edges are), pick how it becomes the condition, preview it, generate. A control "
                        "adapter is trained for the kinds of condition it saw (mask, edges, box, scribble, canny, lineart; "
                        "mask,edges for both): train one below.")
            with gr.Row():
                with gr.Column():
                    with gr.Row():
                        control_pick = gr.Dropdown([], value=None, label="Control adapter (from the library)",
                                                   scale=4)
                        control_refresh = gr.Button("↻", scale=0, min_width=40)
                    control_image = gr.ImageEditor(
                        value={"background": Image.new("RGB", (128, 128)), "layers": [], "composite": None},
                        type="pil", sources=["upload", "clipboard"], canvas_size=(128, 128), height=360,
                        brush=gr.Brush(default_size=6, colors=["#ffffff", "#000000"], default_color="#ffffff"),
                        label="Control image (upload, or draw)", elem_id="control-image")
                    control_preprocess = gr.Dropdown(CONTROL_PREPROCESS, value="none", allow_custom_value=True,
                                                     label="Preprocess (the image becomes the condition)")
                    control_prompt = gr.Textbox(value="a large red circle on a gray background",
                                                label="Prompt (also what mask / edges render)")
                    control_negative = gr.Textbox(value="", label="Negative prompt (control)")
                    with gr.Row():
                        control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
                        control_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (fraction of steps)")
                        control_end = gr.Slider(0, 1, value=1.0, step=0.05, label="End (fraction of steps)")
                    with gr.Accordion("Second condition (optional: its effect is added to the first's)",
                                      open=False):
                        control_pick2 = gr.Dropdown([], value=None, label="Second control adapter")
                        control_image2 = gr.ImageEditor(
                            value={"background": Image.new("RGB", (128, 128)), "layers": [], "composite": None},
                            type="pil", sources=["upload", "clipboard"], canvas_size=(128, 128), height=300,
                            brush=gr.Brush(default_size=6, colors=["#ffffff", "#000000"], default_color="#ffffff"),
                            label="Second control image")
                        with gr.Row():
                            control_preprocess2 = gr.Dropdown(CONTROL_PREPROCESS, value="none",
                                                              allow_custom_value=True, label="Second preprocess")
                            control_scale2 = gr.Slider(0, 2, value=1.0, step=0.05, label="Second conditioning scale")
                    with gr.Row():
                        control_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps")
                        control_guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance scale")
                    with gr.Row():
                        control_seed = gr.Number(value=0, precision=0, label="Seed (also of the rendered shape)")
                        control_batch = gr.Slider(1, 8, value=4, step=1, label="Images")
                    with gr.Row():
                        control_preview_btn = gr.Button("Preview condition")
                        control_go = gr.Button("Generate with control", variant="primary")
                with gr.Column():
                    control_condition_img = gr.Image(label="Condition", type="filepath", format="png", height=260,
                                                     interactive=False, elem_id="control-condition")
                    control_gallery = gr.Gallery(label="Controlled images", columns=4, height="auto", format="png",
                                                 elem_id="control-gallery")
                    control_status = gr.Markdown()
            with gr.Accordion("Train a control adapter", open=False):
                gr.Markdown("Trains on shapes-world renders and their condition images, drawn here (what "
                            "`studio control-train` does without --data); the adapter goes into the library.")
                with gr.Row():
                    ct_name = gr.Textbox(value="mask_control", label="Adapter name")
                    ct_method = gr.Dropdown(["t2i_adapter", "controlnext", "controlnet"], value="t2i_adapter",
                                            label="Control method")
                    ct_condition = gr.Dropdown(["mask", "edges", "mask,edges", "box", "scribble", "canny", "lineart"],
                                               value="mask",
                                               allow_custom_value=True, label="Condition kind")
                with gr.Row():
                    ct_preset = gr.Dropdown(list(PRESETS), value="quick", label="Training preset")
                    ct_steps = gr.Number(value=0, precision=0, label="Training steps (0: preset)")
                    ct_examples = gr.Number(value=256, precision=0, label="Rendered examples")
                    ct_seed = gr.Number(value=0, precision=0, label="Training seed")
                with gr.Row():
                    ct_two_shapes = gr.Slider(0, 1, value=0.0, step=0.05, label="Two-shape scenes (fraction)",
                                              info="each scene's two conditions are two inputs, summed as at "
                                                   "generation: multi-condition control")
                    ct_overlay = gr.Checkbox(value=False, label="Overlay a scene's conditions in one image",
                                             info="a ControlNet's first stage: it learns to read them")
                    ct_start_from = gr.Dropdown([""], value="", allow_custom_value=True,
                                                label="Start from (library adapter, same method)",
                                                info="the second stage, or few-shot adaptation to a new kind")
                with gr.Row():
                    ct_start = gr.Button("Train control adapter", variant="primary")
                    ct_stop = gr.Button("Stop")
                ct_status = gr.Markdown("", elem_id="control-train-status")
            control_refresh.click(control_choices, None, [control_pick, control_pick2, ct_start_from],
                                  show_progress="hidden", api_name="control_adapters")
            control_preview_btn.click(preview_condition, [control_image, control_preprocess, control_prompt,
                                                          control_seed], [control_condition_img, control_status],
                                      api_name="control_preview")
            control_go.click(run_control, [model_box, control_pick, control_image, control_preprocess, control_scale,
                                           control_start, control_end, control_prompt, control_negative,
                                           control_steps, control_guidance, control_seed, control_batch,
                                           control_pick2, control_image2, control_preprocess2, control_scale2],
                             [control_gallery, control_condition_img, control_status], api_name="control_generate")
            ct_start.click(start_control_train, [ct_name, ct_method, ct_condition, ct_preset, ct_steps, ct_examples,
                                                 ct_seed, ct_two_shapes, ct_overlay, ct_start_from], ct_status,
                           api_name="control_train")
            ct_stop.click(stop_training, None, ct_status, api_name="control_stop")

        with gr.Tab("Library") as library_tab:
            table = gr.Dataframe(headers=["name", "method", "base model", "trigger", "steps", "trained"],
                                 interactive=False, label="Trained adapters", elem_id="library-table")
            refresh = gr.Button("Refresh")
            with gr.Row():
                with gr.Column():
                    chosen = gr.Dropdown([], label="Adapter")
                    with gr.Row():
                        kohya = gr.Button("Export (kohya: ComfyUI / A1111)")
                        diffusers_btn = gr.Button("Export (diffusers / PEFT)")
                    download = gr.File(label="Download", file_count="multiple")
                    with gr.Row():
                        new_name = gr.Textbox(label="New name")
                        rename_btn = gr.Button("Rename")
                    with gr.Row():
                        confirm = gr.Checkbox(label="really delete", value=False)
                        delete_btn = gr.Button("Delete", variant="stop")
                    library_status = gr.Markdown()
                with gr.Column():
                    preview = gr.Image(label="Preview", type="filepath")
                    metadata = gr.Markdown()
            refresh.click(library_table, None, [table, chosen, adapters], api_name="library")
            chosen.change(show_adapter, chosen, [preview, metadata])
            kohya.click(lambda n: export(n, "kohya"), chosen, [download, library_status], api_name="export_kohya")
            diffusers_btn.click(lambda n: export(n, "diffusers"), chosen, [download, library_status],
                                api_name="export_diffusers")
            rename_btn.click(rename, [chosen, new_name], [table, chosen, adapters, library_status],
                             api_name="rename")
            delete_btn.click(delete, [chosen, confirm], [table, chosen, adapters, library_status], api_name="delete")
        app.load(library_table, None, [table, chosen, adapters])
        generate_tab.select(library_table, None, [table, chosen, adapters], show_progress="hidden")
        generate_tab.select(one_step_choices, None, one_step_pick, show_progress="hidden")
        app.load(one_step_choices, None, one_step_pick)
        refresh.click(one_step_choices, None, one_step_pick, show_progress="hidden", api_name="one_step_adaptors")
        timer.tick(lambda: job_status()[0], None, distill_status, show_progress="hidden")
        erase_tab.select(membrane_choices, None, membrane_pick, show_progress="hidden")
        timer.tick(lambda: job_status()[0], None, erase_status, show_progress="hidden")
        refresh.click(membrane_choices, None, membrane_pick, show_progress="hidden", api_name="membranes")
        library_tab.select(library_table, None, [table, chosen, adapters], show_progress="hidden")
        control_tab.select(control_choices, None, [control_pick, control_pick2, ct_start_from], show_progress="hidden")
        timer.tick(lambda: job_status()[0], None, ct_status, show_progress="hidden")
        refresh.click(control_choices, None, [control_pick, control_pick2, ct_start_from], show_progress="hidden")
    app.studio_jobs = jobs
    app.studio_workspace = ws
    return app


def serve_in_background(workspace: str | Path, model: str = "shapes"):
    """Start the app on a free loopback port without blocking (tests, benchmarks); returns (url, app)."""
    import socket

    app = build_app(model, workspace).queue(default_concurrency_limit=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(app.studio_workspace.root)])
    return f"http://127.0.0.1:{port}/", app


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, model: str = "shapes",
           workspace: str | None = None) -> None:
    credentials = None
    if auth:
        if ":" not in auth:
            raise StudioError("--auth must be user:pass")
        credentials = tuple(auth.split(":", 1))
    app = build_app(model, workspace)
    app.queue(default_concurrency_limit=2).launch(server_name=host, server_port=port, auth=credentials,
                                                 allowed_paths=[str(app.studio_workspace.root)])
