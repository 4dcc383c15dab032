import json
import os
import subprocess
import sys

import pytest
from PIL import Image


def studio(*args, cwd=None):
    """The `studio` command in its own process (what a user runs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture
def studio_here(capsys):
    """The same command's `main` in this process (no 8 s interpreter start per call): (exit code, stdout,
    stderr). The end-to-end tests below keep running the real command."""
    from studio.cli import main

    def run(*args):
        environ = dict(os.environ)
        try:
            code = main(list(args))
        finally:
            os.environ.clear()
            os.environ.update(environ)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_generate_writes_png_with_its_settings(studio_here, tmp_path):
    out = tmp_path / "img.png"
    r = studio_here("generate", "a large blue square on a yellow background", "--seed", "3", "--steps", "6",
                    "--out", str(out))
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (128, 128)
    meta = json.loads(img.text["parameters"])
    assert meta["seed"] == 3 and meta["steps"] == 6 and meta["model"] == "shapes"


def test_generate_batch_names_each_image(studio_here, tmp_path):
    r = studio_here("generate", "a red circle", "--batch", "2", "--steps", "3", "--scheduler", "euler",
                    "--out", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(os.urandom(4096))
    return p


def _truncated(tmp_path):
    from studio.shapes import embedded

    src = embedded.SHAPES_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(src.read_bytes()[: 200_000])
    return p


@pytest.mark.parametrize("case", ["unknown_model", "corrupt", "truncated", "empty_prompt", "zero_steps",
                                  "unwritable", "offline_hub_id"])
def test_bad_input_gives_one_line_and_exit_2(studio_here, tmp_path, case):
    out = str(tmp_path / "x.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    args = {
        "unknown_model": ["a red circle", "--model", str(tmp_path / "nope"), "--out", out],
        "corrupt": ["a red circle", "--model", str(_corrupt(tmp_path)), "--out", out],
        "truncated": ["a red circle", "--model", str(_truncated(tmp_path)), "--out", out],
        "empty_prompt": ["", "--out", out],
        "zero_steps": ["a red circle", "--steps", "0", "--out", out],
        "unwritable": ["a red circle", "--out", str(blocker / "x.png")],
        "offline_hub_id": ["a red circle", "--model", "nobody-here/no-such-model", "--out", out],
    }[case]
    # the hub case runs as a user runs it, with HF_HUB_OFFLINE set before huggingface_hub is imported
    r = (studio if case == "offline_hub_id" else studio_here)("generate", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error: "), r.stderr
    if case == "offline_hub_id":
        assert "network" in lines[0] or "cache" in lines[0]


def test_info_names_the_attention_backend(studio_here):
    r = studio_here("info")
    assert r.returncode == 0, r.stderr
    assert "attention backend:" in r.stdout and "embedded model:" in r.stdout


def test_train_export_generate_merge_from_the_command_line(tmp_path):
    from safetensors import safe_open

    from studio.bench.evaluate import write_b2_training_set

    data = tmp_path / "stars"
    write_b2_training_set(data)
    out = tmp_path / "run"
    r = studio("train", "--data", str(data), "--trigger", "sks", "--output-dir", str(out), "--name", "star",
               "--steps", "4", "--batch-size", "2", "--rank", "2", "--preview-every", "0", "--no-tensorboard")
    assert r.returncode == 0, r.stderr
    adapter = out / "star.safetensors"
    assert r.stdout.strip().splitlines()[-1] == str(adapter)
    assert "4 steps, final loss" in r.stderr
    r = studio("export", str(adapter), "--format", "kohya")
    assert r.returncode == 0, r.stderr
    with safe_open(r.stdout.strip(), framework="pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    img = tmp_path / "sks.png"
    r = studio("generate", "a red sks on a blue background", "--adapter", f"{adapter}:0.8", "--steps", "3",
               "--out", str(img))
    assert r.returncode == 0, r.stderr
    assert Image.open(img).size == (128, 128)
    r = studio("merge", "--adapter", f"{adapter}:0.8", "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "model_index.json").is_file()


@pytest.mark.parametrize("case", ["no_data", "bad_rank", "unknown_method", "missing_adapter", "yaml_unknown_key"])
def test_train_and_adapter_bad_input_gives_one_line(studio_here, tmp_path, case):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nlearnin_rate: 1\n")
    args = {
        "no_data": ["train", "--data", str(tmp_path / "nothing"), "--trigger", "sks"],
        "bad_rank": ["train", "--data", str(tmp_path), "--rank", "0"],
        "unknown_method": ["train", "--data", str(tmp_path), "--method", "dreamboat"],
        "missing_adapter": ["generate", "a red circle", "--adapter", str(tmp_path / "none.safetensors"),
                            "--out", str(tmp_path / "x.png")],
        "yaml_unknown_key": ["train", "--config", str(cfg)],
    }[case]
    r = studio_here(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error: "), r.stderr
    expected = {"no_data": "training data folder not found", "bad_rank": "rank must be at least 1",
                "unknown_method": "unknown adapter method 'dreamboat'", "missing_adapter": "adapter file not found",
                "yaml_unknown_key": "learnin_rate"}[case]
    assert expected in lines[0]


def test_erase_then_generate_with_the_membrane(tmp_path):
    out = tmp_path / "circle.safetensors"
    r = studio("erase", "circle", "--out", str(out), "--steps", "3", "--batch", "1", "--denoise-steps", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out) and "3 steps" in r.stderr
    img = tmp_path / "c.png"
    r = studio("generate", "a red circle", "--membrane", str(out), "--steps", "3", "--out", str(img))
    assert r.returncode == 0, r.stderr
    meta = json.loads(Image.open(img).text["parameters"])
    assert meta["membranes"] == {"circle.safetensors": 1.0} and meta["permeability"] == {"circle": [1.0]}
    r = studio("erase", "circle", "--setting", "etaa=2", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "etaa" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_distill_then_generate_in_one_step(tmp_path):
    out = tmp_path / "fast.safetensors"
    r = studio("distill", "--out", str(out), "--pairs", "2", "--teacher-steps", "2", "--steps", "2", "--batch", "2",
               "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out) and "2 steps" in r.stderr
    assert (tmp_path / "fast.teacher.safetensors").is_file()  # the teacher pairs, cached for the next run
    img = tmp_path / "f.png"
    r = studio("generate", "a red circle", "--one-step", str(out), "--out", str(img))
    assert r.returncode == 0, r.stderr
    meta = json.loads(Image.open(img).text["parameters"])
    assert meta["steps"] == 1 and meta["guidance"] == 0.0 and meta["one_step"] == "fast.safetensors"
    r = studio("generate", "a red circle", "--one-step", str(tmp_path / "f.png"), "--out", str(img))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = studio("distill", "--setting", "radius=0.9", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "radius" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_eval_lists_the_misreadings_it_counts(capsys, monkeypatch):
    import studio.bench.evaluate
    from studio.cli import main

    seen = {}
    real = studio.bench.evaluate.run_b1
    monkeypatch.setattr(studio.bench.evaluate, "run_b1", lambda *a, **k: seen.setdefault("r", real(*a, **k)))
    assert main(["eval", "--n", "6", "--steps", "2", "--errors", "2", "--no-write"]) == 0
    out, r = capsys.readouterr().out, seen["r"]
    assert "| attribute | wrong |" in out
    for head, acc in r.accuracy.items():  # every wrong reading is counted once
        assert sum(r.misreadings[head].values()) == round((1 - acc) * r.n)
        assert all(want != got for want, got in r.misreadings[head])
    assert sum(sum(c.values()) for c in r.misreadings.values()) > 0  # 2 steps: the images are far from right
