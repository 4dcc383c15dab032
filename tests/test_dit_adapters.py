"""The concept methods on a diffusion transformer (SD3's `pipe.transformer`, not `pipe.unet`), on a tiny random SD3
pipeline built here (nothing is downloaded): each attaches on the default targets, its file is keyed
`transformer.<path>...`, and loading the file reproduces the adapted model's output. A UNet model's files keep their
`unet.` keys, and the UNet-only methods refuse a transformer with the reason."""

import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from studio.adapters import AdapterError, base_fingerprint, get_method, save_adapter
from studio.adapters.base import matches_target
from studio.adapters.lora.config import ATTENTION_FF, UNET_ATTENTION_FF
from studio.shapes import embedded

METHODS = {"lora": {"rank": 2}, "sara": {"budget": "5%"}, "soda": {"kron_factors": 2, "max_factor": 8},
           "oft": {"block_size": 8}, "hra": {"rank": 2}}
# the default targets before the transformers' patterns were added: on a UNet they select the same modules
OLD_UNET_TARGETS = [r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
                    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"]


def _sd3_pipe() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    tok = embedded.build_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=embedded.MAX_TOKENS, projection_dim=32, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id))

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8,
                        layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def sd3():
    pipe = _sd3_pipe()
    g = torch.Generator().manual_seed(1)
    pipe.test_inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                            encoder_hidden_states=torch.randn(1, 10, 32, generator=g),
                            pooled_projections=torch.randn(1, 64, generator=g))
    return pipe


def _out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(**pipe.test_inputs).sample


def _perturb(params, seed=0, std=0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def _plain_linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_round_trips_on_the_transformer_with_transformer_keys(sd3, name):
    method = get_method(name)
    config = method.config_class.from_dict(METHODS[name])
    modules_before = _plain_linears(sd3.transformer)
    base = _out(sd3)
    method.attach(sd3, config, "a")
    try:
        params = method.trainable_parameters(sd3, "a")
        assert params and all(p.requires_grad for p in params)
        _perturb(params)
        method.set_weights(sd3, {"a": 1.0})
        adapted = _out(sd3)
        assert (adapted - base).abs().max() > 1e-4
        tensors = method.state_dict(sd3, "a")
        assert tensors and all(k.startswith("transformer.") for k in tensors), sorted(tensors)[:5]
        if name != "sara":  # the default targets (SaRA: every layer) reach both streams of the joint blocks
            assert any(".attn.add_q_proj." in k for k in tensors) and any(".ff_context." in k for k in tensors)
        method.remove(sd3, "a")
        torch.testing.assert_close(_out(sd3), base, rtol=0, atol=1e-6)
        method.load_state_dict(sd3, "b", tensors, config=config, base=base_fingerprint(sd3), source="t.safetensors")
        method.set_weights(sd3, {"b": 1.0})
        torch.testing.assert_close(_out(sd3), adapted, rtol=0, atol=1e-5)
        assert {k: v.shape for k, v in method.state_dict(sd3, "b").items()} == {k: v.shape for k, v in tensors.items()}
        # a UNet's file names a denoiser the loaded model does not have: refused, nothing attached
        method.remove(sd3, "b")
        unet_keyed = {"unet." + k.removeprefix("transformer."): v for k, v in tensors.items()}
        with pytest.raises(AdapterError, match="unet"):
            method.load_state_dict(sd3, "c", unet_keyed, config=config, base={}, source="u.safetensors")
    finally:
        method.unload(sd3)
    assert _plain_linears(sd3.transformer).keys() == modules_before.keys()
    torch.testing.assert_close(_out(sd3), base, rtol=0, atol=1e-6)


def test_lora_resnet_convs_and_the_unet_only_methods_are_refused_on_a_transformer(sd3):
    lora = get_method("lora")
    with pytest.raises(AdapterError, match="has no ResNet convolutions"):
        lora.attach(sd3, lora.config_class(resnet_convs=True), "r")
    assert not lora.state_dict(sd3, "r")
    for name in ("controlnext", "t2i_adapter", "ufc"):  # ControlNet, SPM, HiPA: test_dit_control/_methods
        method = get_method(name)
        with pytest.raises(AdapterError, match=f"^{name} needs a UNet model; sd3 is a diffusion transformer$"):
            method.attach(sd3, method.config_class(), "x")


def test_the_diffusers_export_keeps_transformer_keys_and_loads_in_load_lora_weights(tmp_path):
    from studio.adapters.io import export_adapter

    pipe = _sd3_pipe()
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 10, 32), pooled_projections=torch.randn(1, 64))
    lora = get_method("lora")
    config = lora.config_class(rank=2, alpha=4.0)
    lora.attach(pipe, config, "a")
    _perturb(lora.trainable_parameters(pipe, "a"))
    with torch.no_grad():
        ours = pipe.transformer(**inputs).sample
    path = save_adapter(tmp_path / "a.safetensors", "lora", config, lora.state_dict(pipe, "a"),
                        base_fingerprint(pipe))
    with pytest.raises(AdapterError, match="kohya key layout for sd3/flux is not written yet; use the diffusers"):
        export_adapter(path, "kohya")
    exported = export_adapter(path, "diffusers")[0]
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    lora.unload(pipe)
    pipe.load_lora_weights(str(exported))
    with torch.no_grad():
        theirs = pipe.transformer(**inputs).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_unet_models_files_keep_their_unet_keys():
    from studio import load_pipeline

    pipe = load_pipeline("shapes")
    assert UNET_ATTENTION_FF is ATTENTION_FF
    paths = [n for n, _ in pipe.unet.named_modules()]
    assert ([p for p in paths if matches_target(p, ATTENTION_FF)]
            == [p for p in paths if matches_target(p, OLD_UNET_TARGETS)] != [])
    lora = get_method("lora")
    lora.attach(pipe, lora.config_class(), "a")
    keys = set(lora.state_dict(pipe, "a"))
    lora.unload(pipe)
    assert keys == {f"unet.{p}.lora_{x}.weight" for p in paths if matches_target(p, OLD_UNET_TARGETS) for x in "AB"}
    one = [r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"]
    digests = {"sara": "unet.sara_base_digest", "soda": "unet.soda_base_digest"}
    for name, settings in METHODS.items():
        method = get_method(name)
        method.attach(pipe, method.config_class.from_dict({**settings, "target_modules": one}), "a")
        tensors = method.state_dict(pipe, "a")
        method.unload(pipe)
        assert tensors and all(k.startswith("unet.down_blocks.0.") for k in tensors if k != digests.get(name)), name
        assert name not in digests or digests[name] in tensors


def test_the_default_targets_reach_flux_single_and_joint_blocks():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = {n for n in linears if matches_target(n, ATTENTION_FF)}
    assert {f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                                                          "proj_out")} <= targeted
    assert {f"transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "attn.to_out.0",
                                                   "ff.net.0.proj", "ff_context.net.2")} <= targeted
    assert not any(n.endswith(("norm1.linear", "norm.linear")) or n.startswith(("x_embedder", "proj_out"))
                   for n in targeted)
