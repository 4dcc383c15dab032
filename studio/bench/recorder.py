"""Recorded benchmark results: every table goes to the history (docs/benchmarks-log.md) under the command, date and
machine that made it; every figure a goal reads from it (studio.bench.goals) goes to benchmarks/results.jsonl as
one JSON line; BENCHMARKS.md's status table is rendered from those lines (the newest per benchmark and metric).

    python -m studio.bench.recorder status [--check]    rewrite (or check) BENCHMARKS.md's status table
    python -m studio.bench.recorder seed                 rebuild results.jsonl from the history's tables
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from studio.bench.goals import GOALS, Table, readings
from studio.utils.files import atomic_path

RESULT_ENV = ("STUDIO_KERNELS", "STUDIO_ATTENTION")  # settings that change what a benchmark measures
BENCHMARKS_FILE = Path(os.environ.get("STUDIO_BENCHMARKS", Path.cwd() / "BENCHMARKS.md"))
STATUS_BEGIN = ("<!-- status table: rendered from benchmarks/results.jsonl by "
                "`python -m studio.bench.recorder status` -->")
STATUS_END = "<!-- end of status table -->"
STATUS_HEADER = ["benchmark", "metric", "goal", "current figure", "met?", "command", "date"]
LOG_INTRO = ("# Benchmarks: the history\n\nEvery table a benchmark command recorded, in order, under the command, the "
             "date and the machine that made it. The current figures are in [BENCHMARKS.md](../BENCHMARKS.md).\n")


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure a benchmark states itself (beside those the goals read off its table)."""
    benchmark: str
    metric: str
    figure: str
    goal: str = "—"
    met: bool | None = None
    model: str = "shapes"


@dataclasses.dataclass(frozen=True)
class Result:
    """One line of results.jsonl."""
    benchmark: str
    metric: str
    figure: str
    goal: str
    met: bool | None
    command: str
    date: str          # "YYYY-MM-DD HH:MM"
    machine: str
    model: str
    title: str = ""    # the recorded table it was read from ("" for a figure stated by hand)

    @classmethod
    def of(cls, figure: Figure, *, command: str, date: str, machine: str, title: str = "") -> Result:
        return cls(figure.benchmark, figure.metric, figure.figure, figure.goal, figure.met, command, date, machine,
                   figure.model, title)


def paths(benchmarks: Path | None = None) -> tuple[Path, Path, Path]:
    """(BENCHMARKS.md, docs/benchmarks-log.md, benchmarks/results.jsonl) of the checkout holding `benchmarks`."""
    main = Path(benchmarks or BENCHMARKS_FILE)
    return main, main.parent / "docs" / "benchmarks-log.md", main.parent / "benchmarks" / "results.jsonl"


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    env = "".join(f"{k}={shlex.quote(os.environ[k])} " for k in RESULT_ENV if os.environ.get(k))
    return env + "studio " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def results_of(table: Table, *, command: str, date: str, machine: str) -> list[Result]:
    """The figures the goals read off one recorded table."""
    return [Result(goal.benchmark, goal.metric, figure, goal.target, met, command, date, machine, goal.model,
                   table[0]) for goal, (figure, met) in readings(table)]


def record(title: str, header: list[str], rows: list[list[str]], *, write: bool = True,
           figures: list[Figure] | None = None, benchmarks: Path | None = None) -> str:
    """Format a table; with write, append it to the history under the command that made it, add the figures the
    goals read off it (and `figures`) to results.jsonl, and re-render BENCHMARKS.md's status table."""
    table = markdown_table(header, rows)
    if write:
        main, log, results = paths(benchmarks)
        cmd, stamp, mach = command_line(), datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), machine()
        log.parent.mkdir(parents=True, exist_ok=True)
        if not log.exists():
            log.write_text(LOG_INTRO, encoding="utf-8")
        with log.open("a", encoding="utf-8") as f:
            f.write(f"\n### {title}\n\n`{cmd}` — {stamp}, {mach}\n\n{table}\n")
        new = results_of((title, header, rows), command=cmd, date=stamp, machine=mach)
        new += [Result.of(f, command=cmd, date=stamp, machine=mach, title=title) for f in figures or ()]
        append_results(results, new)
        write_status(main, load_results(results))
    return table


def append_results(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")


def load_results(path: Path) -> list[Result]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Result(**json.loads(line)) for line in lines if line.strip()]


def current(results: list[Result]) -> dict[tuple[str, str], Result]:
    """The newest result per (benchmark, metric); of two with the same date, the later line."""
    newest: dict[tuple[str, str], Result] = {}
    for r in results:
        key = (r.benchmark, r.metric)
        if key not in newest or r.date >= newest[key].date:
            newest[key] = r
    return newest


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def status_table(results: list[Result]) -> str:
    """benchmark | metric | goal | current figure | met? | command | date: the goals in their order (a goal nothing
    has measured says so), then any other recorded metric, by benchmark."""
    newest = current(results)
    order = {(g.benchmark, g.metric): i for i, g in enumerate(GOALS)}
    keys = list(order) + sorted((k for k in newest if k not in order), key=lambda k: k[0])
    keys.sort(key=lambda k: k[0])  # stable: goals keep their order within a benchmark, extras follow them
    rows = []
    for key in keys:
        r = newest.get(key)
        if r is None:
            goal = GOALS[order[key]]
            rows.append([goal.benchmark, goal.metric, goal.target, "not measured yet", "—", "—", "—"])
            continue
        met = {True: "yes", False: "no", None: "—"}[r.met]
        rows.append([r.benchmark, _cell(r.metric), _cell(r.goal), _cell(r.figure), met, f"`{_cell(r.command)}`",
                     r.date])
    return markdown_table(STATUS_HEADER, rows)


def render_status(text: str, results: list[Result]) -> str:
    """`text` (BENCHMARKS.md) with its status block replaced; the block goes after the title when there is none."""
    block = f"{STATUS_BEGIN}\n{status_table(results)}\n{STATUS_END}"
    if STATUS_BEGIN in text and STATUS_END in text:
        head, rest = text.split(STATUS_BEGIN, 1)
        return head + block + rest.split(STATUS_END, 1)[1]
    title, _, body = text.partition("\n")
    return f"{title or '# Benchmarks'}\n\n{block}\n{body}"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_status(main: Path, results: list[Result]) -> None:
    text = main.read_text(encoding="utf-8") if main.exists() else "# Benchmarks\n"
    write_text(main, render_status(text, results))


# -- the history, read back --

_HEADING = re.compile(r"^#{3,4} (.+)$")
_COMMAND = re.compile(r"^`(.+)` — (\d{4}-\d\d-\d\d \d\d:\d\d), (.+)$")


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def log_tables(text: str) -> list[tuple[Table, str, str, str]]:
    """((title, header, rows), command, date, machine) for each recorded table of the history: a heading, the
    command line the recorder writes under it, then the first table before the next heading."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        heading = _HEADING.match(lines[i])
        i += 1
        if not heading:
            continue
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        command = _COMMAND.match(lines[j]) if j < len(lines) else None
        if not command:
            continue
        j += 1
        while j < len(lines) and not lines[j].startswith("|") and not _HEADING.match(lines[j]):
            j += 1
        table = []
        while j < len(lines) and lines[j].startswith("|"):
            table.append(_split_row(lines[j]))
            j += 1
        if len(table) >= 2:
            out.append(((heading.group(1), table[0], table[2:]), *command.groups()))
        i = j
    return out


def seed(log: Path, results: Path) -> list[Result]:
    """Rebuild results.jsonl from the history's tables; figures stated by hand (no title) are kept."""
    kept = [r for r in load_results(results) if not r.title]
    found = [r for table, cmd, date, mach in log_tables(log.read_text(encoding="utf-8"))
             for r in results_of(table, command=cmd, date=date, machine=mach)]
    write_text(results, "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in found + kept))
    return found + kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.bench.recorder", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("status", "seed"))
    parser.add_argument("--check", action="store_true", help="status: exit 1 if BENCHMARKS.md's table is stale")
    parser.add_argument("--benchmarks", type=Path, default=None, help="the BENCHMARKS.md to write (default: ./)")
    args = parser.parse_args(argv)
    main_file, log, results = paths(args.benchmarks)
    if args.action == "seed":
        print(f"{results}: {len(seed(log, results))} results")
    text = main_file.read_text(encoding="utf-8") if main_file.exists() else "# Benchmarks\n"
    rendered = render_status(text, load_results(results))
    if args.check:
        if rendered != text:
            print(f"{main_file}: the status table is not what {results} renders; run "
                  "`python -m studio.bench.recorder status`", file=sys.stderr)
            return 1
        return 0
    write_text(main_file, rendered)
    print(status_table(load_results(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
