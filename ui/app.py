"""The web UI (`studio ui`): for now a page that generates images with the embedded model or any other."""

from __future__ import annotations

import threading

from studio.generate import GenerationSettings, generate
from studio.loading import StudioError, load_pipeline


class PipelineCache:
    """One loaded pipeline per model source, loaded on first use; generation is serialised."""

    def __init__(self) -> None:
        self._pipes: dict[str, object] = {}
        self.lock = threading.Lock()

    def get(self, model: str):
        if model not in self._pipes:
            self._pipes[model] = load_pipeline(model)
        return self._pipes[model]


def build_app(model: str = "shapes"):
    import gradio as gr

    cache = PipelineCache()

    def run(model_src, prompt, negative, steps, guidance, seed, batch):
        settings = GenerationSettings(prompt, negative, int(steps), float(guidance), int(seed), int(batch))
        try:
            settings.validate()
            with cache.lock:
                images = generate(cache.get(model_src.strip() or "shapes"), settings)
        except StudioError as e:
            raise gr.Error(str(e))
        return images, f"{len(images)} image(s), seed {settings.seed}..{settings.seed + settings.batch - 1}"

    with gr.Blocks(title="Studio") as app:
        gr.Markdown("# Studio\nGenerate with the embedded *shapes* model (or any diffusers model you have).")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    model_box = gr.Textbox(value=model, label="Model")
                    prompt = gr.Textbox(value="a large blue square on a yellow background", label="Prompt")
                    negative = gr.Textbox(value="", label="Negative prompt")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        batch = gr.Slider(1, 8, value=4, step=1, label="Batch")
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=4, height="auto")
                    status = gr.Markdown()
            button.click(run, [model_box, prompt, negative, steps, guidance, seed, batch], [gallery, status],
                         api_name="generate")
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, model: str = "shapes") -> None:
    credentials = None
    if auth:
        if ":" not in auth:
            raise StudioError("--auth must be user:pass")
        credentials = tuple(auth.split(":", 1))
    build_app(model).queue().launch(server_name=host, server_port=port, auth=credentials)
