"""The web UI (`studio ui`): train a concept from uploaded pictures, generate with it, erase a concept, distil
to one step, steer with a control image, and manage the library of trained adapters. One module a tab
(studio.ui.tabs); this one assembles them. Trainings run one at a time on a server-side queue, so closing or
reloading the page does not stop them; the page polls the queue and reconnects to the running job."""

from __future__ import annotations

from pathlib import Path

from studio.loading import StudioError
from studio.ui.jobs import JobQueue
from studio.ui.tabs import control, erase, generate, library, onestep, train
from studio.ui.workspace import DEFAULT_WORKSPACE, Context, PipelineCache, Workspace

# what runs a queued job, by the kind of method it trains (the registry's kinds)
RUNNERS = {train.KIND: train.run_job, erase.KIND: erase.run_job, onestep.KIND: onestep.run_job,
           control.KIND: control.run_job}


def build_app(model: str = "shapes", workspace: str | Path | None = None):
    import gradio as gr

    ws = Workspace(Path(workspace) if workspace else DEFAULT_WORKSPACE)
    ctx = Context(model, ws, PipelineCache(), None, None)
    ctx.jobs = JobQueue(lambda settings, on_event, should_stop: RUNNERS[settings["kind"]](
        ctx, settings, on_event, should_stop))
    with gr.Blocks(title="Studio") as app:
        gr.Markdown("# Studio\nTeach the embedded *shapes* model (or any diffusers model) a concept, generate "
                    "with it, and keep what you trained.")
        ctx.timer = gr.Timer(1.0)
        with gr.Tab("Train"):
            train.build(ctx)
        with gr.Tab("Generate") as generate_tab:
            generating = generate.build(ctx)
        with gr.Tab("One step"):
            onestep.build(ctx)
        with gr.Tab("Erase") as erase_tab:
            membranes = erase.build(ctx, generating["model"])
        with gr.Tab("Control") as control_tab:
            control_pickers = control.build(ctx, generating["model"])
        with gr.Tab("Library") as library_tab:
            shelf = library.build(ctx, generating["adapters"])
        _refresh_choices(ctx, app, shelf, generating["one_step"], membranes, control_pickers,
                         {"generate": generate_tab, "erase": erase_tab, "control": control_tab,
                          "library": library_tab})
    app.studio_jobs = ctx.jobs
    app.studio_workspace = ws
    return app


def _refresh_choices(ctx: Context, app, shelf: dict, one_step, membranes, control_pickers: list, tabs: dict) -> None:
    """The library's adapters listed where they are chosen: when the page loads, when a tab that lists them
    opens, and on the Library tab's Refresh."""
    listing = (lambda: library.library_table(ctx), shelf["listed"])
    fast = (lambda: generate.one_step_choices(ctx), one_step)
    erasing = (lambda: erase.membrane_choices(ctx), membranes)
    controls = (lambda: control.control_choices(ctx), control_pickers)
    for fn, outputs in (listing, fast):
        app.load(fn, None, outputs)
    for tab, lists in ((tabs["generate"], (listing, fast)), (tabs["erase"], (erasing,)),
                       (tabs["library"], (listing,)), (tabs["control"], (controls,))):
        for fn, outputs in lists:
            tab.select(fn, None, outputs, show_progress="hidden")
    refresh = shelf["refresh"]
    for (fn, outputs), api_name in ((fast, "one_step_adaptors"), (erasing, "membranes"), (controls, None)):
        refresh.click(fn, None, outputs, show_progress="hidden", api_name=api_name)


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
