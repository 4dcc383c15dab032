"""The CLI's generated flags, its refusals of bad input (one line, exit 2) and its silence about methods."""

import argparse
import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest

from studio.cli import build_parser, main
from studio.cli.flags import add_settings, finite_float, values_from
from studio.utils.settings import setting

CLI = Path(__file__).resolve().parents[1] / "studio" / "cli"


@dataclasses.dataclass
class Knobs:
    steps: int = setting(10, help="how many steps")
    lr: float = setting(1e-3, help="learning rate")
    kind: str = setting("fast", help="the kind", choices=("fast", "slow"))
    shuffle: bool = setting(True, help="shuffle the data")
    prompts: list[str] = setting(default_factory=list, help="a prompt")
    sizes: list[int] = dataclasses.field(default_factory=list)
    note: str | None = None


def _parser(cls=Knobs, **kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_settings(p, cls, **kwargs)
    return p


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_field_becomes_a_flag_with_its_help_type_and_choices():
    options = _options(_parser())
    assert set(options) >= {"--steps", "--lr", "--kind", "--shuffle", "--no-shuffle", "--prompts", "--sizes", "--note"}
    assert options["--steps"].help == "how many steps (default: 10)" and options["--steps"].type is int
    assert options["--lr"].type is finite_float and options["--kind"].choices == ("fast", "slow")
    assert options["--sizes"].help == "repeatable" and options["--note"].help is None  # no help written: none shown
    args = _parser().parse_args(["--steps", "3", "--no-shuffle", "--prompts", "a", "--prompts", "b", "--sizes", "4"])
    assert values_from(args, Knobs) == {"steps": 3, "shuffle": False, "prompts": ["a", "b"], "sizes": [4]}
    assert values_from(_parser().parse_args([]), Knobs) == {}  # nothing given: nothing over a preset's values
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--kind", "medium"])


def test_a_field_added_to_a_dataclass_shows_up_as_a_flag():
    wider = dataclasses.make_dataclass("Wider", [("warmup_steps", int, setting(5, help="steps of warm-up"))],
                                       bases=(Knobs,))
    options = _options(_parser(wider))
    assert options["--warmup-steps"].help == "steps of warm-up (default: 5)"
    assert values_from(_parser(wider).parse_args(["--warmup-steps", "7"]), wider) == {"warmup_steps": 7}
    assert set(_options(_parser(only=("lr",)))) == {"--lr", "-h", "--help"}
    assert set(_options(_parser(prefix="x_", only=("steps",)))) == {"--x-steps", "-h", "--help"}


def _subcommand_options(*path: str) -> set[str]:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return set(_options(parser))


def test_the_commands_flags_are_their_settings_fields():
    from studio.tasks.distill import SETTINGS as DistillSettings
    from studio.tasks.erase import SETTINGS as EraseSettings
    from studio.training import TrainConfig

    def flags(cls, skip=()):
        return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name not in skip}

    assert flags(TrainConfig) <= _subcommand_options("train")
    assert flags(TrainConfig) <= _subcommand_options("control-train")
    assert flags(EraseSettings) | {"--resume", "--setting"} <= _subcommand_options("erase")
    assert flags(DistillSettings) | {"--resume", "--setting", "--rank"} <= _subcommand_options("distill")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "1e999", "fast"])
def test_float_flags_take_finite_numbers_only(text):
    with pytest.raises(argparse.ArgumentTypeError):
        finite_float(text)
    assert finite_float("-2.5") == -2.5 and finite_float("1e-3") == 1e-3


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["generate", "a red circle", "--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["generate", "a red circle", "--guidance", "inf"], "'inf' is not a finite number"),
    (["generate", "a red circle", "--guidance", "-1"], "guidance must be >= 0"),
    (["generate", "a red circle", "--batch", "100000"], "--batch 100000: at most 64 images"),
    (["train", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["erase", "circle", "--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["distill", "--radius", "nan"], "argument --radius: 'nan' is not a finite number"),
    (["train", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["ui", "--host", "0.0.0.0"], "--host 0.0.0.0 serves the studio to the network: give --auth USER:PASS"),
    (["ui", "--host", "192.168.1.5", "--port", "9999"], "give --auth USER:PASS"),
    (["ui", "--host", "0.0.0.0", "--auth", "nopassword"], "--auth takes USER:PASS"),
    (["erase", "circle", "--out", "circle.png"], "circle.png: a membrane is written as a .safetensors file"),
])
def test_bad_flags_give_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in _one_line_error(capsys, argv)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_an_output_dir_that_is_a_file_is_refused_before_training(capsys, tmp_path):
    from studio.bench.evaluate import write_b2_training_set

    write_b2_training_set(tmp_path / "stars")
    blocker = tmp_path / "F"
    blocker.write_text("a file")
    common = ["--data", str(tmp_path / "stars"), "--trigger", "sks", "--steps", "1"]
    line = _one_line_error(capsys, ["train", *common, "--output-dir", str(blocker)])
    assert f"--output-dir {blocker} is a file, not a folder" in line
    line = _one_line_error(capsys, ["train", *common, "--output-dir", str(blocker / "run")])
    assert f"lies under {blocker}, a file" in line
    line = _one_line_error(capsys, ["control-train", "--examples", "1", "--output-dir", str(blocker)])
    assert "is a file, not a folder" in line
    assert blocker.read_text() == "a file"


def test_ui_serves_the_network_only_with_a_login_or_said_explicitly(monkeypatch):
    import studio.ui.app

    calls = []
    monkeypatch.setattr(studio.ui.app, "launch", lambda **kwargs: calls.append(kwargs))
    assert main(["ui"]) == 0 and calls[-1]["host"] == "127.0.0.1" and calls[-1]["auth"] is None
    assert main(["ui", "--host", "::1"]) == 0 and main(["ui", "--host", "localhost"]) == 0
    assert main(["ui", "--host", "0.0.0.0", "--auth", "ann:secret"]) == 0 and calls[-1]["auth"] == "ann:secret"
    assert main(["ui", "--host", "0.0.0.0", "--insecure-no-auth"]) == 0 and calls[-1]["auth"] is None
    assert len(calls) == 5
    assert main(["ui", "--host", "studio.example.org"]) == 2 and len(calls) == 5


def test_erase_and_distill_bind_their_flags_to_the_tasks_by_name(monkeypatch, tmp_path):
    import studio.tasks.distill
    import studio.tasks.erase
    from studio.training import TrainResult

    seen = {}

    def fake(name):
        def task(*args, **kwargs):
            seen[name] = (args, kwargs)
            out = Path(kwargs.get("out", args[-1]))
            out.write_bytes(b"x")
            return TrainResult(out, 3, 0.5, 1.0, 10, False)
        return task

    monkeypatch.setattr(studio.tasks.erase, "erase", fake("erase"))
    monkeypatch.setattr(studio.tasks.distill, "distill", fake("distill"))
    out = tmp_path / "c.safetensors"
    assert main(["erase", "circle", "--out", str(out), "--steps", "3", "--denoise-steps", "2", "--resume", "latest",
                 "--setting", "eta=2", "--prompt", "a red circle", "--device", "cpu", "--dtype", "fp32"]) == 0
    args, kwargs = seen["erase"]
    assert args == (["circle"], out) and kwargs["resume"] == "latest" and kwargs["preset"] == "shapes"
    assert kwargs["settings"] == {"steps": 3, "denoise_steps": 2}
    assert kwargs["adapter"] == {"eta": 2, "prompts": ["a red circle"]}
    assert kwargs["load"]["device"] == "cpu" and kwargs["load"]["dtype"] == "fp32"
    out = tmp_path / "d.safetensors"
    assert main(["distill", "--out", str(out), "--pairs", "2", "--setting", "radius=0.2", "--no-high-frequency",
                 "--resume", str(tmp_path / "ckpt"), "--rank", "2"]) == 0
    args, kwargs = seen["distill"]
    assert args == (out,) and kwargs["rank"] == 2 and kwargs["resume"] == str(tmp_path / "ckpt")
    assert kwargs["settings"] == {"pairs": 2, "radius": 0.2, "fourier_weight": 0.0, "edge_weight": 0.0}


# ---- no method names in the CLI ----

def _method_words() -> list[str]:
    from studio.adapters import method_names

    return method_names()


def named_methods(source: str, words: list[str]) -> list[tuple[int, str]]:
    """(line, token) of every identifier or string literal (docstrings included, comments not) that names one of
    `words` as a whole word, in any case; `_` and `-` separate words (bake_sara names sara)."""
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, words)) + r")(?![a-z0-9])", re.IGNORECASE)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            if pattern.search(tok.string):
                found.append((tok.start[0], tok.string))
    return found


def test_the_scan_finds_a_method_name_where_one_is_written():
    words = ["lora", "t2i_adapter", "controlnet"]
    source = ('x = "train a LoRA"\nbake_lora = 1\n# lora in a comment\ny = "controlnext, T2I-Adapter"\n'
              'z = "t2i_adapter"\n')
    assert [line for line, _ in named_methods(source, words)] == [1, 2, 5]


def test_no_cli_module_names_a_method():
    words = _method_words()
    assert len(words) >= 8 and "controlnet" in words
    modules = sorted(CLI.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "flags.py", "common.py", "train.py", "bench.py"}
    found = {m.name: named_methods(m.read_text(encoding="utf-8"), words) for m in modules}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_bake_goes_by_the_files_method_to_its_registered_baker(capsys, tmp_path):
    import torch

    from studio.adapters import get_method, method_names, save_adapter
    from studio.adapters.bake import bake_adapter, bakeable_methods

    assert bakeable_methods() == ["sara", "soda"] and set(bakeable_methods()) <= set(method_names("concept"))
    hra = get_method("hra")
    path = save_adapter(tmp_path / "h.safetensors", "hra", hra.config_class(), {"unet.x.weight": torch.zeros(2, 2)},
                        {})
    line = _one_line_error(capsys, ["bake", str(path), "--rank", "2"])
    assert line == "studio: error: h.safetensors is a hra adapter; bake takes sara, soda adapters"
    soda = get_method("soda")
    path = save_adapter(tmp_path / "s.safetensors", "soda", soda.config_class(), {"unet.x.delta": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="baking a soda adapter needs its base model"):
        bake_adapter(path, 2)
    line = _one_line_error(capsys, ["bake", str(path), "--rank", "2"])
    assert "s.safetensors does not name its base model; give --model" in line
    assert not list(tmp_path.glob("*lora*"))


def test_only_the_method_that_writes_extra_files_after_training_does():
    from studio.adapters import AdapterMethod, get_method, method_names

    own = [name for name in method_names() if type(get_method(name)).export_extra is not AdapterMethod.export_extra]
    assert own == ["controlnet"]
    assert get_method("hra").export_extra(Path("nowhere.safetensors")) == []


def test_control_train_help_names_its_own_defaults(capsys):
    """control-train's method and recipe defaults are the task's (T2I-Adapter, B5's recipe), not `studio train`'s."""
    from studio.cli import main
    from studio.tasks.control import DEFAULT_METHOD, DEFAULT_RECIPE

    assert main(["control-train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_METHOD})" in text and f"optimizer steps (default: {DEFAULT_RECIPE['steps']})" in text
