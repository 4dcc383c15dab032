"""What each benchmark is held to: the goals of BENCHMARKS.md's status table, and how each figure is read
off the table a benchmark command records. A goal reads the tables whose title it matches; a reading is the
figure as text (copied from the table's cells) and whether it meets the goal (None where no threshold is set)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows
Reading = tuple[str, "bool | None"]


@dataclass(frozen=True)
class Goal:
    benchmark: str                       # "B1" … "B7"
    metric: str
    target: str                          # the goal as the status table prints it; "—" where none is set
    title: str = ""                      # regex matched at the start of a recorded table's title
    read: Callable[[Table], Reading | None] | None = None  # None: no command records it yet
    model: str = "shapes"


def number(cell: str) -> float | None:
    """The first number in a cell: '93.8%' → 93.8, '+12.9%' → 12.9, '-17.5' → -17.5, '7.3x / 45.9x' → 7.3."""
    m = re.search(r"[-+−]?\d[\d,]*(?:\.\d+)?", cell)
    return float(m.group().replace(",", "").replace("−", "-")) if m else None


def rows_where(table: Table, **match: str) -> list[dict[str, str]]:
    """The table's rows as {column: cell}, those whose cells equal (or, for a value ending in '*', start with) each
    `match` value; a keyword names its column with '_' for ' '."""
    _, header, rows = table
    out = []
    for row in rows:
        cells = dict(zip(header, (c.strip() for c in row)))
        if all(_matches(cells.get(col.replace("_", " "), ""), want) for col, want in match.items()):
            out.append(cells)
    return out


def _matches(cell: str, want: str) -> bool:
    return cell.startswith(want[:-1]) if want.endswith("*") else cell == want


def at_least(x: float) -> Callable[[float], bool]:
    return lambda v: v >= x


def at_most(x: float) -> Callable[[float], bool]:
    return lambda v: v <= x


def within(x: float) -> Callable[[float], bool]:
    return lambda v: abs(v) <= x


def cell(column: str, check: Callable[[float], bool] | None, **match: str) -> Callable[[Table], Reading | None]:
    """The figure in `column` of the first row matching `match`, checked against the goal."""
    def read(table: Table) -> Reading | None:
        rows = rows_where(table, **match)
        if not rows or column not in rows[0]:
            return None
        text = rows[0][column]
        value = number(text)
        return text, (check(value) if check and value is not None else None)
    return read


def cells(columns: dict[str, Callable[[float], bool]], **match: str) -> Callable[[Table], Reading | None]:
    """Several columns of one row as 'name figure, …', met when every one meets its goal."""
    def read(table: Table) -> Reading | None:
        rows = rows_where(table, **match)
        if not rows or any(c not in rows[0] for c in columns):
            return None
        row = rows[0]
        values = [number(row[c]) for c in columns]
        met = all(v is not None and check(v) for v, check in zip(values, columns.values()))
        return ", ".join(f"{c} {row[c]}" for c in columns), met
    return read


def _b1(column: str, check: Callable[[float], bool] | None) -> Callable[[Table], Reading | None]:
    return cell(column, check, model="shapes", steps="25", guidance="5")


def _one_step_mean(table: Table) -> Reading | None:
    """B4's accuracy: the mean of B1's five attributes for the model with a one-step adaptor (`studio eval
    --one-step FILE`); the goal is the teacher's 95.2% less 5 points."""
    rows = rows_where(table, model="shapes + one-step*", steps="1", guidance="0")
    heads = ("shape", "colour", "background", "size", "position")
    if not rows or any(h not in rows[0] for h in heads):
        return None
    mean = sum(number(rows[0][h]) for h in heads) / len(heads)
    return f"{mean:.1f}% ({rows[0]['model'].removeprefix('shapes + one-step ')})", mean >= 90.2


def _best_control(column: str, check: Callable[[float], bool]) -> Callable[[Table], Reading | None]:
    """B5's figure for the method with the highest mask IoU (the caption-only row is not a method); a run of one
    method compares nothing, so it does not stand for the best."""
    def read(table: Table) -> Reading | None:
        rows = [r for r in rows_where(table) if r.get("method") not in (None, "none (caption only)")]
        if len(rows) < 2:
            return None
        best = max(rows, key=lambda r: number(r["mask IoU"]) or 0.0)
        return f"{best[column]} ({best['method']})", check(number(best[column]))
    return read


def _best_few_shot(table: Table) -> Reading | None:
    rows = rows_where(table, adapter="few-shot:*")
    if not rows:
        return None
    best = max(rows, key=lambda r: number(r["mask IoU"]) or 0.0)
    return f"{best['mask IoU']} ({best['adapter'].removeprefix('few-shot: ')})", number(best["mask IoU"]) >= 0.6


def _two_conditions(table: Table) -> Reading | None:
    rows = rows_where(table, adapter="controlnet*", control_inputs="mask + edges")
    if not rows:
        return None
    ious = [v for k, v in rows[0].items() if k.startswith("IoU of the")]
    return f"{rows[0]['scenes with both IoU >= 0.6']} of scenes (IoU {' / '.join(ious)})", None


def _b6_ratio(column: str, method: str, other: str, limit: float, unit: str, model: str = "sd15"
              ) -> Callable[[Table], Reading | None]:
    """B6: one method's figure over another's on one model's denoiser, against a limit on the ratio."""
    def read(table: Table) -> Reading | None:
        a = rows_where(table, model=model, method=method)
        b = rows_where(table, model=model, method=other)
        if not a or not b or number(a[0].get(column, "")) is None or number(b[0].get(column, "")) is None:
            return None
        ratio = number(a[0][column]) / number(b[0][column])
        shown = f"{100 * ratio:.0f}%" if unit == "%" else f"{ratio:.2f}×"
        return f"{shown} ({a[0][column]} / {b[0][column]})", ratio <= limit
    return read


def _title_count(pattern: str, all_needed: bool) -> Callable[[Table], Reading | None]:
    def read(table: Table) -> Reading | None:
        m = re.search(pattern, table[0])
        if not m:
            return None
        done, total = int(m.group(1)), int(m.group(2))
        return f"{done}/{total}", (done == total) if all_needed else None
    return read


_B1 = "B1 base quality$"
_B2 = r"B2 concept \(star as 'sks'"
_B3 = r"B3 erase \("
_B4 = r"B4 one-step \("
_B5 = r"B5 control \("
_B6 = r"B6 training cost"
_B7_LINEARS = r"B7 adapter linears"
_B7_UNET = r"B7 UNet forward with unmerged adapters"
_B2_GOALS = {"fidelity": at_least(80), "editability": at_least(80), "preservation (pts)": within(3)}
_LINEARS_WITHIN = r"fused within 1\.25·floor\+2pt at tokens ≥ 1024: (\d+)/(\d+)"
_LINEARS_PEFT = r"fused faster than PEFT's layer: (\d+)/(\d+)"

GOALS: tuple[Goal, ...] = (
    Goal("B1", "shape accuracy", "≥ 90%", _B1, _b1("shape", at_least(90))),
    Goal("B1", "colour accuracy", "≥ 95%", _B1, _b1("colour", at_least(95))),
    Goal("B1", "background accuracy", "≥ 95%", _B1, _b1("background", at_least(95))),
    Goal("B1", "size accuracy", "≥ 85%", _B1, _b1("size", at_least(85))),
    Goal("B1", "position accuracy", "≥ 85%", _B1, _b1("position", at_least(85))),
    Goal("B1", "FD of judge features (floor 12.47)", "—", _B1, _b1("FD", None)),
    Goal("B1", "images/s, batch 8, 25 steps", "≥ 2", "Generation speed", cell("img/s", at_least(2), model="shapes")),
    *(Goal("B2", f"{m}, quick preset: fidelity, editability, preservation", "≥ 80%, ≥ 80%, within ±3 pts", _B2,
           cells(_B2_GOALS, method=m)) for m in ("lora", "sara", "soda", "oft", "hra")),
    Goal("B2", "lora, quick preset: training time (s)", "≤ 180", _B2,
         cell("train time (s)", at_most(180), method="lora")),
    Goal("B3", "circle residual (SPM, transport)", "≤ 10%", _B3,
         cell("circle residual", at_most(10), model="SPM circle", transport="yes")),
    Goal("B3", "collateral on other shapes (SPM, transport)", "within ±3 pts", _B3,
         cell("collateral (pts, mean attr.)", within(3), model="SPM circle", transport="yes")),
    Goal("B3", "stacked circle + red: residuals", "≤ 15% each", _B3,
         cells({"circle residual": at_most(15), "red residual": at_most(15)}, model="SPM circle + red",
               transport="yes")),
    Goal("B3", "stacked: collateral on prompts naming neither", "within ±5 pts", _B3,
         cell("collateral (pts, mean attr.)", within(5), model="SPM circle + red", transport="yes")),
    Goal("B3", "transfer to the B2-fine-tuned checkpoint: residual", "≤ 15%", _B3,
         cell("circle residual", at_most(15), model="+ SPM circle from the base model")),
    Goal("B3", "membrane training time (s)", "≤ 300", _B3,
         cell("train (s)", at_most(300), model="SPM circle", transport="yes")),
    Goal("B3", "paraphrase set (world v2): residual on 'disc' / 'round shape', collateral", "≤ 10% each, within ±3 pts",
         r"B3 paraphrase set", cells({"read as circle: 'disc' prompts": at_most(10),
                                      "read as circle: 'round shape' prompts": at_most(10),
                                      "collateral (pts)": within(3)}, model="SPM circle", transport="yes"),
         model="shapes v2"),
    Goal("B4", "one-step mean attribute accuracy (teacher 95.2%)", "≥ 90.2% (within 5 pts)", _B1, _one_step_mean),
    Goal("B4", "one-step images/s vs the teacher, end to end / UNet only", "≥ 10× end to end", _B4,
         cell("speed vs teacher (end to end / UNet)", at_least(10), model="HiPA")),
    Goal("B4", "adaptor parameters, share of the UNet", "≤ 1%", _B4,
         lambda t: _share_of_unet(cell("adaptor", None, model="HiPA")(t))),
    Goal("B5", "mask IoU, best method", "≥ 0.80", _B5, _best_control("mask IoU", at_least(0.8))),
    Goal("B5", "colour accuracy, best-IoU method", "≥ 90%", _B5, _best_control("colour accuracy", at_least(90))),
    Goal("B5", "ControlNeXt: mask IoU, colour accuracy", "≥ T2I-Adapter's 0.838, ≥ 90%", _B5,
         cells({"mask IoU": at_least(0.838), "colour accuracy": at_least(90)}, method="controlnext")),
    Goal("B5", "few-shot: unseen scribble condition from 30 pairs, mask IoU", "≥ 0.6",
         r"B5 few-shot control \(.*unseen condition scribble", _best_few_shot),
    Goal("B5", "few-shot: unseen box condition from 30 pairs, mask IoU", "≥ 0.6",
         r"B5 few-shot control \(.*unseen condition box", _best_few_shot),
    Goal("B5", "UFC few-shot: unseen scribble from 30 pairs, its task parameters tuned, mask IoU", "≥ 0.6",
         r"B5 few-shot control \(ufc;.*unseen condition scribble",
         cell("mask IoU", at_least(0.6), adapter="few-shot: its task parameters*")),
    Goal("B5", "two conditions at once (ControlNet, mask + edges)", "both obeyed (no threshold set)",
         r"B5 multi-condition", _two_conditions),
    Goal("B6", "SaRA peak memory vs full fine-tuning (SD 1.5 UNet)", "≤ 60%", _B6,
         _b6_ratio("peak RSS (MB)", "sara", "full", 0.6, "%"), model="sd15"),
    Goal("B6", "SaRA peak memory vs LoRA rank 16 (SD 1.5 UNet)", "≤ LoRA's (100%)", _B6,
         _b6_ratio("peak RSS (MB)", "sara", "lora-r16", 1.0, "%"), model="sd15"),
    Goal("B6", "SaRA step time vs LoRA rank 16 (SD 1.5 UNet)", "≤ 1.3×", _B6,
         _b6_ratio("step (s, median)", "sara", "lora-r16", 1.3, "×"), model="sd15"),
    Goal("B6", "SaRA peak memory vs LoRA rank 16 (SDXL UNet)", "≤ LoRA's (100%)", _B6,
         _b6_ratio("peak RSS (MB)", "sara", "lora-r16", 1.0, "%", model="sdxl"), model="sdxl"),
    Goal("B6", "SaRA step time vs LoRA rank 16 (SDXL UNet)", "≤ 1.3×", _B6,
         _b6_ratio("step (s, median)", "sara", "lora-r16", 1.3, "×", model="sdxl"), model="sdxl"),
    Goal("B6", "SaRA peak memory vs LoRA rank 16 (SD3-medium transformer)", "≤ LoRA's (100%)", _B6,
         _b6_ratio("peak RSS (MB)", "sara", "lora-r16", 1.0, "%", model="sd3m"), model="sd3m"),
    Goal("B6", "SaRA step time vs LoRA rank 16 (SD3-medium transformer)", "≤ 1.3×", _B6,
         _b6_ratio("step (s, median)", "sara", "lora-r16", 1.3, "×", model="sd3m"), model="sd3m"),
    Goal("UI", "web UI: page → first image of a trained concept (quick preset, s)", "≤ 240",
         "Web UI: time to a trained concept's first image",
         cell("page → first image (s)", at_most(240), preset="quick")),
    Goal("B7", "adapter linears within 1.25·floor + 2 pts at ≥ 1024 tokens (CPU, fused)", "all shapes", _B7_LINEARS,
         _title_count(_LINEARS_WITHIN, True), model="SD 1.5 layer shapes"),
    Goal("B7", "adapter linears faster than PEFT's layer (CPU, fused)", "—", _B7_LINEARS,
         _title_count(_LINEARS_PEFT, False), model="SD 1.5 layer shapes"),
    Goal("B7", "3 unmerged rank-8 LoRAs vs merged, embedded UNet", "≤ 15%", _B7_UNET,
         cell("unmerged, fused kernel", at_most(15), UNet="shapes*")),
    Goal("B7", "3 unmerged rank-8 LoRAs vs merged, SD 1.5 UNet", "≤ 15%", _B7_UNET,
         cell("unmerged, fused kernel", at_most(15), UNet="sd15*"), model="sd15"),
)


def _share_of_unet(reading: Reading | None) -> Reading | None:
    """'41,216 params (0.86% of the UNet), …' → '0.86% (41,216 params)', against ≤ 1%."""
    if reading is None:
        return None
    m = re.search(r"([\d,]+) params \(([\d.]+)% of the UNet\)", reading[0])
    return (f"{m.group(2)}% ({m.group(1)} params)", float(m.group(2)) <= 1) if m else None


def goal_for(benchmark: str, metric: str) -> Goal | None:
    return next((g for g in GOALS if g.benchmark == benchmark and g.metric == metric), None)


def readings(table: Table) -> list[tuple[Goal, Reading]]:
    """Every goal this table measures, with its reading."""
    out = []
    for goal in GOALS:
        if goal.read is not None and re.match(goal.title, table[0]):
            reading = goal.read(table)
            if reading is not None:
                out.append((goal, reading))
    return out
