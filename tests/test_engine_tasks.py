"""Erase and distill run through the training engine: killed (SIGKILL) or interrupted (Ctrl+C) and resumed with
resume="latest" they write the same adapter as an uninterrupted run, with the exact step count; under
`accelerate launch --multi_gpu --num_processes 2` on the CPU they match one process; resume with no checkpoint
says so, and an output folder that is a file is refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.training import TrainingError, train
from studio.training.checkpoint import checkpoint_dirs

ERASE = {"steps": 4, "batch": 2, "denoise_steps": 3, "warmup": 2, "checkpoint_every": 1, "keep_checkpoints": 10}
DISTILL = {"pairs": 4, "teacher_steps": 2, "steps": 4, "batch": 2, "warmup": 2, "checkpoint_every": 1,
           "keep_checkpoints": 10, "ema_decay": 0.9}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CHILD = """
import json, sys
from studio.loading import StudioError
task, out, settings, resume = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] or None
try:
    if task == "erase":
        from studio.tasks.erase import erase
        result = erase(["circle"], out, settings=settings, resume=resume)
    else:
        from studio.tasks.distill import distill
        result = distill(out, settings=settings, cache=sys.argv[5], resume=resume)
except StudioError as e:
    print(f"studio: error: {e}", file=sys.stderr)
    sys.exit(2)
print(result.steps)
"""


def _run(task: str, out: Path, settings: dict, cache: Path, resume=None, events=None):
    if task == "erase":
        from studio.tasks.erase import erase

        return erase(["circle"], out, settings=settings, resume=resume, on_event=events)
    from studio.tasks.distill import distill

    return distill(out, settings=settings, cache=cache, resume=resume, on_event=events)


def _file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _same_tensors(a: dict, b: dict, atol: float, mean_atol: float | None = None) -> float:
    """The largest element difference is at most `atol` (and, given `mean_atol`, the mean one at most that)."""
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    mean = float(torch.cat([(a[k] - b[k]).abs().flatten().float() for k in a]).mean())
    assert diff <= atol, f"tensors differ by {diff} (tolerance {atol})"
    assert mean_atol is None or mean <= mean_atol, f"tensors differ by {mean} on average (tolerance {mean_atol})"
    return diff


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs in this process compute as the child processes do (OMP_NUM_THREADS=1): a CPU GEMM's sums differ
    in the last bits with the number of threads, which Adam's first steps amplify past the tolerance."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(CHILD, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of each task (the reference), and the teacher cache the distill runs share."""
    root = tmp_path_factory.mktemp("whole")
    cache = root / "pairs.safetensors"
    # the pairs first, as every run below then reads them: student steps after pairs made in the same process
    # differ from those after cached ones in the last ulps (~1e-6 after 4 steps)
    _run("distill", root / "pairs_only.safetensors", {**DISTILL, "steps": 1}, cache)
    return {task: _run(task, root / f"{task}.safetensors", settings, cache).adapter_path
            for task, settings in (("erase", ERASE), ("distill", DISTILL))}, cache


def _start(child_script, task, out, settings, cache, resume=""):
    return subprocess.Popen([sys.executable, str(child_script), task, str(out), json.dumps(settings), resume,
                             str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            # a shell that starts the suite in the background passes SIGINT on as ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(proc, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.name.split("_")[1]) >= step for p in checkpoint_dirs(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} appeared: {proc.poll()} "
                         f"{proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


@pytest.mark.parametrize("task", ["erase", "distill"])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_or_interrupted_then_resumed_equals_uninterrupted(tmp_path, child_script, uninterrupted, task, how):
    whole, cache = uninterrupted
    settings = ERASE if task == "erase" else DISTILL
    out = tmp_path / f"{task}.safetensors"
    run_dir = tmp_path / f"{task}_run"  # the documented checkpoint folder: <out without suffix>_run/
    proc = _start(child_script, task, out, settings, cache)
    _wait_for_checkpoint(proc, run_dir, 1)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=300)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (f"studio: error: interrupted; progress is kept in "
                                                f"{run_dir / 'checkpoints'} (resume with --resume latest)")
    assert not out.exists()
    kept = int(checkpoint_dirs(run_dir)[-1].name.split("_")[1])
    assert 1 <= kept < settings["steps"], kept
    events = []
    resumed = _run(task, out, settings, cache, resume="latest", events=events.append)
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(kept + 1, settings["steps"] + 1))
    assert any(e["kind"] == "log" and e["message"].startswith("resumed from") for e in events)
    assert resumed.steps == settings["steps"]
    tensors, meta = _file(out)
    reference, reference_meta = _file(whole[task])
    _same_tensors(tensors, reference, atol=1e-6)
    assert meta["steps"] == str(settings["steps"])
    assert set(meta) >= {"steps", "trigger", "training_seconds", "trainable_parameters", "training_config",
                         "method", "base_model"}
    assert meta["method"] == reference_meta["method"] == ("spm" if task == "erase" else "hipa")


def _two_processes(child_script, task, out, settings, cache):
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`, whatever is on PATH
    # `--cpu` would make accelerate's simple launcher start one process; `--multi_gpu` on a host without GPUs starts
    # 2 through torchrun (gloo DDP, MULTI_CPU), as tests/test_train.py's 2-process test does
    run = subprocess.run([*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(child_script), task, str(out),
                          json.dumps(settings), "", str(cache)], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((checkpoint_dirs(out.with_name(f"{out.stem}_run"))[-1] / "state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.parametrize("task", ["erase", "distill"])
def test_two_processes_match_one(tmp_path, child_script, uninterrupted, task):
    """Each process takes half of every global batch (batch 2: one row each); DDP averages the gradients. The
    sums run in another order (two half-batch gradients all-reduced), and Adam's first steps move each element by
    about lr whatever its gradient's size, so elements whose gradient is ~0 may differ by a fraction of one
    step: no element may differ by more than half a step (0.5·lr), and on average they agree to a thousandth of
    one (measured: erase at lr 5e-3 max 1.3e-4 = 0.03·lr, mean 2.1e-7; distill at 1e-3 max 6.3e-5 to 2.6e-4 =
    up to 0.26·lr since its perceptual term reads the VAE encoder, mean 7.1e-8 = 0.00007·lr). Rows computed by
    the wrong process would move the mean by about lr."""
    from studio.adapters.hipa.config import DistillSettings
    from studio.adapters.spm.config import EraseSettings

    whole, cache = uninterrupted
    settings = ERASE if task == "erase" else DISTILL
    lr = settings.get("lr") or (EraseSettings if task == "erase" else DistillSettings)().lr
    out = tmp_path / f"{task}.safetensors"
    _two_processes(child_script, task, out, settings, cache)
    tensors, meta = _file(out)
    _same_tensors(tensors, _file(whole[task])[0], atol=0.5 * lr, mean_atol=1e-3 * lr)
    assert meta["steps"] == str(settings["steps"])


def test_resume_latest_without_a_checkpoint_says_so(tmp_path, uninterrupted):
    _, cache = uninterrupted
    events = []
    out = tmp_path / "m.safetensors"
    result = _run("erase", out, {**ERASE, "steps": 1}, cache, resume="latest", events=events.append)
    assert result.steps == 1
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert f"no checkpoint in {tmp_path / 'm_run' / 'checkpoints'}: starting from step 0" in logs


def test_output_folder_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with pytest.raises(TrainingError, match=r"^output folder .*taken is a file; give a folder$"):
        train(data=str(tmp_path), output_dir=str(taken), steps=1)


def test_erase_refuses_unknown_settings(tmp_path):
    from studio.loading import StudioError
    from studio.tasks.erase import erase

    with pytest.raises(StudioError, match="unknown erase setting.*checkpoint_evry"):
        erase(["circle"], tmp_path / "m.safetensors", settings={"checkpoint_evry": 3})


def test_nan_in_an_erase_step_names_the_step(tmp_path):
    from studio.tasks.erase import erase

    with pytest.raises(TrainingError, match=r"NaN/inf at step 1 .*no checkpoint had been written yet"):
        erase(["circle"], tmp_path / "m.safetensors", settings={**ERASE, "lr": 1e-3, "steps": 2,
                                                                 "denoise_steps": 2, "sample_guidance": float("inf")})
    assert not (tmp_path / "m.safetensors").exists()
