"""The documents stay true to the repository: BENCHMARKS.md's status table is what the recorder renders from the
recorded results, links resolve, nothing points outside the checkout, and the quick start names real scripts."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from studio.bench import recorder

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("../" + "shared", "/" + "work/")  # split so this file does not match itself
# the pretraining run's own logs name the folder it was started from: a record of that run, kept as written
RUN_RECORDS = "studio/shapes/models/pretrain_logs/"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_status_table_is_what_the_recorder_renders():
    main, _, results = recorder.paths(ROOT / "BENCHMARKS.md")
    text = main.read_text(encoding="utf-8")
    assert recorder.STATUS_BEGIN in text and recorder.STATUS_END in text
    assert recorder.render_status(text, recorder.load_results(results)) == text
    check = subprocess.run([sys.executable, "-m", "studio.bench.recorder", "status", "--check", "--benchmarks",
                            str(main)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_studio_bench_status_prints_the_table_and_checks_it(capsys):
    from studio.cli import main

    assert main(["bench", "status", "--check", "--benchmarks", str(ROOT / "BENCHMARKS.md")]) == 0
    assert main(["bench", "status", "--benchmarks", str(ROOT / "BENCHMARKS.md")]) == 0
    assert "| B1 | shape accuracy |" in capsys.readouterr().out


def test_every_benchmark_has_a_status_row():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    table = text.split(recorder.STATUS_BEGIN, 1)[1].split(recorder.STATUS_END, 1)[0]
    benchmarks = {line.split("|")[1].strip() for line in table.strip().splitlines()[2:]}
    assert benchmarks == {f"B{i}" for i in range(1, 8)} | {"UI"}


def test_record_appends_history_results_and_status(tmp_path, monkeypatch):
    main = tmp_path / "BENCHMARKS.md"
    main.write_text("# Benchmarks\n\nProse kept.\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["studio", "eval", "--n", "256"])
    header = ["model", "prompts", "steps", "guidance", "shape", "colour", "background", "size", "position", "all",
              "FD", "FD floor", "img/s"]
    row = ["shapes", "256", "25", "5", "99.2%", "96.0%", "93.4%", "98.4%", "91.0%", "78.5%", "75.46", "12.47", "2.18"]
    extra = recorder.Figure("B1", "a stated figure", "42", "≥ 40", True)
    table = recorder.record("B1 base quality", header, [row], figures=[extra], benchmarks=main)
    assert table.splitlines()[2] == "| " + " | ".join(row) + " |"
    _, log, results = recorder.paths(main)
    assert "### B1 base quality\n\n`studio eval --n 256` — " in log.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    by_metric = {line["metric"]: line for line in lines}
    assert by_metric["colour accuracy"]["figure"] == "96.0%" and by_metric["colour accuracy"]["met"] is True
    assert by_metric["background accuracy"]["met"] is False and by_metric["a stated figure"]["figure"] == "42"
    assert all(line["command"] == "studio eval --n 256" for line in lines)
    status = main.read_text(encoding="utf-8")
    assert "Prose kept." in status
    assert "| B1 | colour accuracy | ≥ 95% | 96.0% | yes | `studio eval --n 256` |" in status
    assert "| B3 | circle residual (SPM, transport) | ≤ 10% | not measured yet | — | — | — |" in status


def test_newest_result_is_the_current_one():
    old = recorder.Result("B3", "m", "14.1%", "≤ 10%", False, "a", "2026-11-23 02:24", "cpu", "shapes")
    new = dataclasses.replace(old, figure="3.1%", met=True, date="2026-11-23 11:50")
    assert recorder.current([new, old])[("B3", "m")].figure == "3.1%"
    assert recorder.current([old, new])[("B3", "m")].figure == "3.1%"


def test_relative_links_resolve():
    broken = []
    for doc in _documents():
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken


def test_no_tracked_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".safetensors", ".png", ".bin", ".pt"):
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        needles = OUTSIDE[:1] if name.startswith(RUN_RECORDS) else OUTSIDE
        found += [f"{name}: {needle}" for needle in needles if needle in text]
    assert not found, found


def test_quick_start_names_scripts_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    scripts = re.findall(r"^bash (scripts/\S+)", quick, flags=re.M)
    assert scripts == ["scripts/ui.sh", "scripts/test.sh"]
    assert all((ROOT / s).is_file() for s in scripts)
