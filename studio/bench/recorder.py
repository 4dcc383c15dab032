"""BENCHMARKS.md: every figure beside the command that produced it, the date and the machine."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULT_ENV = ("STUDIO_KERNELS", "STUDIO_ATTENTION")  # settings that change what a benchmark measures
BENCHMARKS_FILE = Path(os.environ.get("STUDIO_BENCHMARKS", Path.cwd() / "BENCHMARKS.md"))


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, header: list[str], rows: list[list[str]], *, write: bool = True) -> str:
    """Format a table; with write, append it to BENCHMARKS.md under the command that made it."""
    table = markdown_table(header, rows)
    if write:
        env = "".join(f"{k}={shlex.quote(os.environ[k])} " for k in RESULT_ENV if os.environ.get(k))
        cmd = env + "studio " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        block = f"\n### {title}\n\n`{cmd}` — {stamp}, {machine()}\n\n{table}\n"
        if not BENCHMARKS_FILE.exists():
            BENCHMARKS_FILE.write_text("# Benchmarks\n\nRows are appended by the commands shown above them.\n")
        with BENCHMARKS_FILE.open("a") as f:
            f.write(block)
    return table
