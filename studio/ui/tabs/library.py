"""The Library tab: every trained adapter with what its header says; export (kohya or diffusers keys), rename,
delete."""

from __future__ import annotations

import json
from typing import Any

from studio.loading import StudioError
from studio.ui.forms import bind
from studio.ui.jobs import library_entries
from studio.ui.workspace import Context, as_error, method_kind, safe_name


def library_table(ctx: Context):
    """The table's rows, the adapter chooser's names, and the Generate tab's adapters (every adapter but the
    control ones, which need an image: the Control tab)."""
    import gradio as gr

    rows = [[e["name"], e["method"], e["base"], e["trigger"], e["steps"], e["date"]]
            for e in library_entries(ctx.workspace.library)]
    plain = [r[0] for r in rows if method_kind(r[1]) != "control"]
    return rows, gr.update(choices=[r[0] for r in rows]), gr.update(choices=plain)


def show_adapter(ctx: Context, name: str | None):
    if not name:
        return None, ""
    entry = next((e for e in library_entries(ctx.workspace.library) if e["name"] == name), None)
    if entry is None:
        return None, "not found"
    details = {k: entry[k] for k in ("method", "base", "trigger", "steps", "date", "config")}
    return entry["preview"], "```json\n" + json.dumps(details, indent=2) + "\n```"


def export(ctx: Context, name: str, fmt: str):
    from studio.adapters.io import export_adapter

    ws = ctx.workspace
    files = export_adapter(ws.adapter(name), fmt, ws.root / "exports" / f"{name}.{fmt}.safetensors")
    token = f", with its trigger token as the embedding {files[1].name}" if len(files) > 1 else ""
    return [str(f) for f in files], f"exported {name} in {fmt} keys{token}"


def rename(ctx: Context, name: str, new_name: str):
    src, new = ctx.workspace.adapter(name), safe_name(new_name)
    dst = ctx.workspace.library / f"{new}.safetensors"
    if dst.exists():
        raise StudioError(f"an adapter named {new} already exists")
    src.replace(dst)
    if src.with_suffix(".png").is_file():
        src.with_suffix(".png").replace(dst.with_suffix(".png"))
    return (*library_table(ctx), f"renamed {name} to {new}")


def delete(ctx: Context, name: str, confirmed: bool):
    path = ctx.workspace.adapter(name)
    if not confirmed:
        raise StudioError("tick 'really delete' first")
    path.unlink()
    path.with_suffix(".png").unlink(missing_ok=True)
    return (*library_table(ctx), f"deleted {name}")


def build(ctx: Context, plain_adapters) -> dict[str, Any]:
    """The tab's layout and events; `plain_adapters` is the Generate tab's adapter chooser, which the table's
    changes refresh. Returns "table", "chosen" and "refresh" (the Refresh button, which other tabs follow)."""
    import gradio as gr

    table = gr.Dataframe(headers=["name", "method", "base model", "trigger", "steps", "trained"],
                         interactive=False, label="Trained adapters", elem_id="library-table")
    refresh = gr.Button("Refresh")
    with gr.Row():
        with gr.Column():
            chosen = gr.Dropdown([], label="Adapter")
            with gr.Row():
                kohya = gr.Button("Export (kohya: ComfyUI / A1111)")
                diffusers = gr.Button("Export (diffusers / PEFT)")
            download = gr.File(label="Download", file_count="multiple")
            with gr.Row():
                new_name = gr.Textbox(label="New name")
                rename_button = gr.Button("Rename")
            with gr.Row():
                confirm = gr.Checkbox(label="really delete", value=False)
                delete_button = gr.Button("Delete", variant="stop")
            status = gr.Markdown()
        with gr.Column():
            preview = gr.Image(label="Preview", type="filepath")
            metadata = gr.Markdown()
    listed = [table, chosen, plain_adapters]
    refresh.click(lambda: library_table(ctx), None, listed, api_name="library")
    chosen.change(lambda name: show_adapter(ctx, name), chosen, [preview, metadata])
    for button, fmt in ((kohya, "kohya"), (diffusers, "diffusers")):
        button.click(as_error(lambda name, fmt=fmt: export(ctx, name, fmt)), chosen, [download, status],
                     api_name=f"export_{fmt}")
    renaming, deleting = {"name": chosen, "new_name": new_name}, {"name": chosen, "confirmed": confirm}
    rename_button.click(bind(as_error(lambda v: rename(ctx, v["name"], v["new_name"])), renaming),
                        inputs_kwargs=renaming, outputs=[*listed, status], api_name="rename")
    delete_button.click(bind(as_error(lambda v: delete(ctx, v["name"], v["confirmed"])), deleting),
                        inputs_kwargs=deleting, outputs=[*listed, status], api_name="delete")
    return {"listed": listed, "refresh": refresh}
