"""ControlNet on the diffusion transformers (tiny random SD3 and Flux pipelines from conftest): studio's hook on the
transformer gives what diffusers' own SD3 / Flux ControlNet pipeline gives with the same ControlNet, scale and step
window; a ControlNet trains through the engine, loads from its file and from its exported diffusers folder, and
steers the image; the UNet-only control methods are refused with the reason."""

import numpy as np
import pytest
import torch

from studio.adapters import get_method
from studio.adapters.base import AdapterError
from studio.adapters.control import ControlNetConfig, set_control
from studio.loading import StudioError, load_pipeline
from studio.shapes import world
from studio.shapes.conditions import world_condition

FAMILIES = ("sd3", "flux")
SIZE = 32  # pixels
SPEC = world.Spec("circle", "red", "gray", "large", "left")
RUN = dict(batch_size=1, preview_every=0, checkpoint_every=1000, tensorboard=False, progress_bar=False,
           buckets=False, seed=0, resolution=SIZE)


@pytest.fixture
def folder(request):
    return request.getfixturevalue(f"{request.param}_folder")


def _draw(pipe, steps=4, seed=0, **extra):
    flux = "flux" in type(pipe).__name__.lower()
    return pipe("a red circle on a gray background", num_inference_steps=steps, height=SIZE, width=SIZE,
                output_type="latent", generator=torch.Generator().manual_seed(seed),
                guidance_scale=3.5 if flux else 5.0, **extra).images


def _attached(folder):
    pipe = load_pipeline(str(folder))
    get_method("controlnet").attach(pipe, ControlNetConfig(), "cn")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised projections made non-zero, so the ControlNet acts
        for p in pipe._studio_control["modules"]["cn"].module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_the_transformer_hook_matches_diffusers_controlnet_pipeline(folder, monkeypatch):
    """Our pre-hook on the transformer against StableDiffusion3ControlNetPipeline / FluxControlNetPipeline with
    the same ControlNet: scale 0.7, controlled for the first 60% of 4 steps. The pipelines sample the control
    image's VAE posterior and the hook takes its mode; the posterior is made a point here so the two compare."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from studio.adapters.control.inject import fit_image, to_tensor
    from studio.pipelines.control import controlnet_pipeline

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    pipe = _attached(folder)
    plain = _draw(pipe)
    # at the output's size: the pipelines take their height and width from the control image
    mask = fit_image(to_tensor(world_condition("mask", SPEC, 0)), SIZE, SIZE)
    set_control(pipe, [{"adapter": "cn", "image": mask, "scale": 0.0}])
    assert torch.equal(_draw(pipe), plain)  # scale 0: the uncontrolled latents exactly
    set_control(pipe, [{"adapter": "cn", "image": mask, "scale": 0.7, "start": 0.0, "end": 0.6}])
    ours = _draw(pipe)
    assert (ours - plain).abs().max() > 1e-3
    # the pipelines normalise a PIL image to the VAE's [-1, 1] and take a tensor as it is: the same image, unrounded
    theirs = _draw(controlnet_pipeline(pipe), control_image=mask * 2 - 1, controlnet_conditioning_scale=0.7,
                   control_guidance_start=0.0, control_guidance_end=0.6)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_a_controlnet_trains_on_the_transformer_and_steers_from_its_file_and_its_diffusers_folder(folder, tmp_path):
    import diffusers

    from studio.adapters import read_adapter
    from studio.adapters.control import export_controlnet
    from studio.shapes.conditions import write_control_set
    from studio.tasks.control import control_config
    from studio.training.engine import train

    images, conditions = write_control_set(tmp_path / "data", "mask", 4)
    config = control_config(model=str(folder), method="controlnet", data=str(images), control_data=str(conditions),
                            steps=3, lr=1e-2, output_dir=str(tmp_path / "run"), **RUN)
    assert config.timestep_bias == "none" and not config.x0_weighting  # flow matching's own σ density
    result = train(config)
    assert result.steps == 3
    file = read_adapter(result.adapter_path)
    kind = file.config["controlnet_class"]
    assert kind == {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}[file.base["family"]]
    mask = world_condition("mask", SPEC, 0)
    plain = _draw(load_pipeline(str(folder)))
    controlled = _draw(load_pipeline(str(folder), control={"adapter": result.adapter_path, "image": mask}))
    assert (controlled - plain).abs().max() > 1e-4  # the trained zero projections moved: it steers

    exported = export_controlnet(result.adapter_path, tmp_path / "cn_folder")
    model = getattr(diffusers, kind).from_pretrained(exported)
    saved = {k[len("controlnet."):]: v for k, v in file.tensors.items() if k.startswith("controlnet.")}
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    from_folder = _draw(load_pipeline(str(folder), control={"adapter": str(exported), "image": mask}))
    assert torch.equal(from_folder, controlled)


@pytest.mark.parametrize("method", ["t2i_adapter", "controlnext"])
def test_the_unet_only_control_methods_are_refused_on_a_transformer(method, sd3_folder):
    from studio.adapters.control.config import ControlNeXtConfig, T2IAdapterConfig

    pipe = load_pipeline(str(sd3_folder))
    config = {"t2i_adapter": T2IAdapterConfig, "controlnext": ControlNeXtConfig}[method]()
    with pytest.raises(AdapterError, match=f"{method} needs a UNet model; sd3 is a diffusion transformer"):
        get_method(method).attach(pipe, config, "c")


def test_a_controlnet_of_another_family_is_refused_with_the_reason(sd3_folder, flux_folder, tmp_path):
    folder = tmp_path / "flux_cn"
    _attached(flux_folder)._studio_control["modules"]["cn"].module.save_pretrained(folder)
    with pytest.raises(StudioError, match="a FluxControlNetModel, but the loaded model's transformer "
                                           r"\(SD3Transformer2DModel\) takes a SD3ControlNetModel"):
        load_pipeline(str(sd3_folder), control={"adapter": str(folder), "image": np.zeros((SIZE, SIZE, 3), np.uint8)})
