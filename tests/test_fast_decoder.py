"""The fast decoder (diffusers' AutoencoderTiny distilled from the shapes VAE): distillation brings its decoding
towards the VAE's, the pretrain stage writes a folder `load_pipeline(fast_decoder=...)` decodes with, and a decoder
of other latents is refused with the reason."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from studio.loading import StudioError, load_pipeline
from studio.shapes import embedded, world
from studio.shapes.fast_decoder import TINY_CONFIG, distill_fast_decoder, fast_decoder_report, vae_targets
from studio.shapes.renders import render_set, world_sample


def _renders(n: int, seed: int) -> torch.Tensor:
    specs, seeds = world_sample(n, seed, world.V2.shapes, heldout=None)
    return torch.from_numpy(render_set(specs, seeds, workers=1))


def test_distillation_brings_the_decoding_towards_the_vaes():
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(embedded.SHAPES_DIR / "vae")
    images = _renders(48, 1)
    latents, decoded = vae_targets(vae, images[-8:])
    torch.manual_seed(0)
    before = fast_decoder_report(AutoencoderTiny(**TINY_CONFIG).eval(), latents, decoded, images[-8:])
    tiny, report = distill_fast_decoder(vae, images, steps=60, batch=8, lr=3e-3, log=lambda _: None)
    assert report["steps"] == 60
    assert report["psnr_vs_vae_db"] > before["psnr_vs_vae_db"] + 3
    assert report["encoder_latent_rmse"] < before["encoder_latent_rmse"]


def test_the_stage_writes_a_fast_decoder_that_generation_decodes_with(tmp_path):
    from studio.shapes.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(init_from=str(embedded.SHAPES_DIR), decoder_images=32, decoder_steps=2), tmp_path,
             stages=("fast_decoder",))
    folder = tmp_path / "fast_decoder"
    pipe = load_pipeline("shapes", fast_decoder=str(folder))
    assert isinstance(pipe.vae, AutoencoderTiny)
    image = pipe("a red circle on a gray background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_a_fast_decoder_of_other_latents_is_refused_with_the_reason(tmp_path, monkeypatch):
    AutoencoderTiny(**{**TINY_CONFIG, "latent_channels": 16}).save_pretrained(tmp_path / "tiny16")
    with pytest.raises(StudioError, match="a fast decoder of 16 latent channels; the model's latents have 4"):
        load_pipeline("shapes", fast_decoder=str(tmp_path / "tiny16"))
    with pytest.raises(StudioError, match="cannot be loaded as a fast decoder"):
        load_pipeline("shapes", fast_decoder=str(tmp_path / "nothing"), offline=True)
    monkeypatch.setattr(embedded, "FAST_DECODER_DIR", tmp_path / "not_shipped")
    with pytest.raises(StudioError, match="the embedded model's fast decoder is not shipped yet"):
        load_pipeline("shapes", fast_decoder="shapes")


def test_control_reads_its_image_through_a_fast_decoders_encoder(tmp_path):
    """A control method that encodes its image (UFC, the transformers' ControlNet) works with the VAE swapped for
    an AutoencoderTiny, whose encoder gives the denoiser's latents itself."""
    from studio.adapters.control.inject import denoiser_latents

    torch.manual_seed(0)
    tiny = AutoencoderTiny(**TINY_CONFIG).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny.encode(images * 2 - 1).latents
    assert torch.equal(denoiser_latents(tiny, images), expected)
    vae = AutoencoderKL.from_pretrained(embedded.SHAPES_DIR / "vae")
    with torch.no_grad():
        mode = vae.encode(images * 2 - 1).latent_dist.mode()
    assert torch.allclose(denoiser_latents(vae, images), mode * vae.config.scaling_factor)
