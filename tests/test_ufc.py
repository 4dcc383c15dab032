"""UFC (Nguyen et al. 2025) on the embedded model: the matching mechanism's behaviour (silent at initialisation; the
control signal depends on the support set but not on its order), the few-shot parameter set, episodic training
through the engine (every batch one condition kind) and generation from the saved support set."""

import numpy as np
import pytest
import torch
from PIL import Image

from studio.adapters import AdapterError, get_method, read_adapter
from studio.adapters.control import UFCConfig, set_control
from studio.adapters.control.inject import to_tensor
from studio.adapters.control.inject import denoiser_latents
from studio.loading import load_pipeline
from studio.shapes import world
from studio.shapes.conditions import world_condition

SPECS = [world.Spec("circle", "red", "gray", "large", "left"), world.Spec("square", "blue", "white", "small", "top"),
         world.Spec("triangle", "green", "black", "large", "right")]


def _latents(pipe, images: list[np.ndarray]) -> torch.Tensor:
    pixels = torch.stack([to_tensor(i)[0] for i in images]) * 2 - 1
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor


def _conditions(pipe, kind: str, specs) -> torch.Tensor:
    return denoiser_latents(pipe.vae, torch.stack([to_tensor(world_condition(kind, s, 0))[0] for s in specs]))


def _attached(config: UFCConfig):
    torch.manual_seed(0)
    pipe = load_pipeline("shapes")
    get_method("ufc").attach(pipe, config, "u")
    return pipe, pipe._studio_control["modules"]["u"].module


def test_matching_is_silent_at_first_and_reads_the_support_set_but_not_its_order():
    pipe, module = _attached(UFCConfig(support=3))
    images = _latents(pipe, [world.render(s, 0) for s in SPECS])
    module.set_support(images, _conditions(pipe, "mask", SPECS))
    query = _conditions(pipe, "mask", [world.Spec("circle", "red", "gray", "large", "center")])
    t = torch.tensor([500])
    with torch.no_grad():
        down, mid = module(pipe.unet, query, t)
        assert all(float(d.abs().max()) == 0.0 for d in down) and float(mid.abs().max()) == 0.0
        g = torch.Generator().manual_seed(1)
        for m in module.matching:  # the zero-initialised output and AdaLN layers made non-zero
            for p in (*m.zero.parameters(), *m.time.parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        down, mid = module(pipe.unet, query, t)
        assert float(mid.abs().max()) > 1e-3
        order = torch.tensor([2, 0, 1])  # the same pairs in another order: attention over a set
        module.set_support(images[order], _conditions(pipe, "mask", [SPECS[i] for i in order]))
        down_2, mid_2 = module(pipe.unet, query, t)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(down + [mid], down_2 + [mid_2]))
        # the same support images with other conditions (outlines), and then other pairs: another signal
        module.set_support(images, _conditions(pipe, "edges", SPECS))
        _, mid_3 = module(pipe.unet, query, t)
        others = [world.Spec("circle", "yellow", "black", "small", "bottom")] * 3
        module.set_support(_latents(pipe, [world.render(s, 1) for s in others]), _conditions(pipe, "mask", others))
        _, mid_4 = module(pipe.unet, query, t)
    for other in (mid_3, mid_4):
        assert (other - mid).abs().max() > 1e-2 * mid.abs().max()
    # and another timestep changes it through AdaLN_t (the support's image features modulated, the gate)
    with torch.no_grad():
        assert (module(pipe.unet, query, torch.tensor([50]))[1] - mid_4).abs().max() > 0


def test_the_few_shot_set_is_the_label_encoders_biases_and_the_matching_modules():
    pipe, module = _attached(UFCConfig(tune="bias"))
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("matching.") or n.endswith("bias") for n in trained)
    assert {n for n in trained if n.startswith("matching.")} == {n for n, _ in module.matching.named_parameters(
        prefix="matching")}
    weights = [n for n, _ in module.label_encoder.named_parameters() if n.endswith("weight")]
    assert weights and not any(f"label_encoder.{n}" in trained for n in weights)


def test_ufc_is_refused_on_sdxl_with_the_reason(sdxl_folder):
    pipe = load_pipeline(str(sdxl_folder))
    with pytest.raises(AdapterError, match="SD 1.x-family UNets; this UNet reads added conditioning"):
        get_method("ufc").attach(pipe, UFCConfig(), "u")


def test_episodes_are_one_kind_and_the_saved_support_set_steers_generation(tmp_path, monkeypatch):
    """Meta-training on masks and outlines: every batch the loss sees holds pairs of one kind; the file keeps a
    support set of `support` pairs; loaded, with a mask, it draws another image than the base model, and at
    scale 0 the base model's image."""
    from studio.adapters.control.ufc import UFCMethod
    from studio.tasks.control import control_config
    from studio.training.engine import train

    config = control_config(method="ufc", condition="mask,edges", examples=8, steps=3, batch_size=3, lr=1e-2,
                            output_dir=str(tmp_path / "run"), preview_every=0, checkpoint_every=1000,
                            tensorboard=False, progress_bar=False, adapter={"support": 2})
    conditions = {p: to_tensor(np.asarray(Image.open(p).convert("RGB")))[0]
                  for p in sorted((tmp_path / "run" / "data" / "conditions").glob("*.png"))}
    assert {p.name.split("_")[0] for p in conditions} == {"mask", "edges"}
    seen = []
    real = UFCMethod.training_loss

    def spy(self, pipe, batch, default_loss):
        kinds = set()
        for row in batch["control"].cpu():
            match = [p for p, c in conditions.items() if torch.allclose(c, row, atol=1 / 255)]
            kinds.add(match[0].name.split("_")[0])
        seen.append(kinds)
        return real(self, pipe, batch, default_loss)

    monkeypatch.setattr(UFCMethod, "training_loss", spy)
    result = train(config)
    assert result.steps == 3 and len(seen) == 3 and all(len(k) == 1 for k in seen)
    file = read_adapter(result.adapter_path)
    assert file.tensors["ufc.support_latents"].shape == file.tensors["ufc.support_conditions"].shape == (2, 4, 16, 16)

    def draw(pipe):
        return pipe("a red circle on a gray background", num_inference_steps=4, height=128, width=128,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    mask = world_condition("mask", world.Spec("circle", "red", "gray", "large", "left"), 0)
    plain = draw(load_pipeline("shapes"))
    pipe = load_pipeline("shapes", control={"adapter": result.adapter_path, "image": mask})
    assert np.abs(draw(pipe) - plain).max() > 1e-3
    set_control(pipe, [{"adapter": next(iter(pipe._studio_control["modules"])), "image": mask, "scale": 0.0}])
    assert np.array_equal(draw(pipe), plain)


def test_an_episode_needs_more_pairs_than_the_support_set(tmp_path):
    from studio.tasks.control import control_config
    from studio.training.engine import train

    config = control_config(method="ufc", condition="mask", examples=4, steps=1, batch_size=2,
                            output_dir=str(tmp_path / "run"), preview_every=0, tensorboard=False,
                            progress_bar=False, adapter={"support": 2})
    with pytest.raises(AdapterError, match="use batch_size >= 3"):
        train(config)
