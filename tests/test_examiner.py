"""The judge is an examiner only: every method's training objective runs with the judge made unloadable (the
loader, the class and the shipped weights file all fail), so no figure comes from training against the measure."""

from pathlib import Path

import pytest

from studio.adapters import method_names


@pytest.fixture
def no_judge(monkeypatch, tmp_path):
    import studio.shapes.embedded as embedded
    import studio.shapes.judge as judge_module

    def refuse(*args, **kwargs):
        raise AssertionError("a training objective asked for the judge")

    monkeypatch.setattr(judge_module, "load_judge", refuse)
    monkeypatch.setattr(judge_module.Judge, "__init__", refuse)
    monkeypatch.setattr(embedded, "JUDGE_PATH", tmp_path / "no-judge.safetensors")


def _steps_done(result) -> int:
    assert Path(result.adapter_path).is_file()
    return result.steps


@pytest.mark.parametrize("method", method_names("concept"))
def test_concept_methods_train_without_the_judge(no_judge, tmp_path, method):
    from studio.bench.evaluate import write_b2_training_set
    from studio.training import train

    write_b2_training_set(tmp_path / "stars")
    result = train(preset="quick", method=method, data=str(tmp_path / "stars"), trigger="sks", steps=2, batch_size=2,
                   output_dir=str(tmp_path / "run"), preview_prompts=[], tensorboard=False, progress_bar=False)
    assert _steps_done(result) == 2


def test_erasing_trains_without_the_judge(no_judge, tmp_path):
    from studio.tasks.erase import erase

    assert _steps_done(erase(["circle"], tmp_path / "m.safetensors", settings={"steps": 2})) == 2


def test_one_step_distillation_trains_without_the_judge(no_judge, tmp_path):
    from studio.tasks.distill import distill

    settings = {"pairs": 4, "teacher_steps": 2, "steps": 2, "batch": 2, "adversarial_weight": 0.1}
    assert _steps_done(distill(tmp_path / "h.safetensors", settings=settings)) == 2


@pytest.mark.parametrize("method", method_names("control"))
def test_control_methods_train_without_the_judge(no_judge, tmp_path, method):
    from studio.tasks.control import control_config
    from studio.training import train

    # batch 4: UFC's episodes need more pairs than its 3 support pairs
    config = control_config(method=method, examples=4, steps=2, batch_size=4, output_dir=str(tmp_path / "run"),
                            preview_prompts=[], tensorboard=False, progress_bar=False)
    assert _steps_done(train(config)) == 2


def test_the_fast_decoder_distils_without_the_judge(no_judge, tmp_path):
    from studio.shapes import embedded
    from studio.shapes.pretrain import PretrainConfig, pretrain

    report = pretrain(PretrainConfig(init_from=str(embedded.SHAPES_DIR), decoder_images=16, decoder_steps=2),
                      tmp_path, stages=("fast_decoder",))
    assert report["fast_decoder"]["steps"] == 2


def test_every_registered_method_is_run_here():
    tested = set(method_names("concept")) | set(method_names("control")) | {"spm", "hipa"}
    assert tested == set(method_names()), "a new method's objective must run in this file"
    assert method_names("erase") == ["spm"] and method_names("one-step") == ["hipa"]
