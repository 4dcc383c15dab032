"""Control adapters: conditions from the shapes world and the weight-free annotators, ControlNeXt and ControlNet
through one hook (identity at step 0 and at scale 0, resizing and refusing control images, the step window as
diffusers' ControlNet pipeline has it), training through the engine, and files diffusers loads."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import unet_out
from studio import load_pipeline
from studio.shapes import world
from studio.adapters import AdapterError, base_fingerprint, get_method, load_adapters, save_adapter
from studio.adapters.control import (ControlNeXtConfig, ControlNetConfig, T2IAdapterConfig, control_inputs,
                                     export_controlnet, set_control)
from studio.adapters.control.inject import ControlError
from studio.shapes.conditions import ConditionError, annotate, control_dataset, world_condition, write_control_set

SPEC = world.Spec("triangle", "red", "gray", "large", "center")


def _perturb(pipe, name, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe._studio_control["modules"][name].module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_conditions_from_the_world_and_the_annotators():
    mask = world_condition("mask", SPEC, 3)
    assert mask.shape == (128, 128, 3) and mask.dtype == np.uint8
    assert ((mask[..., 0] > 0) == world.render_mask(SPEC, 3)).all()
    edges = world_condition("edges", SPEC, 3)[..., 0] > 0
    inside = world.render_mask(SPEC, 3)
    assert edges.any() and not (edges & ~inside).any() and edges.sum() < 0.5 * inside.sum()  # the outline only
    # lineart-standard draws dark strokes (a shape darker than its background in every channel, as ink on paper)
    dark = world.Spec("triangle", "black", "white", "large", "center")
    assert (world.render_mask(dark, 3) == inside).all()
    for kind, width in (("canny", 3), ("lineart", 8)):  # lineart-standard's blur (sigma 6) makes wide strokes
        cond = world_condition(kind, dark, 3)[..., 0] > 0
        assert cond.shape == (128, 128) and cond.any()
        # the lines lie along the shape's outline, not deep inside it or on the flat background
        near = np.zeros_like(inside)
        ys, xs = np.nonzero(edges)
        for dy in range(-width, width + 1):
            for dx in range(-width, width + 1):
                near[np.clip(ys + dy, 0, 127), np.clip(xs + dx, 0, 127)] = True
        assert (cond & near).sum() >= 0.9 * cond.sum(), kind
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert not annotate("canny", flat).any()
    with pytest.raises(ConditionError, match="downloaded weights"):
        world_condition("hed", SPEC, 0)
    with pytest.raises(ConditionError, match="unknown condition"):
        world_condition("depthish", SPEC, 0)
    data = control_dataset("mask", 3)
    assert [d.caption for d in data] == [world.caption(d.spec) for d in data]
    assert all((d.condition[..., 0] > 0).sum() == world.render_mask(d.spec, d.seed).sum() for d in data)


def test_two_shape_scenes_and_their_overlaid_conditions():
    import random

    specs = world.random_pair(random.Random(0), heldout=True)
    assert specs[0].shape != specs[1].shape and specs[0].colour == specs[1].colour
    assert {specs[0].position, specs[1].position} in ({"left", "right"}, {"top", "bottom"})
    image = world.render_scene(specs, 5)
    for spec in specs:  # each shape drawn where its mask says, in its colour
        colour = np.array(world.COLOURS[spec.colour])
        assert np.abs(np.median(image[world.render_mask(spec, 5)], axis=0) - colour).max() <= 12
    assert (world.render_scene(specs[:1], 5) == world.render(specs[0], 5)).all()
    assert world.scene_caption(specs) == (f"{world.caption(specs[0], background=False)} and "
                                          f"{world.caption(specs[1], background=False)} on a "
                                          f"{specs[0].background} background")
    data = control_dataset("mask,edges", 6, two_shapes=1.0)
    assert all(len(d.specs) == 2 for d in data)
    d = data[0]  # the first shape's mask and the second's outline, in one image
    cond = d.condition[..., 0] > 0
    first, second = (world.render_mask(s, d.seed) for s in d.specs)
    assert (cond[first]).all() and cond[second].mean() < 0.6 and not (cond & ~first & ~second).any()
    assert [len(e.specs) for e in control_dataset("mask", 6)] == [1] * 6


def test_scene_conditions_as_separate_inputs_train_summed_per_example(tmp_path, monkeypatch):
    from studio import data
    from studio.adapters.control import inject
    from studio.training.engine import train

    images, conditions = write_control_set(tmp_path / "d", "mask,edges", 4, two_shapes=1.0, separate=True)
    for i, ex in enumerate(control_dataset("mask,edges", 4, two_shapes=1.0)):
        got = data.control_images(images / f"mask_edges_{i:05d}.png", conditions, (128, 128))
        assert len(got) == 2
        assert all(np.array_equal(np.asarray(g.convert("RGB")), part) for g, part in zip(got, ex.parts))
        assert np.array_equal(np.maximum(*ex.parts), ex.condition)  # the overlaid image is the parts' maximum
    single, single_conditions = write_control_set(tmp_path / "s", "mask", 1)
    assert len(data.control_images(single / "mask_00000.png", single_conditions, (128, 128))) == 1
    write_control_set(tmp_path / "d", "mask,edges", 4, two_shapes=1.0)  # overlaid, in the same folder:
    assert not list(conditions.glob("*.2.png"))                        # no second inputs left from before
    # a per-example scale: 0 is as if that example had no such input, 1 a full input
    torch.manual_seed(0)
    pipe = load_pipeline("shapes")
    get_method("controlnet").attach(pipe, ControlNetConfig(), "c")
    _perturb(pipe, "c")
    masks = torch.stack([inject.to_tensor(world_condition("mask", SPEC, s))[0] for s in (0, 1)])
    edges = torch.stack([inject.to_tensor(world_condition("edges", SPEC, s))[0] for s in (2, 3)])
    outs = {}
    for what, more in (("one", []), ("two", [inject.ControlInput("c", edges, 1.0)]),
                       ("mixed", [inject.ControlInput("c", edges, torch.tensor([1.0, 0.0]))])):
        with inject.using(pipe, [inject.ControlInput("c", masks, 1.0)] + more):
            outs[what] = unet_out(pipe)
    assert (outs["two"] - outs["one"]).abs().max() > 1e-3
    assert torch.allclose(outs["mixed"][0], outs["two"][0], atol=1e-5)
    assert torch.allclose(outs["mixed"][1], outs["one"][1], atol=1e-5)
    # the engine gives a scene's second condition as a second input, with scale 0 for one-shape examples
    seen = []
    real_using = inject.using
    monkeypatch.setattr(inject, "using", lambda p, inputs: seen.append(inputs) or real_using(p, inputs))
    mixed, mixed_conditions = write_control_set(tmp_path / "m", "mask,edges", 6, two_shapes=0.5, separate=True)
    n_scenes = len(list(mixed_conditions.glob("*.2.png")))
    assert 0 < n_scenes < 6
    train(method="controlnet", data=str(mixed), control_data=str(mixed_conditions), name="m",
          output_dir=str(tmp_path / "run"), steps=1, batch_size=6, lr=1e-4, preview_every=0, checkpoint_every=100,
          progress_bar=False, tensorboard=False)
    (first, second), = seen
    assert first.image.shape[0] == 6 and second.scale.sum() == n_scenes
    # a training image named as another's second input is refused, not silently paired
    import shutil

    from studio.data import DataError

    shutil.copy(mixed / "mask_edges_00001.png", mixed / "mask_edges_00000.2.png")
    shutil.copy(mixed / "mask_edges_00001.txt", mixed / "mask_edges_00000.2.txt")
    shutil.copy(mixed_conditions / "mask_edges_00001.png", mixed_conditions / "mask_edges_00000.2.png")
    with pytest.raises(DataError, match="mask_edges_00000.2.png: named as the control input 2 of mask_edges_00000"):
        train(method="controlnet", data=str(mixed), control_data=str(mixed_conditions), name="m2",
              output_dir=str(tmp_path / "run2"), steps=1, batch_size=6, lr=1e-4, preview_every=0,
              checkpoint_every=100, progress_bar=False, tensorboard=False)


def test_controlnext_cross_normalises_to_the_hidden_state_and_reads_the_timestep():
    """ControlNeXt as its paper: no zero gate, so the fresh module already steers the UNet; the term it adds has,
    per sample, the mean and std of the UNet's hidden state after conv_in (Cross Normalization), whatever the
    scale of its raw feature; and it depends on the timestep (its blocks read the time embedding)."""
    from studio.adapters.control.controlnext import ControlNeXtEncoder, default_widths

    assert default_widths(320, 8) == [64, 128, 256]  # the paper's widths at SD 1.5's UNet
    pipe = load_pipeline("shapes")
    base = unet_out(pipe)
    get_method("controlnext").attach(pipe, ControlNeXtConfig(), "c")
    module = pipe._studio_control["modules"]["c"].module
    assert isinstance(module, ControlNeXtEncoder) and not hasattr(module, "gate")
    set_control(pipe, [{"adapter": "c", "image": world_condition("mask", SPEC, 0)}])
    assert (unet_out(pipe) - base).abs().max() > 1e-3             # step 0 already steers it
    torch.manual_seed(0)
    image = torch.rand(2, 3, 128, 128)
    hidden = torch.randn(2, 64, 16, 16) * torch.tensor([0.3, 4.0]).view(2, 1, 1, 1) + torch.tensor([1.0, -2.0]).view(
        2, 1, 1, 1)
    with torch.no_grad():
        raw = module.feature(image, 500)
        term = module(image, hidden, 500)
        dims = (1, 2, 3)
        torch.testing.assert_close(term.mean(dims), hidden.mean(dims), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(term.std(dims), hidden.std(dims), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(raw.std(dims), hidden.std(dims), rtol=0.1)
        assert (module.feature(image, 900) - raw).abs().max() > 1e-3 * raw.abs().max()
    # the module at 10x the learning rate of the UNet layers tuned beside it (the attention output projections)
    method = get_method("controlnext")
    params = method.trainable_parameters(pipe, "c")
    groups = method.optimizer(pipe, "c", params, lr=1e-4, weight_decay=0.0).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in module.parameters()}
    assert len(groups[1]["params"]) == sum(".to_out." in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("method,config", [("controlnet", ControlNetConfig())])
def test_zero_initialised_paths_leave_the_base_output_unchanged(method, config):
    pipe = load_pipeline("shapes")
    base = unet_out(pipe)
    get_method(method).attach(pipe, config, "c")
    set_control(pipe, [{"adapter": "c", "image": world_condition("mask", SPEC, 0)}])
    assert torch.equal(unet_out(pipe), base)                      # step 0: exactly the base model
    _perturb(pipe, "c")
    moved = unet_out(pipe)
    assert (moved - base).abs().max() > 1e-3                      # a trained adapter steers it
    set_control(pipe, [{"adapter": "c", "image": world_condition("mask", SPEC, 0), "scale": 0.0}])
    assert torch.equal(unet_out(pipe), base)                      # scale 0: exactly the base model
    with get_method(method).disabled(pipe):
        set_control(pipe, [{"adapter": "c", "image": world_condition("mask", SPEC, 0)}])
        assert torch.equal(unet_out(pipe), base)
    assert (unet_out(pipe) - moved).abs().max() == 0


def _images(pipe, steps=2, **kwargs):
    return np.stack([np.asarray(im) for im in pipe(["a red triangle on a gray background"], num_inference_steps=steps,
                                                   guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                                                   **kwargs).images])


def test_scale_zero_reproduces_the_uncontrolled_image_and_wrong_sizes(tmp_path):
    torch.manual_seed(0)  # the modules' initialisation
    pipe = load_pipeline("shapes")
    plain, plain_out = _images(pipe), unet_out(pipe)
    for method, config in (("controlnext", ControlNeXtConfig()), ("controlnet", ControlNetConfig())):
        get_method(method).attach(pipe, config, method)
        _perturb(pipe, method)
    mask = world_condition("mask", SPEC, 0)
    set_control(pipe, [{"adapter": "controlnext", "image": mask, "scale": 0.0},
                       {"adapter": "controlnet", "image": mask, "scale": 0.0}])
    assert np.array_equal(_images(pipe), plain)
    set_control(pipe, [{"adapter": "controlnext", "image": mask}])
    controlled = _images(pipe)
    assert np.abs(controlled.astype(int) - plain).max() > 10  # a (perturbed) adapter steers the image
    # a control image of another size but the same shape is resized: 2x larger (each pixel doubled) shrinks back
    # to the original (area averaging) and steers the denoiser as it does, up to rounding
    from PIL import Image

    controlled_out = unet_out(pipe)
    large = Image.fromarray(mask).resize((256, 256), Image.NEAREST)
    set_control(pipe, [{"adapter": "controlnext", "image": large}])
    effect = (controlled_out - plain_out).abs().mean()
    assert (unet_out(pipe) - controlled_out).abs().mean() < 0.01 * effect
    # another aspect ratio is refused, and so are unknown adapters and empty windows
    set_control(pipe, [{"adapter": "controlnext", "image": np.zeros((128, 64, 3), np.uint8)}])
    with pytest.raises(ControlError, match="aspect ratio differs"):
        _images(pipe)
    with pytest.raises(ControlError, match="no control adapter named"):
        set_control(pipe, [{"adapter": "nope", "image": mask}])
    with pytest.raises(ControlError, match="0 <= start < end <= 1"):
        set_control(pipe, [{"adapter": "controlnet", "image": mask, "start": 0.8, "end": 0.2}])


def test_window_and_scale_match_diffusers_controlnet_pipeline(tmp_path):
    from studio.pipelines.control import controlnet_pipeline

    pipe = load_pipeline("shapes")
    get_method("controlnet").attach(pipe, ControlNetConfig(), "cn")
    _perturb(pipe, "cn", std=0.02)
    mask = world_condition("mask", SPEC, 0)
    set_control(pipe, [{"adapter": "cn", "image": mask, "scale": 0.7, "start": 0.3, "end": 1.0}])
    ours = _images(pipe, steps=4)
    mask_image = torch.from_numpy(mask).permute(2, 0, 1)[None].float() / 255
    theirs = _images(controlnet_pipeline(pipe), steps=4, image=mask_image,
                     controlnet_conditioning_scale=0.7, control_guidance_start=0.3, control_guidance_end=1.0)
    assert np.abs(ours.astype(int) - theirs).max() <= 1


def _capture_pipeline(monkeypatch):
    import studio.loading

    captured = {}
    real = studio.loading.load_pipeline

    def loader(*args, **kwargs):
        captured["pipe"] = real(*args, **kwargs)
        return captured["pipe"]

    monkeypatch.setattr(studio.loading, "load_pipeline", loader)
    return captured


def test_engine_step_trains_only_the_control_parameters(tmp_path, monkeypatch):
    from studio.adapters.control import ControlNeXtEncoder
    from studio.training.engine import TrainingError, train

    images, conditions = write_control_set(tmp_path / "data", "mask", 4)
    captured = _capture_pipeline(monkeypatch)
    kwargs = dict(method="controlnext", data=str(images), name="cx", output_dir=str(tmp_path / "run"), steps=2,
                  batch_size=2, lr=1e-2, preview_every=0, checkpoint_every=100, progress_bar=False, tensorboard=False,
                  preview_steps=1)
    with pytest.raises(TrainingError, match="--control-data"):
        train(**kwargs)
    result = train(**kwargs, control_data=str(conditions))
    pipe, fresh = captured["pipe"], load_pipeline("shapes")
    unet = dict(fresh.unet.named_parameters())
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, unet[n])}
    assert changed == {n for n in unet if ".attn1.to_out." in n or ".attn2.to_out." in n}  # the paper's choice
    for comp in ("vae", "text_encoder"):
        pairs = zip(getattr(pipe, comp).parameters(), getattr(fresh, comp).parameters())
        assert all(torch.equal(a, b) for a, b in pairs)
    torch.manual_seed(0)
    initial = ControlNeXtEncoder(64, [16, 32, 56]).state_dict()
    trained = pipe._studio_control["modules"]["cx"].module.state_dict()
    assert trained.keys() == initial.keys() and not torch.equal(trained["out.weight"], initial["out.weight"])
    # the file: deltas for the tuned UNet layers only; loading it reproduces the trained model's output
    from studio.adapters import read_adapter

    file = read_adapter(result.adapter_path)
    assert file.method == "controlnext" and {k for k in file.tensors if k.startswith("unet.")} == {
        f"unet.{n}.delta" for n in changed}
    loaded = load_pipeline("shapes", control={"adapter": result.adapter_path, "image": conditions / "mask_00000.png"})
    from PIL import Image

    set_control(pipe, [{"adapter": "cx", "image": Image.open(conditions / "mask_00000.png")}])
    pipe.unet.eval()
    assert torch.allclose(unet_out(loaded), unet_out(pipe), atol=1e-5)
    get_method("controlnext").remove(loaded, "cx")  # its UNet deltas are taken out again
    assert torch.allclose(unet_out(loaded), unet_out(fresh), atol=1e-5)


def test_controlnet_trained_by_the_engine_loads_in_diffusers(tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    from studio.training.engine import train

    images, conditions = write_control_set(tmp_path / "data", "edges", 2)
    captured = _capture_pipeline(monkeypatch)
    result = train(method="controlnet", data=str(images), control_data=str(conditions), name="cn",
                   output_dir=str(tmp_path / "run"), steps=1, batch_size=2, lr=1e-3, preview_every=0,
                   progress_bar=False, tensorboard=False)
    pipe, fresh = captured["pipe"], load_pipeline("shapes")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), fresh.unet.parameters()))
    folder = export_controlnet(result.adapter_path, tmp_path / "cn_diffusers")
    model = ControlNetModel.from_pretrained(folder)
    trained = pipe._studio_control["modules"]["cn"].module
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    # the zero convs moved after one step (so the ControlNet now steers the UNet)
    assert any(p.abs().sum() > 0 for p in model.controlnet_down_blocks.parameters())
    # the folder loads back as a control adapter, and so does the studio file; both give the same output
    a = load_pipeline("shapes", control={"adapter": folder, "image": conditions / "edges_00000.png"})
    b = load_pipeline("shapes", control={"adapter": result.adapter_path, "image": conditions / "edges_00000.png"})
    assert torch.equal(unet_out(a), unet_out(b)) and not torch.equal(unet_out(a), unet_out(fresh))


def test_files_for_another_model_are_refused(tmp_path, sd1_folder):
    pipe = load_pipeline("shapes")
    get_method("controlnext").attach(pipe, ControlNeXtConfig(), "c")
    path = save_adapter(tmp_path / "c.safetensors", "controlnext", ControlNeXtConfig(),
                        get_method("controlnext").state_dict(pipe, "c"), base_fingerprint(pipe))
    other = load_pipeline(sd1_folder)
    with pytest.raises(AdapterError, match="trained for"):
        load_adapters(other, {path: 1.0})
    from studio.loading import StudioError

    with pytest.raises(StudioError, match="not a control adapter"):
        lora = get_method("lora")
        p2 = load_pipeline("shapes")
        from studio.adapters.lora import LoraConfig

        lora.attach(p2, LoraConfig(rank=1), "l")
        lp = save_adapter(tmp_path / "l.safetensors", "lora", LoraConfig(rank=1), lora.state_dict(p2, "l"),
                          base_fingerprint(p2))
        load_pipeline("shapes", control={"adapter": lp, "image": world_condition("mask", SPEC, 0)})
    with pytest.raises(StudioError, match="control image not found"):
        load_pipeline("shapes", control={"adapter": path, "image": tmp_path / "missing.png"})


def test_cli_generate_with_control(tmp_path, capsys):
    import json

    from PIL import Image

    from studio.cli import main

    pipe = load_pipeline("shapes")
    get_method("controlnext").attach(pipe, ControlNeXtConfig(condition="mask"), "c")
    _perturb(pipe, "c")
    path = save_adapter(tmp_path / "mask.safetensors", "controlnext", ControlNeXtConfig(condition="mask"),
                        get_method("controlnext").state_dict(pipe, "c"), base_fingerprint(pipe))
    Image.fromarray(world_condition("mask", SPEC, 0)).save(tmp_path / "cond.png")
    out = tmp_path / "img.png"
    args = ["generate", "a red triangle on a gray background", "--steps", "2", "--out", str(out)]
    assert main(args + ["--control", f"{path}:0.5", "--control-image", str(tmp_path / "cond.png"),
                        "--control-end", "0.5"]) == 0
    meta = json.loads(Image.open(out).info["parameters"])
    assert meta["control"] == [{"adapter": "mask.safetensors", "image": "cond.png", "scale": 0.5, "start": 0.0,
                                "end": 0.5}]
    # the same adapter twice: loaded once, given both images (multi-condition with one adapter)
    Image.fromarray(world_condition("edges", SPEC, 1)).save(tmp_path / "cond2.png")
    assert main(args + ["--control", f"{path}:1.0", "--control-image", str(tmp_path / "cond.png"),
                        "--control", f"{path}:0.7", "--control-image", str(tmp_path / "cond2.png")]) == 0
    meta = json.loads(Image.open(out).info["parameters"])
    assert [(c["image"], c["scale"]) for c in meta["control"]] == [("cond.png", 1.0), ("cond2.png", 0.7)]
    from studio.pipelines.control import load_control

    fresh = load_pipeline("shapes")
    assert load_control(fresh, [{"adapter": path, "image": tmp_path / "cond.png"},
                                {"adapter": path, "image": tmp_path / "cond2.png", "scale": 0.7}]) == ["mask", "mask"]
    assert [(c.adapter, c.scale) for c in control_inputs(fresh)] == [("mask", 1.0), ("mask", 0.7)]
    capsys.readouterr()
    assert main(args + ["--control", str(path)]) == 2
    assert "1 --control adapter(s) but 0 --control-image(s)" in capsys.readouterr().err
    assert main(args + ["--control", str(path), "--control-image", str(tmp_path / "nope.png")]) == 2
    assert "control image not found" in capsys.readouterr().err


def test_t2i_adapter_features_enter_the_down_blocks_and_scale_zero_is_the_base(tmp_path):
    from diffusers import T2IAdapter

    pipe = load_pipeline("shapes")
    base = unet_out(pipe)
    method = get_method("t2i_adapter")
    method.attach(pipe, T2IAdapterConfig(num_res_blocks=1), "t")
    module = pipe._studio_control["modules"]["t"].module
    assert isinstance(module, T2IAdapter)
    feats = module(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (96, 8, 8), (128, 4, 4)]  # one per down block
    mask = world_condition("mask", SPEC, 0)
    set_control(pipe, [{"adapter": "t", "image": mask, "scale": 0.0}])
    assert torch.equal(unet_out(pipe), base)
    set_control(pipe, [{"adapter": "t", "image": mask}])
    steered = unet_out(pipe)
    assert (steered - base).abs().max() > 1e-3   # not zero-initialised (as in the paper): it acts from the start
    path = save_adapter(tmp_path / "t.safetensors", "t2i_adapter", pipe._studio_control["modules"]["t"].config,
                        method.state_dict(pipe, "t"), base_fingerprint(pipe))
    other = load_pipeline("shapes", control={"adapter": path, "image": mask})
    assert torch.equal(unet_out(other), steered)


def test_control_training_defaults_to_the_layout_timesteps(tmp_path):
    from studio.adapters.control.method import LAYOUT_TIMESTEPS
    from studio.cli import build_parser, control_train_config
    from studio.training.engine import config_with_preset

    images, conditions = write_control_set(tmp_path / "data", "mask", 2)
    base = ["control-train", "--method", "t2i_adapter", "--data", str(images), "--control-data", str(conditions),
            "--output-dir", str(tmp_path / "run")]
    cfg = control_train_config(build_parser().parse_args(base))
    assert {k: getattr(cfg, k) for k in LAYOUT_TIMESTEPS} == LAYOUT_TIMESTEPS and LAYOUT_TIMESTEPS["x0_weighting"]
    plain = control_train_config(build_parser().parse_args(base + ["--timestep-bias", "none", "--no-x0-weighting"]))
    assert plain.timestep_bias == "none" and plain.x0_weighting is False
    preset = config_with_preset("quick", method="controlnet", data=str(images), control_data=str(conditions))
    assert preset.timestep_bias == "later" and preset.lr == 1e-4
    assert config_with_preset(None, data=str(images)).timestep_bias == "none"  # other methods: unchanged
    # rendered data with two-shape scenes: each scene's second condition is a second input (NAME.2.png)
    scenes = ["control-train", "--method", "t2i_adapter", "--condition", "mask,edges", "--examples", "8",
              "--output-dir", str(tmp_path / "scenes")]
    cfg = control_train_config(build_parser().parse_args(scenes + ["--two-shapes", "0.5"]))
    seconds = sorted(p.name for p in Path(cfg.control_data).glob("*.2.png"))
    assert seconds and all((Path(cfg.control_data) / name.replace(".2.png", ".png")).is_file() for name in seconds)
    from studio.loading import StudioError

    with pytest.raises(StudioError, match="--two-shapes is a fraction"):
        control_train_config(build_parser().parse_args(scenes + ["--two-shapes", "2"]))


def test_few_shot_starts_from_a_trained_adapter_and_tunes_only_its_biases(tmp_path, monkeypatch):
    """UFC-style adaptation to a new condition kind: the module starts from an adapter trained on other kinds
    (`init_from`) and only its bias vectors move (`tune="bias"`); the weights stay those it was trained with."""
    from studio.adapters import read_adapter
    from studio.training.engine import TrainingError, train

    box = world_condition("box", SPEC, 3)[..., 0] > 0
    ys, xs = np.nonzero(world.render_mask(SPEC, 3))
    assert box[ys.min(), xs.min():xs.max() + 1].all() and box[ys.min():ys.max() + 1, xs.max()].all()
    assert not box[ys.min() + 3:ys.max() - 2, xs.min() + 3:xs.max() - 2].any()  # an outline, 2 px wide
    scribble = world_condition("scribble", SPEC, 3)[..., 0] > 0
    inside = world.render_mask(SPEC, 3)
    assert 50 < scribble.sum() < 0.5 * inside.sum() and not (scribble & ~inside).any()  # strokes over the shape
    assert (world_condition("scribble", SPEC, 3) == world_condition("scribble", SPEC, 3)).all()
    assert not (world_condition("scribble", SPEC, 4) == world_condition("scribble", SPEC, 3)).all()
    seen_images, seen_conditions = write_control_set(tmp_path / "seen", "mask,edges", 4)
    names = sorted(p.name for p in seen_conditions.iterdir())
    assert len(names) == 4 and names[0].startswith("mask_edges_")
    common = dict(method="t2i_adapter", steps=2, batch_size=2, lr=1e-2, preview_every=0, checkpoint_every=100,
                  progress_bar=False, tensorboard=False)
    source = train(data=str(seen_images), control_data=str(seen_conditions), name="seen",
                   output_dir=str(tmp_path / "seen_run"), adapter={"condition": "mask,edges"}, **common).adapter_path
    images, conditions = write_control_set(tmp_path / "new", "box", 4)
    captured = _capture_pipeline(monkeypatch)
    result = train(data=str(images), control_data=str(conditions), name="few", output_dir=str(tmp_path / "few_run"),
                   adapter={"condition": "box", "init_from": str(source), "tune": "bias"}, **common)
    start, tuned = read_adapter(source), read_adapter(result.adapter_path)
    biases = [k for k in start.tensors if k.endswith("bias")]
    assert result.trainable_parameters == sum(start.tensors[k].numel() for k in biases) < 0.05 * sum(
        t.numel() for t in start.tensors.values())
    assert all(torch.equal(start.tensors[k], tuned.tensors[k]) for k in start.tensors if k not in biases)
    assert any(not torch.equal(start.tensors[k], tuned.tensors[k]) for k in biases)
    assert tuned.config["condition"] == "box" and tuned.config["adapter_config"] == start.config["adapter_config"]
    module = captured["pipe"]._studio_control["modules"]["few"].module
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {k.split(".", 1)[1] for k in biases}
    with pytest.raises(AdapterError, match="t2i_adapter adapter; a controlnext adapter starts only"):
        train(**{**common, "method": "controlnext"}, data=str(images), control_data=str(conditions), name="x",
              output_dir=str(tmp_path / "x"), adapter={"init_from": str(source)})
    with pytest.raises(TrainingError, match="tune takes all or bias"):  # refused with the settings, before any work
        train(data=str(images), control_data=str(conditions), name="y", output_dir=str(tmp_path / "y"),
              adapter={"tune": "weights"}, **common)


def test_control_train_defaults_to_the_measured_recipe(tmp_path):
    """No method and no preset: T2I-Adapter at B5's recipe; a preset or a given setting replaces its part."""
    from studio.tasks.control import control_config

    plain = control_config(output_dir=str(tmp_path / "a"), render=False)
    assert (plain.method, plain.steps, plain.batch_size, plain.lr) == ("t2i_adapter", 1200, 8, 1e-3)
    quick = control_config(preset="quick", output_dir=str(tmp_path / "b"), render=False)
    assert (quick.steps, quick.batch_size) == (300, 4)
    assert control_config(steps=50, output_dir=str(tmp_path / "c"), render=False).steps == 50
