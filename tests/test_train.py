"""The training engine: bad data named up front, exact resume after a kill, NaN stop keeping the last good
checkpoint, YAML configs, previews and logs, prior preservation, and 2-process training through accelerate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from studio.shapes import world
from studio.adapters import read_adapter, register
from studio.adapters.lora.model import LoraMethod
from studio.data import DataError, scan_folder
from studio.bench.evaluate import write_b2_training_set
from studio.training.engine import TrainConfig, TrainingError, checkpoint_dirs, config_with_preset, train

FAST = dict(steps=6, batch_size=2, lr=1e-3, preview_every=0, checkpoint_every=3, tensorboard=False,
            progress_bar=False, adapter={"rank": 2})


@pytest.fixture(scope="module")
def star_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    write_b2_training_set(folder)
    return folder


def _tensors(path):
    return read_adapter(path).tensors


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- bad data ----

def _folder_with(tmp_path, name, content: bytes | None = None, image_size=128, caption: bytes | None = None):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(world.render(world.Spec("star", "red", "blue", "large", "center"), 0)).save(folder / "good.png")
    (folder / "good.txt").write_text("a red sks", encoding="utf-8")
    target = folder / name
    if content is not None:
        target.write_bytes(content)
    else:
        Image.new("RGB", (image_size, image_size), "red").save(target)
    if caption is not None:
        target.with_suffix(".txt").write_bytes(caption)
    return folder


@pytest.mark.parametrize("name,kwargs,message", [
    ("text.png", {"content": b"hello, I am text"}, "text.png: not a readable image"),
    ("empty.png", {"content": b""}, "empty.png: empty file"),
    ("cut.png", {"content": None}, None),  # filled below: a truncated PNG
    ("tiny.png", {"image_size": 16}, "tiny.png: 16x16 is too small"),
    ("notes.gif", {"content": b"GIF89a"}, "notes.gif: unsupported file type .gif"),
    ("latin.png", {"caption": "a red sks, caf\xe9".encode("latin-1")}, "latin.txt: caption is not UTF-8"),
])
def test_bad_training_data_is_named(tmp_path, name, kwargs, message):
    if name == "cut.png":
        buf = tmp_path / "full.png"
        Image.new("RGB", (128, 128), "red").save(buf)
        kwargs = {"content": buf.read_bytes()[:60]}
        message = "cut.png: not a readable image"
    folder = _folder_with(tmp_path, name, **kwargs)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        scan_folder(folder, trigger="sks", min_size=32)
    with pytest.warns(UserWarning, match="skipped"):
        kept = scan_folder(folder, trigger="sks", min_size=32, skip_bad=True)
    assert [e.path.name for e in kept] == ["good.png"]


def test_empty_folder_and_missing_caption(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="training data folder not found"):
        scan_folder(tmp_path / "nope")
    folder = tmp_path / "nocap"
    folder.mkdir()
    Image.new("RGB", (128, 128), "red").save(folder / "a.png")
    with pytest.raises(DataError, match="a.png: no caption"):
        scan_folder(folder)
    assert scan_folder(folder, instance_prompt="a photo of [trigger]", trigger="sks")[0].caption == "a photo of sks"


def test_bad_data_fails_before_training(tmp_path):
    folder = _folder_with(tmp_path, "text.png", content=b"nope")
    with pytest.raises(DataError, match="text.png"):
        train(data=str(folder), trigger="sks", output_dir=str(tmp_path / "out"), **FAST)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---- configs ----

def test_yaml_config_holds_every_setting_and_cli_flags_override(tmp_path, star_data):
    cfg = config_with_preset("quick", data=str(star_data), adapter={"rank": 2})
    assert cfg.steps == 300 and cfg.adapter == {"rank": 2}  # preset, then explicit values
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = TrainConfig.from_yaml(path)
    assert again == cfg
    from studio.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "7", "--rank", "3",
                                      "--no-buckets", "--preview-prompts", "a sks", "--adapter", "dropout=0.1"])
    merged = train_config_from_args(args)
    assert merged.steps == 7 and merged.adapter == {"rank": 3, "dropout": 0.1} and merged.buckets is False
    assert merged.preview_prompts == ["a sks"] and merged.lr == cfg.lr
    path.write_text("steps: 5\nlearning_rate: 0.1\n")
    with pytest.raises(TrainingError, match="unknown training setting.*learning_rate"):
        TrainConfig.from_yaml(path)
    with pytest.raises(TrainingError, match="unknown preset"):
        config_with_preset("fastest")


def test_numbers_written_the_yaml_1_1_way_are_numbers(tmp_path):
    """PyYAML reads `1e-3` (no dot) as text; settings convert it by the field's type, or name the setting."""
    import studio.adapters  # noqa: F401  (registers the methods)
    from studio.adapters.base import AdapterError, get_method

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nsteps: 2e2\nsnr_gamma: 5\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.lr == 1e-3 and cfg.steps == 200 and isinstance(cfg.steps, int) and cfg.snr_gamma == 5.0
    path.write_text("lr: fast\n")
    with pytest.raises(TrainingError, match="training setting lr takes a number, got 'fast'"):
        TrainConfig.from_yaml(path)
    path.write_text("steps: 2.5\n")
    with pytest.raises(TrainingError, match="steps takes a whole number"):
        TrainConfig.from_yaml(path)
    from studio.cli import parse_settings

    sara = get_method("sara").config_class.from_dict(parse_settings(["nuclear_weight=1e-3", "budget=1%"]))
    assert sara.nuclear_weight == 1e-3 and sara.budget == "1%"
    with pytest.raises(AdapterError, match="nuclear_weight takes a number"):
        get_method("sara").config_class.from_dict({"nuclear_weight": "strong"})


# ---- runs ----

def test_run_writes_adapter_checkpoints_previews_and_logs(tmp_path, star_data):
    events = []
    out = tmp_path / "run"
    result = train(data=str(star_data), trigger="sks", output_dir=str(out), name="star",
                   **{**FAST, "preview_every": 3, "tensorboard": True,
                      "preview_prompts": ["a red sks on a blue background"]}, on_event=events.append)
    assert result.steps == 6 and result.adapter_path == out / "star.safetensors"
    with safe_open(str(result.adapter_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "lora" and meta["trigger"] == "sks" and meta["steps"] == "6"
    assert json.loads(meta["training_config"])["adapter"] == {"rank": 2}
    assert [c.name for c in checkpoint_dirs(out)] == ["step_0000003", "step_0000006"]
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == ["step_0000003_0.png", "step_0000006_0.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "config.yaml").is_file()
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7)) and all(e["loss"] > 0 for e in steps)
    assert any(e["kind"] == "preview" for e in events)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, star_data):
    settings = {**FAST, "steps": 30, "checkpoint_every": 4, "adapter": {"rank": 2, "dropout": 0.1}}
    whole = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "whole"), **settings)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "studio.cli", "train", "--data", str(star_data), "--trigger", "sks",
           "--output-dir", str(out), "--steps", "30", "--batch-size", "2", "--lr", "1e-3", "--preview-every", "0",
           "--checkpoint-every", "4", "--no-tensorboard", "--no-progress-bar", "--adapter", "rank=2",
           "--adapter", "dropout=0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint_dirs(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(checkpoint_dirs(out)[-1].name.split("_")[1])
    assert 4 <= killed_at < 30
    events = []
    resumed = train(data=str(star_data), trigger="sks", output_dir=str(out), resume="latest", on_event=events.append,
                    **settings)
    assert resumed.steps == 30
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(killed_at + 1, 31))
    assert _max_diff(_tensors(resumed.adapter_path), _tensors(whole.adapter_path)) < 1e-6


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, star_data):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "studio.cli", "train", "--data", str(star_data), "--trigger", "sks", "--output-dir",
           str(out), "--steps", "4000", "--batch-size", "2", "--preview-every", "0", "--checkpoint-every", "5",
           "--keep-checkpoints", "1", "--no-tensorboard", "--no-progress-bar", "--rank", "2"]
    # far more steps than the interrupt needs: the run must still be going when the signal comes. A shell that
    # starts the test suite in the background (`cmd &`) passes SIGINT on as ignored, and Python then never turns
    # it into KeyboardInterrupt: the child gets the default disposition back, as a terminal's Ctrl+C would find.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not checkpoint_dirs(out) and time.time() < deadline:  # well into the steps
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("studio: error: interrupted; progress is kept in")
    saved = checkpoint_dirs(out)
    assert len(saved) == 1 and 5 <= int(saved[0].name.split("_")[1]) < 4000  # the step it was at when stopped
    state = json.loads((saved[0] / "state.json").read_text())
    assert state["step"] == int(saved[0].name.split("_")[1])


class _NanAfterStep3(LoraMethod):
    name = "lora_nan_test"
    calls = 0

    def training_loss(self, pipe, batch, default_loss):
        type(self).calls += 1
        loss = default_loss(batch)
        return loss * float("nan") if type(self).calls > 3 else loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, star_data):
    register(_NanAfterStep3)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"NaN/inf at step 4 .*last good checkpoint is .*step_0000002"):
        train(method="lora_nan_test", data=str(star_data), trigger="sks", output_dir=str(out),
              **{**FAST, "checkpoint_every": 2})
    [good] = checkpoint_dirs(out)
    assert good.name == "step_0000002"
    assert all(torch.isfinite(t).all() for t in _tensors(good / "adapter.safetensors").values())
    assert not (out / "concept.safetensors").exists()


def test_options_gradient_checkpointing_bf16_and_8bit_adam(tmp_path, star_data):
    plain = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "plain"), **FAST)
    ckpt = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True,
                 **FAST)
    assert _max_diff(_tensors(plain.adapter_path), _tensors(ckpt.adapter_path)) < 1e-5
    bf16 = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "bf16"), mixed_precision="bf16", **FAST)
    assert torch.isfinite(torch.tensor(bf16.final_loss))
    diff = _max_diff(_tensors(plain.adapter_path), _tensors(bf16.adapter_path))
    assert 0 < diff < 0.05  # bf16 autocast changes the numbers a little, not the result
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(TrainingError, match="adamw8bit needs bitsandbytes"):
            train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "8bit"), optimizer="adamw8bit", **FAST)


def test_prior_preservation_draws_and_reuses_class_images(tmp_path, star_data):
    settings = {**FAST, "steps": 2, "prior_preservation": True,
                "class_prompts": ["a large red circle", "a blue square"],
                "num_class_images": 3, "preview_steps": 4}
    train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "prior"), **settings)
    drawn = sorted((tmp_path / "prior" / "class_images").glob("*.png"))
    assert len(drawn) == 3
    assert [p.with_suffix(".txt").read_text() for p in drawn] == ["a large red circle", "a blue square",
                                                                   "a large red circle"]
    stamps = [p.stat().st_mtime_ns for p in drawn]
    events = []
    train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "prior"), on_event=events.append,
          **{**settings, "steps": 3, "prior_target": "base"})
    assert [p.stat().st_mtime_ns for p in drawn] == stamps  # reused, not redrawn
    assert all(e["loss"] > 0 for e in events if e["kind"] == "step")


@pytest.mark.parametrize("method", ["lora", "sara"])
def test_two_processes_match_one(tmp_path, star_data, method):
    """`accelerate launch --multi_gpu` on a CPU host starts 2 processes through torchrun (gloo DDP, MULTI_CPU);
    each takes half of every global batch. SaRA's values are plain leaves outside the wrapped UNet's parameters
    and its nuclear-norm penalty draws layers per step: both must stay in step across the processes."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter
    method_args = ["--rank", "2"] if method == "lora" else [
        "--method", "sara", "--adapter", "budget=1%", "--adapter", "nuclear_weight=1e-3"]
    common = ["train", "--data", str(star_data), "--trigger", "sks", "--steps", "8", "--batch-size", "4",
              "--lr", "1e-3", "--preview-every", "0", "--checkpoint-every", "8", "--no-tensorboard",
              "--no-progress-bar", *method_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli", *common,
                          "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    state = json.loads((checkpoint_dirs(tmp_path / "two")[-1] / "state.json").read_text())
    assert state["world_size"] == 2
    one = subprocess.run([sys.executable, "-m", "studio.cli", *common, "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two, one = tmp_path / "two" / "concept.safetensors", tmp_path / "one" / "concept.safetensors"
    diff = _max_diff(_tensors(two), _tensors(one))
    assert diff < 1e-4, diff


def test_aspect_ratio_buckets():
    from studio.data import batch_plan, batches_per_epoch, bucket_size, to_bucket

    assert bucket_size(512, 512, 512) == (512, 512)
    assert bucket_size(1024, 512, 512) == (704, 320)        # wide: about 512² pixels, sides multiples of 64
    assert bucket_size(300, 900, 512) == (320, 704)         # tall: the ratio is clamped near 1:2
    assert bucket_size(200, 200, 512) == (192, 192)         # never upscaled past the picture
    w, h = bucket_size(1024, 512, 512)
    assert abs(w * h - 512 * 512) / (512 * 512) < 0.15 and w % 64 == 0 and h % 64 == 0
    tensor = to_bucket(Image.new("RGB", (1024, 512), "red"), (w, h))
    assert tensor.shape == (3, h, w) and float(tensor.min()) >= -1 and float(tensor.max()) <= 1
    buckets = [0, 0, 0, 1, 1, 0, 1]
    plan = batch_plan(buckets, 2, seed=3, epoch=0)
    assert len(plan) == batches_per_epoch(buckets, 2) == 4
    assert all(len(b) == 2 and len({buckets[i] for i in b}) == 1 for b in plan)  # one bucket per batch
    assert sorted({i for b in plan for i in b}) == list(range(7))                # every picture each epoch
    assert plan == batch_plan(buckets, 2, seed=3, epoch=0) != batch_plan(buckets, 2, seed=3, epoch=1)


# ---- timestep bias and x0 weighting ----

def test_timestep_bias_draws_the_favoured_timesteps_and_none_is_unchanged():
    from diffusers import DDPMScheduler

    from studio.training.engine import sample_timesteps, timestep_weights, x0_weights

    assert timestep_weights(TrainConfig(), 1000) is None
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample_timesteps(None, 1000, 64, gen()), torch.randint(0, 1000, (64,), generator=gen()))
    biased = TrainConfig(timestep_bias="later", timestep_bias_multiplier=3, timestep_bias_portion=0.4)
    later = timestep_weights(biased, 1000)
    t = sample_timesteps(later, 1000, 20_000, gen())
    assert abs(float((t >= 600).float().mean()) - 1.2 / 1.8) < 0.02  # 0.4·3 / (0.4·3 + 0.6)
    earlier = timestep_weights(TrainConfig(timestep_bias="earlier", timestep_bias_multiplier=1e6), 1000)
    assert int(sample_timesteps(earlier, 1000, 500, gen()).max()) < 250
    ranged = timestep_weights(TrainConfig(timestep_bias="range", timestep_bias_multiplier=1e9, timestep_bias_begin=700,
                                          timestep_bias_end=800), 1000)
    t = sample_timesteps(ranged, 1000, 500, gen())
    assert int(t.min()) >= 700 and int(t.max()) < 800
    sched = DDPMScheduler(beta_schedule="scaled_linear")
    w = x0_weights(sched, torch.arange(1000), later)
    assert abs(float((w * later).sum()) - 1) < 1e-4 and bool((w[1:] > w[:-1]).all())  # mean 1, more at high noise


@pytest.mark.parametrize("settings,message", [
    ({"timestep_bias": "late"}, "timestep_bias must be"),
    ({"timestep_bias": "later", "timestep_bias_portion": 0}, "timestep_bias_portion"),
    ({"timestep_bias": "range", "timestep_bias_begin": 600, "timestep_bias_end": 600}, "non-empty range"),
    ({"x0_weighting": True, "snr_gamma": 5.0}, "choose one"),
])
def test_bad_timestep_settings_are_named(star_data, settings, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(data=str(star_data), **settings).validate()


def test_timestep_bias_from_the_command_line_round_trips(tmp_path, star_data):
    from studio.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--data", str(star_data), "--timestep-bias", "range",
                                      "--timestep-bias-begin", "600", "--timestep-bias-multiplier", "4",
                                      "--x0-weighting"])
    cfg = train_config_from_args(args)
    assert (cfg.timestep_bias, cfg.timestep_bias_begin, cfg.timestep_bias_multiplier, cfg.x0_weighting) == \
        ("range", 600, 4.0, True)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg


def test_biased_run_resumes_exactly(tmp_path, star_data):
    settings = {**FAST, "steps": 4, "checkpoint_every": 2, "timestep_bias": "later", "timestep_bias_multiplier": 5.0,
                "x0_weighting": True}
    whole = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "whole"), **settings)
    half = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "half"), **{**settings, "steps": 2})
    assert half.steps == 2
    resumed = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "half"), resume="latest", **settings)
    assert _max_diff(_tensors(resumed.adapter_path), _tensors(whole.adapter_path)) < 1e-6
    uniform = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "uniform"),
                    **{**settings, "timestep_bias": "none", "x0_weighting": False})
    assert _max_diff(_tensors(uniform.adapter_path), _tensors(whole.adapter_path)) > 1e-6


# ---- the trigger as a trained token (pivotal tuning) ----

def test_trigger_token_trains_its_own_row_and_loads_back(tmp_path, star_data):
    from studio.adapters import load_adapters
    from studio.adapters.base import token_ids
    from studio.loading import load_pipeline

    result = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "tt"), trigger_token=True,
                   trigger_token_lr=1e-2, **FAST)
    file = read_adapter(result.adapter_path)
    vector = file.tensors["trigger_embedding"]
    base = load_pipeline("shapes")
    table = base.text_encoder.get_input_embeddings().weight
    start = table[base.tokenizer("sks", add_special_tokens=False).input_ids].mean(0).detach()
    assert vector.shape == (1, table.shape[1]) and file.metadata["trigger"] == "sks"
    assert float((vector[0] - start).abs().max()) > 1e-3  # it trained
    assert result.trainable_parameters == sum(t.numel() for t in file.tensors.values())

    pipe = load_pipeline("shapes")
    load_adapters(pipe, [result.adapter_path])
    (token,) = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    loaded = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(loaded[token], vector[0])
    assert torch.equal(loaded[:table.shape[0]], table)  # every other row as the base model's
    plain = ["a red circle on a blue background"]
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(token_ids(pipe, plain))[0], base.text_encoder(token_ids(base, plain))[0])
        trig = ["a red sks on a blue background"]
        trained, untouched = pipe.text_encoder(token_ids(pipe, trig))[0], base.text_encoder(token_ids(base, trig))[0]
        assert not torch.allclose(trained, untouched)


def test_trigger_token_resumes_exactly(tmp_path, star_data):
    settings = {**FAST, "steps": 4, "checkpoint_every": 2, "trigger_token": True}
    whole = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "whole"), **settings)
    train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "part"), **{**settings, "steps": 2})
    resumed = train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "part"), resume="latest", **settings)
    assert _max_diff(_tensors(resumed.adapter_path), _tensors(whole.adapter_path)) < 1e-6
    with pytest.raises(TrainingError, match="differ in trigger_token"):
        train(data=str(star_data), trigger="sks", output_dir=str(tmp_path / "part"), resume="latest",
              **{**settings, "steps": 6, "trigger_token": False})


def test_trigger_token_needs_a_trigger(star_data):
    with pytest.raises(TrainingError, match="give the trigger"):
        config_with_preset(None, data=str(star_data), trigger_token=True).validate()


def test_loraplus_moves_the_b_matrices_at_ratio_times_lr(sd1_folder, tmp_path):
    """Adam's first step moves each parameter with a gradient by about lr; LoRA's A starts with none (B = 0), so
    after one step max|B| is lr, and ratio·lr under LoRA+. A method without B matrices refuses the setting."""
    data = tmp_path / "one"
    data.mkdir()
    Image.fromarray(world.render(world.Spec("star", "red", "blue", "large", "center"), 0)).save(data / "a.png")
    (data / "a.txt").write_text("a red sks", encoding="utf-8")
    run = dict(model=str(sd1_folder), data=str(data), steps=1, batch_size=1, lr=1e-3, preview_every=0,
               tensorboard=False, progress_bar=False, seed=0)
    largest = {}
    for ratio in (1.0, 16.0):
        result = train(**run, loraplus_ratio=ratio, output_dir=str(tmp_path / f"r{ratio:g}"), name="x")
        tensors = _tensors(result.adapter_path)
        largest[ratio] = max(float(v.abs().max()) for k, v in tensors.items() if ".lora_B." in k)
    assert largest[1.0] == pytest.approx(1e-3, rel=0.01)
    assert largest[16.0] == pytest.approx(16e-3, rel=0.01)
    with pytest.raises(TrainingError, match="loraplus_ratio .* the sara adapter has none"):
        train(**run, method="sara", loraplus_ratio=16.0, output_dir=str(tmp_path / "sara"), name="x")


def test_the_consistency_loss_starts_at_log_2_and_falls_as_the_adapter_beats_the_reference(tmp_path, star_data):
    """dco_beta (SODA's official loss): with the adapter at identity the model's error equals the reference's on
    every sample, so the first step's loss is exactly log 2; training drives it below (the adapted model's error
    falls under the base model's on the concept); a negative β is refused."""
    import math

    from studio.training.objectives import consistency_loss

    e, ref = torch.tensor([0.20, 0.10]), torch.tensor([0.25, 0.10])
    want = float(-(torch.nn.functional.logsigmoid(-1000 * (e - ref))).mean())
    assert math.isclose(float(consistency_loss(e, ref, 1000.0)), want, rel_tol=1e-6)
    losses = {}

    def on_event(event):
        if event["kind"] == "step":
            losses[event["step"]] = event["loss"]

    result = train(data=str(star_data), trigger="sks", method="soda", steps=30, lr=1e-2, batch_size=4,
                   dco_beta=1000.0, output_dir=str(tmp_path / "run"), preview_every=0, tensorboard=False,
                   progress_bar=False, on_event=on_event)
    assert result.steps == 30
    assert math.isclose(losses[1], math.log(2), rel_tol=1e-5), losses[1]
    late = sum(losses[s] for s in range(21, 31)) / 10
    assert late < 0.9 * math.log(2), late
    with pytest.raises(TrainingError, match="dco_beta"):
        TrainConfig(data=str(star_data), dco_beta=-1.0).validate()
