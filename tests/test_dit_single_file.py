"""SD3 as one original-layout file: the transformer in Stability's MMDiT naming and the VAE, the layout of
`sd3_medium.safetensors` and SD3.5's files. diffusers' own conversion reads it back weight for weight (SD3.5's
QK-norm and dual-attention blocks too), and `load_pipeline` of the file with the config folder draws the
pipeline's image; Flux's original layout is refused with the reason."""

import numpy as np
import pytest
import torch

from studio.loading import load_pipeline
from studio.single_file import save_single_file, sd3_transformer_to_original


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_the_mmdit_layout_is_the_inverse_of_diffusers_conversion(variant):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if variant == "sd3.5" else {}
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=24,
                                  pooled_projection_dim=12, out_channels=16, **extra)
    sd = model.state_dict()
    original = sd3_transformer_to_original(sd, model.config)
    assert all(k.startswith("model.diffusion_model.") for k in original)
    assert any(".x_block.attn.qkv." in k for k in original)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sd3_exports_one_file_that_from_single_file_reads_back_and_draws_the_same(sd3_folder, tmp_path):
    pipe = load_pipeline(str(sd3_folder))
    path = save_single_file(pipe, tmp_path / "sd3.safetensors")
    again = load_pipeline(str(path), config=str(sd3_folder))
    assert again.studio_architecture == "sd3"
    for name in ("transformer", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name

    def draw(p):
        return p("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    assert np.abs(draw(pipe) - draw(again)).max() < 1e-5


def test_flux_single_file_export_is_refused_with_the_reason(flux_folder, tmp_path):
    with pytest.raises(ValueError, match="FluxTransformer2DModel's original layout is not written"):
        save_single_file(load_pipeline(str(flux_folder)), tmp_path / "flux.safetensors")
    assert not (tmp_path / "flux.safetensors").exists()


def test_merge_to_one_file_is_refused_on_flux_in_one_line(flux_folder, tmp_path, capsys):
    from PIL import Image

    from studio.cli import main
    from studio.shapes import world
    from studio.training import TrainConfig
    from studio.training.engine import train

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(world.render(world.Spec("star", "red", "blue", "large", "center"), 0)).save(data / "a.png")
    (data / "a.txt").write_text("a red sks", encoding="utf-8")
    lora = train(TrainConfig(model=str(flux_folder), method="lora", data=str(data), steps=1, batch_size=1,
                             resolution=16, preview_every=0, tensorboard=False, progress_bar=False, buckets=False,
                             output_dir=str(tmp_path / "run"))).adapter_path
    out = tmp_path / "flux.safetensors"
    capsys.readouterr()
    assert main(["merge", "--model", str(flux_folder), "--adapter", str(lora), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "original layout is not written" in err and not out.exists()
