"""What the CLI and the UI share: each task builds a config and calls the engine (no argparse, no Gradio)."""
