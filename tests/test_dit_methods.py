"""The methods that drive the denoiser themselves, on the diffusion transformers (tiny random SD3 and Flux pipelines
from conftest): SPM's training latents follow the pipeline's own sampler, a membrane trained on the transformer
moves the prediction towards the erase target, and Facilitated Transport leaves other prompts exactly as the base
model draws them."""

import numpy as np
import pytest
import torch

from studio.loading import load_pipeline

FAMILIES = ("sd3", "flux")
SIZE = 16  # pixels


@pytest.fixture
def folder(request):
    return request.getfixturevalue(f"{request.param}_folder")


def _settings(**values):
    from studio.adapters.spm.config import EraseSettings

    return EraseSettings(**{"denoise_steps": 3, "resolution": SIZE, "batch": 2, **values})


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_the_erase_latents_follow_the_pipelines_own_sampler(folder):
    """Running the erase schedule to its end with the erase loss's denoiser call gives the latents the pipeline
    itself generates from the same noise (same prompt encoding, timesteps, guidance and step)."""
    from diffusers import FluxPipeline

    from studio.adapters.spm import SpmConfig
    from studio.adapters.spm.erase import denoise, erase_targets
    from studio.adapters.denoise import denoiser_call, guidance_distilled

    pipe = load_pipeline(str(folder))
    flux = guidance_distilled(pipe)
    guidance = 1.0 if flux else 3.0
    settings = _settings(sample_guidance=guidance)
    targets = erase_targets(pipe, SpmConfig(concepts=["circle"], prompts=["a red circle"]), settings)
    noise = torch.randn((1, *targets.latent_shape), generator=torch.Generator().manual_seed(0))
    call = denoiser_call(pipe, pipe.transformer, targets.pixels)
    with torch.no_grad():
        ours = denoise(call, targets.schedule, noise.clone(), settings.denoise_steps,
                       (targets.target, targets.pooled["target"]),
                       (targets.empty[None], targets.pooled["empty"][None]), guidance)
    if flux:  # FluxPipeline takes and returns packed latents; its guidance (3.5) is the transformer's input
        b, c, h, w = noise.shape
        theirs = pipe("a red circle", latents=FluxPipeline._pack_latents(noise, b, c, h, w), height=SIZE, width=SIZE,
                      num_inference_steps=settings.denoise_steps, guidance_scale=3.5, output_type="latent").images
        theirs = FluxPipeline._unpack_latents(theirs, SIZE, SIZE, pipe.vae_scale_factor)
    else:
        theirs = pipe("a red circle", latents=noise, height=SIZE, width=SIZE, guidance_scale=guidance,
                      num_inference_steps=settings.denoise_steps, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_a_membrane_trained_on_the_transformer_moves_its_prediction_to_the_erase_target(folder, tmp_path):
    """On a fixed draw, the erase loss (distance of the prediction on the concept's prompt from the
    negative-guidance target, plus the anchors') falls below 70% of the untrained membrane's; only the membrane
    trains."""
    from studio.adapters import get_method, read_adapter
    from studio.adapters.spm import SpmConfig
    from studio.adapters.spm.erase import TRAINING_NAME, erase_draw, erase_loss, erase_targets
    from studio.adapters.spm.model import membranes
    from studio.adapters.denoise import denoiser_call
    from studio.tasks.erase import train_membrane

    pipe = load_pipeline(str(folder))
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    config = SpmConfig(concepts=["circle"], prompts=["a red circle", "a large blue circle"])
    settings = _settings(steps=40, lr=5e-2, warmup=1)
    result = train_membrane(pipe, config, settings, tmp_path / "m.safetensors")

    targets = erase_targets(pipe, config, settings)
    draw = erase_draw(targets, config, 2, torch.Generator().manual_seed(123), anchors=True)
    call = denoiser_call(pipe, pipe.transformer, targets.pixels)

    def frozen(x, t, text, pooled=None, grad=True):  # the base model: the untrained membrane is zero
        with get_method("spm").disabled(pipe):
            return call(x, t, text, pooled)

    with torch.no_grad():
        trained = float(erase_loss(call, frozen, targets, config, settings, draw, range(2)))
        untrained = float(erase_loss(frozen, frozen, targets, config, settings, draw, range(2)))
    assert trained < 0.7 * untrained, (trained, untrained)
    for name, p in pipe.transformer.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    file = read_adapter(result.path)
    assert file.base["family"] == ("flux" if "flux" in folder.name else "sd3")
    assert TRAINING_NAME in membranes(pipe)
    # every joint block's attention carries the membrane, image and text streams both
    assert any("add_q_proj" in key for key in file.tensors) and any(".to_q." in key for key in file.tensors)


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_studio_erase_on_a_transformer_erases_per_prompt_and_spares_other_prompts_exactly(folder, tmp_path):
    """`erase()` (the CLI's path) trains a membrane on the transformer; loaded with Facilitated Transport it changes
    the concept's image (strength 1) and leaves a prompt without the concept pixel for pixel the base model's."""
    from studio.pipelines.membranes import load_membranes
    from studio.tasks.erase import erase

    result = erase(["circle"], tmp_path / "m.safetensors", model=str(folder),
                   settings={"steps": 3, "lr": 5e-2, "denoise_steps": 2, "resolution": SIZE, "batch": 1})
    assert result.steps == 3

    def draw(pipe, prompt):
        return pipe(prompt, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base, erased = load_pipeline(str(folder)), load_pipeline(str(folder))
    load_membranes(erased, [str(result.adapter_path)])
    assert np.abs(draw(erased, "a red circle") - draw(base, "a red circle")).max() > 1e-4
    assert next(iter(erased.studio_last_permeability.values())) == [1.0]
    assert np.array_equal(draw(erased, "a red square"), draw(base, "a red square"))


def test_the_esd_baseline_is_refused_on_a_transformer_with_the_reason(sd3_folder):
    from studio.adapters import AdapterError
    from studio.adapters.spm import SpmConfig
    from studio.tasks.erase import erase_esd

    with pytest.raises(AdapterError, match="cross-attention"):
        erase_esd(load_pipeline(str(sd3_folder)), SpmConfig(concepts=["circle"]), _settings(steps=1))


@pytest.mark.parametrize("folder", FAMILIES, indirect=True)
def test_a_one_step_adaptor_distils_on_the_transformer_and_the_pipeline_draws_what_the_student_learned(folder,
                                                                                                       tmp_path):
    """HiPA on a flow model: the teacher is the pipeline's own 3-step sampler; the student, one Euler step from
    σ = 1 (x0 = z − v), trains with the perceptual and adversarial terms on the model's own VAE and moves towards
    the teacher's images; loaded with `one_step=`, the pipeline's one-step image is the student's to float
    precision."""
    from studio.adapters.hipa.config import DistillSettings, HipaConfig
    from studio.adapters.hipa.distill import encode_prompts, make_teacher_pairs, one_step_images
    from studio.adapters.hipa.features import feature_distance, vae_stage_features
    from studio.tasks.distill import distill_adaptor

    pipe = load_pipeline(str(folder))
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    settings = DistillSettings(pairs=4, teacher_steps=3, steps=20, batch=4, lr=1e-2, warmup=2, resolution=SIZE,
                               adversarial_weight=0.1)
    pairs = make_teacher_pairs(pipe, prompts, settings)
    assert pairs.noise.shape[-1] == SIZE // pipe.vae_scale_factor
    embeds = encode_prompts(pipe, prompts)
    teacher = pairs.images.float() / 255

    def error(model) -> float:
        with torch.no_grad():
            return float(((one_step_images(model, pairs.noise, embeds, 1000) - teacher) ** 2).mean())

    before = error(pipe)
    features = vae_stage_features(pipe.vae)
    result = distill_adaptor(pipe, HipaConfig(rank=2, timestep=1000), settings, pairs, tmp_path / "h.safetensors",
                             perceptual=feature_distance(features), features=features)
    after = error(pipe)
    assert result.steps == 20 and after < 0.9 * before, (before, after)
    loaded = load_pipeline(str(folder), one_step=result.path)
    assert loaded.studio_one_step == 1000
    with torch.no_grad():
        student = one_step_images(loaded, pairs.noise, embeds, 1000).clamp(0, 1)
    noise = pairs.noise
    if "flux" in folder.name:  # FluxPipeline takes packed latents
        from diffusers import FluxPipeline

        noise = FluxPipeline._pack_latents(noise, *noise.shape)
        drawn = loaded(prompts, latents=noise, num_inference_steps=1, height=SIZE, width=SIZE, output_type="pt").images
    else:
        drawn = loaded(prompts, latents=noise, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                       output_type="pt").images
    assert torch.allclose(drawn, student, atol=1e-4), float((drawn - student).abs().max())


def test_a_one_step_adaptor_of_a_unet_model_is_refused_on_a_transformer(sd3_folder, tmp_path):
    """A HiPA file made at the UNet's T = 999 names its timestep; a flow model's one step runs at 1000."""
    from studio.adapters import base_fingerprint, get_method, save_adapter
    from studio.adapters.hipa.config import HipaConfig
    from studio.loading import StudioError

    pipe = load_pipeline(str(sd3_folder))
    hipa = get_method("hipa")
    hipa.attach(pipe, HipaConfig(rank=1), "h")
    path = save_adapter(tmp_path / "h.safetensors", "hipa", HipaConfig(rank=1), hipa.state_dict(pipe, "h"),
                        base_fingerprint(pipe))
    with pytest.raises(StudioError, match="trained at timestep 999, but this model's one-step timestep is 1000"):
        load_pipeline(str(sd3_folder), one_step=path)
