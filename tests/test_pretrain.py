"""The pretraining recipe runs end to end on the CPU (at toy sizes) and is reproducible from its seed."""

import json

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from studio.shapes.pretrain import PretrainConfig, pretrain

TOY = dict(vae_images=48, vae_steps=2, vae_batch=4, judge_images=48, judge_steps=2, judge_test_images=8,
           unet_images=48, unet_steps=3, unet_batch=4, layout_fraction=0.5)


def test_all_stages_write_a_loadable_pipeline_and_judge(tmp_path):
    report = pretrain(PretrainConfig(**TOY), tmp_path)
    assert report["unet_steps_done"] == 3
    assert set(report["judge_accuracy"]) == {"fresh_renders", "vae_roundtrip"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "shapes", local_files_only=True)
    assert pipe.vae.config.scaling_factor > 0
    assert (tmp_path / "judge.safetensors").is_file()
    assert json.loads((tmp_path / "pretrain_report_vae_judge_unet.json").read_text())["config"]["seed"] == 0


def test_same_seed_same_weights(tmp_path):
    import shutil

    pretrain(PretrainConfig(**TOY), tmp_path / "a", stages=("vae",))
    shutil.copytree(tmp_path / "a" / "vae_stage", tmp_path / "b" / "vae_stage")
    for run in ("a", "b"):
        pretrain(PretrainConfig(**TOY), tmp_path / run, stages=("unet",))
    a = load_file(str(tmp_path / "a" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_unet_stage_resumes_exactly_from_its_checkpoint(tmp_path):
    """The unet stage runs on the training engine: a run resumed from its step-2 checkpoint ends with the weights
    (EMA in place) of the run that went through."""
    import shutil

    toy = dict(TOY, unet_steps=4, unet_checkpoint_every=2)
    pretrain(PretrainConfig(**toy), tmp_path / "a", stages=("vae",))
    shutil.copytree(tmp_path / "a" / "vae_stage", tmp_path / "b" / "vae_stage")
    pretrain(PretrainConfig(**toy), tmp_path / "a", stages=("unet",))
    shutil.copytree(tmp_path / "a" / "unet_stage", tmp_path / "b" / "unet_stage")
    from studio.training.checkpoint import checkpoint_name

    shutil.rmtree(tmp_path / "b" / "unet_stage" / "checkpoints" / checkpoint_name(4))
    lines = []
    report = pretrain(PretrainConfig(**toy, resume="latest"), tmp_path / "b", stages=("unet",), log=lines.append)
    assert report["unet_steps_done"] == 4
    assert any(line.startswith("resumed from") and line.endswith("at step 2") for line in lines), lines
    a = load_file(str(tmp_path / "a" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_world_v2_continues_from_the_shipped_model(tmp_path):
    """World v2's judge and unet stages start from the shipped judge and model: the judge gains v2's shapes, the
    "none" class and the count head; the text encoder one row per new word, a one-word synonym starting as its
    shape's word; the pipeline written tokenizes every v2 word as one token."""
    from studio.shapes import embedded, world
    from studio.shapes.judge import NONE, load_judge

    toy = dict(TOY, world=2, judge_init=str(embedded.JUDGE_PATH), init_from=str(embedded.SHAPES_DIR), bf16=True,
               judge_outliers=0.25, judge_scenes=0.25)
    report = pretrain(PretrainConfig(**toy), tmp_path, stages=("judge", "unet"))
    assert set(report["judge_accuracy"]) == {"fresh_renders", "vae_roundtrip", "outliers", "scenes"}
    judge = load_judge(tmp_path / "judge.safetensors")
    assert judge.version == 2 and judge.classes["shape"] == world.V2.shapes + (NONE,)
    assert judge.classes["count"] == ("one", "two")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "shapes", local_files_only=True)
    tok = pipe.tokenizer
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in world.V2.vocabulary())
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(tok)


def test_extend_text_encoder_starts_synonyms_as_their_shape():
    from transformers import CLIPTextModel

    from studio.shapes import embedded, world
    from studio.shapes.pretrain import extend_text_encoder

    old = embedded.build_tokenizer(world.V1)
    new = embedded.build_tokenizer(world.V2)
    encoder = CLIPTextModel.from_pretrained(embedded.SHAPES_DIR / "text_encoder")
    before = encoder.get_input_embeddings().weight.detach().clone()
    weight = extend_text_encoder(encoder, old, new, world.V2).get_input_embeddings().weight
    assert weight.shape[0] == len(new) and torch.equal(weight[:len(before)], before)
    ids = {w: new.convert_tokens_to_ids(w + "</w>") for w in ("circle", "disc", "square", "box", "hexagon")}
    assert torch.equal(weight[ids["disc"]], weight[ids["circle"]])
    assert torch.equal(weight[ids["box"]], weight[ids["square"]])
    assert not torch.equal(weight[ids["hexagon"]], weight[ids["circle"]])


def test_the_unet_stage_caches_its_latents_and_renders_again_for_another_vae(tmp_path, monkeypatch):
    """A resumed or repeated unet stage reads its latents from <out>/unet_stage/latents.safetensors instead of
    rendering its images again; a cache written with other VAE weights is not used."""
    import studio.shapes.pretrain as pretrain_module

    pretrain(PretrainConfig(**TOY), tmp_path, stages=("vae", "unet"))
    cache = tmp_path / "unet_stage" / "latents.safetensors"
    assert cache.is_file()
    renders = []
    real = pretrain_module.render_scenes
    monkeypatch.setattr(pretrain_module, "render_scenes", lambda *a, **k: renders.append(1) or real(*a, **k))
    pretrain(PretrainConfig(**TOY), tmp_path, stages=("unet",))
    assert renders == []
    pretrain(PretrainConfig(**{**TOY, "vae_steps": 3}), tmp_path, stages=("vae", "unet"))
    assert renders == [1]


def test_kept_weights_are_fp16_and_a_later_run_continues_from_them_with_the_shipped_vae(tmp_path, monkeypatch):
    """`keep_to` writes the unet stage's UNet and text encoder in fp16 (no VAE: pretraining never changes it); a
    later run with init_from on that folder starts in fp32 from exactly those weights, with the shipped VAE."""
    from safetensors import safe_open

    import studio.shapes.pretrain as pretrain_module
    from studio.shapes import embedded

    toy = dict(TOY, world=2, init_from=str(embedded.SHAPES_DIR), keep_to=str(tmp_path / "kept"), unet_steps=1)
    pretrain(PretrainConfig(**toy), tmp_path / "first", stages=("unet",))
    kept = tmp_path / "kept"
    assert sorted(p.name for p in kept.iterdir()) == ["scheduler", "text_encoder", "tokenizer", "unet"]
    with safe_open(str(kept / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    first = load_file(str(tmp_path / "first" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors"))

    started = {}
    real = pretrain_module._unet_components

    def components(cfg, log):
        comps = real(cfg, log)
        started.update({k: v.clone() for k, v in comps["unet"].state_dict().items()})
        return comps

    monkeypatch.setattr(pretrain_module, "_unet_components", components)
    pretrain(PretrainConfig(**dict(toy, init_from=str(kept), keep_to="")), tmp_path / "second", stages=("unet",))
    assert {v.dtype for v in started.values()} == {torch.float32}
    assert all(torch.equal(started[k], first[k].half().float()) for k in first)
    shipped = load_file(str(embedded.SHAPES_DIR / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(tmp_path / "second" / "shapes" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert vae.keys() == shipped.keys() and all(torch.equal(vae[k], shipped[k]) for k in shipped)
