import os

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5Tokenizer)

from studio.shapes import embedded, world

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shapes_pipe():
    from studio import load_pipeline

    return load_pipeline("shapes")


@pytest.fixture(scope="session")
def judge():
    from studio.shapes.judge import load_judge

    return load_judge()


# Tiny random SD 1.x and SDXL pipelines, built here (nothing is downloaded).

def _vae():
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


def _text(tok, cls=CLIPTextModel, width=32):
    return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=embedded.MAX_TOKENS,
                              projection_dim=width, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok = embedded.build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text(tok), tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = tmp_path_factory.mktemp("sd1")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok = embedded.build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=2, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=1, projection_class_embeddings_input_dim=80)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text(tok), text_encoder_2=_text(
        tok, CLIPTextModelWithProjection), tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler())
    path = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(path)
    return path


# Tiny random SD3 and Flux pipelines: MMDiT transformers, CLIP encoders and a T5 with a word-level vocabulary of
# the shapes world (a Unigram tokenizer built from a list: nothing is downloaded).

def _t5_tokenizer():
    words = sorted(set(world.V1.vocabulary()) | {"a", "on", "background", "sks"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words), ("\u2581", -2.0),
              *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)


def _t5(tok):
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _flow_vae(channels, shift):
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=channels, norm_num_groups=8,
                         layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift,
                         scaling_factor=1.5)


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok, t5_tok = embedded.build_tokenizer(), _t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_flow_vae(16, 0.0609), text_encoder=_text(tok, CLIPTextModelWithProjection),
                                    tokenizer=tok, text_encoder_2=_text(tok, CLIPTextModelWithProjection),
                                    tokenizer_2=tok, text_encoder_3=_t5(t5_tok), tokenizer_3=t5_tok)
    path = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok, t5_tok = embedded.build_tokenizer(), _t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4, 0.1159),
                        text_encoder=_text(tok), tokenizer=tok, text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok)
    path = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(path)
    return path


def unet_out(pipe, seed=0):
    """The UNet's output on fixed noise, timesteps and text: a cheap fingerprint of what adapters do to it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([900, 100]), encoder_hidden_states=text).sample


def serve_app(workspace):
    """The web UI on a free loopback port, in this process; returns (url, app)."""
    from studio.ui.app import serve_in_background

    return serve_in_background(workspace)
