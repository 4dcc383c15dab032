"""Exports that load in other tools: baked SaRA/SODA LoRAs whose layers have different ranks (the
`rank_pattern` diffusers needs), text-encoder keys in the standard `text_model.` naming, SDXL's kohya
(`lora_unet_`, `lora_te1_`, `lora_te2_`) and diffusers (`unet.`, `text_encoder.`, `text_encoder_2.`) layouts,
each loaded by diffusers' own `load_lora_weights` and compared with Studio's loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio import load_pipeline
from studio.adapters import base_fingerprint, get_method, read_adapter, save_adapter
from studio.adapters.io import export_adapter
from studio.adapters.lora import LoraConfig
from studio.adapters.sara import SaraConfig
from studio.adapters.sara.bake import bake_to_lora as bake_sara
from studio.adapters.soda import SodaConfig
from studio.adapters.soda.bake import bake_to_lora as bake_soda
from studio.adapters.soda.layer import SodaLayer

# Studio runs LoRA through its fused kernel, diffusers through PEFT's layer: the same sums in another order.
# One 8-bit pixel level is 1/255; the bound asked of every export is 2/255 (measured: below 1e-4).
PIXEL_BOUND = 2 / 255
PROMPT = "a red circle on a blue background"


def _image(pipe, seed=0, **kw):
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw).images[0]


def _keys_and_metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), dict(f.metadata() or {})


def _random_lora(pipe, name, seed, rank=4, alpha=8.0, std=0.05, **kw):
    lora = get_method("lora")
    lora.attach(pipe, LoraConfig(rank=rank, alpha=alpha, **kw), name)
    g = torch.Generator().manual_seed(seed)
    for p in lora.trainable_parameters(pipe, name):
        p.data = torch.randn(p.shape, generator=g) * std
    return lora.state_dict(pipe, name)


def _sara_file(tmp_path):
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="2%"), "s")
    g = torch.Generator().manual_seed(0)
    for p in sara.trainable_parameters(pipe, "s"):
        p.data = torch.randn(p.shape, generator=g) * 0.02
    path = save_adapter(tmp_path / "sara.safetensors", "sara", SaraConfig(budget="2%"), sara.state_dict(pipe, "s"),
                        base_fingerprint(pipe))
    return bake_sara(path, 16, tmp_path / "sara_lora16.safetensors")[0]


def _soda_file(tmp_path):
    pipe = load_pipeline("shapes")
    soda = get_method("soda")
    soda.attach(pipe, SodaConfig(), "s")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the identity: random orthogonal factors and shifts of the singular values
        for layer in (m for m in pipe.unet.modules() if isinstance(m, SodaLayer)):
            a = layer.adapters["s"]
            a.delta.copy_(torch.randn(a.delta.shape, generator=g) * 0.05 * layer.S.mean())
            for q in a.factors():
                q.copy_(torch.linalg.qr(torch.randn(q.shape[0], q.shape[0], generator=g))[0])
    path = save_adapter(tmp_path / "soda.safetensors", "soda", SodaConfig(), soda.state_dict(pipe, "s"),
                        base_fingerprint(pipe))
    return bake_soda(path, 16, load_pipeline("shapes"), tmp_path / "soda_lora16.safetensors")[0]


@pytest.mark.parametrize("bake", [_sara_file, _soda_file], ids=["sara", "soda"])
def test_baked_adapter_at_rank_16_loads_in_diffusers_with_studios_image(bake, tmp_path):
    baked = bake(tmp_path)
    ranks = {k: t.shape[0] for k, t in read_adapter(baked).tensors.items() if ".lora_A." in k}
    out, = export_adapter(baked, "diffusers", tmp_path / "baked.diffusers.safetensors")
    keys, meta = _keys_and_metadata(out)
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["unet.r"] == 16
    narrow = {k.removeprefix("unet.").removesuffix(".lora_A.weight"): r for k, r in ranks.items() if r != 16}
    # the header names each narrower layer at its own rank (SaRA trains conv_out, 4 channels: rank 4)
    assert {k.lstrip("^").replace("\\", ""): r for k, r in packed["unet.rank_pattern"].items()} == narrow
    if bake is _sara_file:
        assert narrow["conv_out"] == 4
    ours = _image(load_pipeline("shapes", adapters=[baked]))
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(out), adapter_name="baked")  # diffusers' own loader, ranks from the header
    base = _image(load_pipeline("shapes"))
    assert np.abs(ours - base).max() > 0.05  # the baked update shows
    diff = np.abs(_image(theirs) - ours).max()
    assert diff <= PIXEL_BOUND, diff
    back = read_adapter(out)  # and our reader takes the export back, every layer at its rank
    assert {k: t.shape[0] for k, t in back.tensors.items() if ".lora_A." in k} == ranks


def _text_embeddings(pipe):
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_lora_exports_standard_keys_that_diffusers_applies(tmp_path):
    pipe = load_pipeline("shapes")
    tensors = _random_lora(pipe, "te", seed=6, text_encoder=True)
    assert any(k.startswith("text_encoder.encoder.layers.") for k in tensors)  # transformers 5: no text_model.
    path = save_adapter(tmp_path / "te.safetensors", "lora", LoraConfig(rank=4, alpha=8.0, text_encoder=True),
                        tensors, base_fingerprint(pipe))
    ours = load_pipeline("shapes", adapters=[path])
    base = load_pipeline("shapes")
    out, = export_adapter(path, "diffusers", tmp_path / "te.diffusers.safetensors")
    keys, _ = _keys_and_metadata(out)
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(out), adapter_name="te")
    assert (_text_embeddings(ours) - _text_embeddings(base)).abs().max() > 1e-2  # the text encoder's LoRA acts
    torch.testing.assert_close(_text_embeddings(theirs), _text_embeddings(ours), rtol=0, atol=1e-5)
    diff = np.abs(_image(theirs) - _image(ours)).max()
    assert diff <= PIXEL_BOUND, diff
    kohya, = export_adapter(path, "kohya", tmp_path / "te.kohya.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in _keys_and_metadata(kohya)[0]
    # the importer reads the standard names, and the unprefixed ones earlier exports wrote (same header)
    keys, meta = _keys_and_metadata(out)
    with safe_open(str(out), framework="pt") as f:
        unprefixed = {k.replace("text_encoder.text_model.", "text_encoder.", 1): f.get_tensor(k) for k in keys}
    assert set(unprefixed) == set(tensors)
    old = tmp_path / "old_names.safetensors"
    save_file(unprefixed, str(old), metadata=meta)
    for file in (out, kohya, old):
        again = load_pipeline("shapes", adapters=[file])
        torch.testing.assert_close(_text_embeddings(again), _text_embeddings(ours), rtol=0, atol=0)


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_folder, tmp_path_factory):
    """A LoRA on an SDXL pipeline's UNet and both text encoders, random non-zero weights, in our format."""
    xl = load_pipeline(str(sdxl_folder))
    tensors = _random_lora(xl, "xl", seed=7, rank=4, alpha=8.0, text_encoder=True)
    g = torch.Generator().manual_seed(8)  # the second encoder's, on the same attention layers (LoraMethod.attach
    # targets the first encoder only; the loader takes any component the keys name)
    te2 = {k.replace("text_encoder.", "text_encoder_2.text_model.", 1): torch.randn(v.shape, generator=g) * 0.05
           for k, v in tensors.items() if k.startswith("text_encoder.")}
    assert all(k.removeprefix("text_encoder_2.").rsplit(".lora_", 1)[0] in dict(xl.text_encoder_2.named_modules())
               for k in te2)
    path = save_adapter(tmp_path_factory.mktemp("xl") / "xl.safetensors", "lora",
                        LoraConfig(rank=4, alpha=8.0, text_encoder=True), {**tensors, **te2}, base_fingerprint(xl))
    return path


def _xl_embeddings(pipe):
    """Both text encoders' outputs: the first's last hidden states, the second's pooled projection (the
    fixture's encoders have one layer, so the penultimate states SDXL's UNet reads come before any LoRA)."""
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder_2(ids).text_embeds


def test_sdxl_diffusers_export_loads_in_diffusers_with_studios_image(sdxl_lora, sdxl_folder, tmp_path):
    ours = load_pipeline(str(sdxl_folder), adapters=[sdxl_lora])
    out, = export_adapter(sdxl_lora, "diffusers", tmp_path / "xl.diffusers.safetensors")
    keys, meta = _keys_and_metadata(out)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["text_encoder_2.r"] == 4 and packed["text_encoder_2.lora_alpha"] == 8.0
    theirs = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    base = _xl_embeddings(theirs)
    theirs.load_lora_weights(str(out), adapter_name="xl")
    for mine, other, before in zip(_xl_embeddings(ours), _xl_embeddings(theirs), base):
        assert (mine - before).abs().max() > 1e-2  # both encoders' LoRAs act
        torch.testing.assert_close(other, mine, rtol=0, atol=1e-5)
    size = {"height": 32, "width": 32}
    expected = _image(ours, **size)
    diff = np.abs(_image(theirs, **size) - expected).max()
    assert diff <= PIXEL_BOUND, diff
    # the LoRA shows (the tiny random VAE damps it: measured 0.015), a hundred times over the two loaders' gap
    effect = np.abs(_image(load_pipeline(str(sdxl_folder)), **size) - expected).max()
    assert effect > 0.01 and diff < effect / 100, (effect, diff)


def test_sdxl_kohya_export_uses_te1_te2_and_round_trips(sdxl_lora, sdxl_folder, tmp_path):
    out, = export_adapter(sdxl_lora, "kohya", tmp_path / "xl.kohya.safetensors")
    keys, meta = _keys_and_metadata(out)
    assert {k.split("_text_model")[0].split("_down_blocks")[0].split("_up_blocks")[0].split("_mid_block")[0]
            for k in keys} == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha" in keys
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    back = read_adapter(out)
    original = read_adapter(sdxl_lora)
    standard = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in original.tensors.items()}
    assert set(back.tensors) == set(standard)
    assert all(torch.equal(back.tensors[k], standard[k]) for k in standard)
    assert back.config["rank"] == 4 and back.config["alpha"] == 8.0 and not back.config["alpha_pattern"]
    size = {"height": 32, "width": 32}
    expected = _image(load_pipeline(str(sdxl_folder), adapters=[sdxl_lora]), **size)
    assert np.abs(_image(load_pipeline(str(sdxl_folder), adapters=[out]), **size) - expected).max() == 0.0
    theirs = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    theirs.load_lora_weights(str(out), adapter_name="k")  # diffusers' kohya converter (lora_te1_/lora_te2_)
    diff = np.abs(_image(theirs, **size) - expected).max()
    assert diff <= PIXEL_BOUND, diff


def test_per_module_alphas_survive_both_exports(tmp_path):
    """kohya files carry an alpha per module; the diffusers export keeps the odd ones as alpha_pattern."""
    pipe = load_pipeline("shapes")
    tensors = _random_lora(pipe, "a", seed=9, rank=4, alpha=4.0)
    odd = sorted({k.removesuffix(".lora_A.weight") for k in tensors if k.endswith("attn2.to_k.lora_A.weight")})
    config = LoraConfig(rank=4, alpha=4.0, alpha_pattern={k: 1.0 for k in odd})
    path = save_adapter(tmp_path / "a.safetensors", "lora", config, tensors, base_fingerprint(pipe))
    ours = _image(load_pipeline("shapes", adapters=[path]))
    uniform = save_adapter(tmp_path / "u.safetensors", "lora", LoraConfig(rank=4, alpha=4.0), tensors,
                           base_fingerprint(pipe))
    assert np.abs(_image(load_pipeline("shapes", adapters=[uniform])) - ours).max() > 1e-3  # the alphas matter
    for fmt in ("diffusers", "kohya"):
        out, = export_adapter(path, fmt, tmp_path / f"a.{fmt}.safetensors")
        back = read_adapter(out)
        assert back.config["alpha"] == 4.0 and set(back.config["alpha_pattern"]) == set(odd)
        assert np.abs(_image(load_pipeline("shapes", adapters=[out])) - ours).max() == 0.0
    keys, meta = _keys_and_metadata(out)  # kohya: an alpha per module, as written
    with safe_open(str(out), framework="pt") as f:
        assert {k: float(f.get_tensor(k)) for k in keys if k.endswith("attn2_to_k.alpha")} == {
            f"lora_unet_{k.removeprefix('unet.').replace('.', '_')}.alpha": 1.0 for k in odd}
    # diffusers' loader applies the diffusers export's alpha_pattern (its kohya converter does not: diffusers
    # 0.42 names the per-module alphas `...processor.to_k_lora.down.weight`, which match no module)
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(tmp_path / "a.diffusers.safetensors"), adapter_name="d")
    diff = np.abs(_image(theirs) - ours).max()
    assert diff <= PIXEL_BOUND, diff


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "comfyui_keys.py"


def _comfyui_keys(*args):
    run = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=900)
    return run.returncode, run.stdout, run.stderr


def test_comfyui_key_check_refuses_a_path_that_is_no_checkout(tmp_path):
    code, _, err = _comfyui_keys(tmp_path / "missing.safetensors", "--comfyui", tmp_path)
    assert code == 2 and err.strip() == f"comfyui_keys: error: {tmp_path} is not a ComfyUI checkout (no comfy/lora.py)"


@pytest.mark.slow  # needs a ComfyUI source checkout: COMFYUI_PATH=… pytest -m slow tests/test_export.py
def test_comfyui_loads_every_key_of_the_kohya_exports(tmp_path):
    """ComfyUI's own key mapping (from the checkout in COMFYUI_PATH) on the kohya exports of a LoRA on the UNet's
    attention, ResNet convolutions and the text encoder: every key loads. Its diffusers-key map knows the UNet's
    attention only by the old `processor.to_q` names, so the diffusers export's attention keys do not."""
    assert os.environ.get("COMFYUI_PATH"), "set COMFYUI_PATH to a ComfyUI source checkout"
    pipe = load_pipeline("shapes")
    config = LoraConfig(rank=4, alpha=8.0, text_encoder=True, resnet_convs=True)
    tensors = _random_lora(pipe, "c", seed=10, text_encoder=True, resnet_convs=True)
    path = save_adapter(tmp_path / "c.safetensors", "lora", config, tensors, base_fingerprint(pipe))
    kohya, = export_adapter(path, "kohya", tmp_path / "c.kohya.safetensors")
    diffusers, = export_adapter(path, "diffusers", tmp_path / "c.diffusers.safetensors")
    code, out, _ = _comfyui_keys(kohya, "--comfyui", os.environ["COMFYUI_PATH"], "--family", "sd1")
    assert code == 0 and f"{len(tensors) * 3 // 2} keys, {len(tensors) * 3 // 2} loaded" in out, out
    code, out, _ = _comfyui_keys(diffusers, "--comfyui", os.environ["COMFYUI_PATH"], "--family", "sd1", "--all")
    missing = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("  not loaded: ")]
    assert code == 1 and missing and all(".attn1.to_" in k or ".attn2.to_" in k for k in missing), out
    assert not any(k.startswith("text_encoder.") for k in missing)  # text_model. keys: loaded


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_export_to_lycoris_kohya_keys_that_rebuild_the_update(method, tmp_path):
    """The kohya export of a LoHa / LoKr names LyCORIS's tensors under kohya module names with an alpha, and the
    LyCORIS formulas on those tensors give back PEFT's update of every layer (ComfyUI's own loaders were run on
    such files too: docs/export-compat.md)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.adapters import AdapterError, base_fingerprint, get_method, save_adapter
    from studio.adapters.io import export_adapter
    from studio.adapters.lora.convert import kohya_name
    from studio.loading import load_pipeline

    pipe = load_pipeline("shapes")
    impl = get_method(method)
    config = impl.config_class.from_dict({"rank": 4, "alpha": 2.0})
    torch.manual_seed(0)
    impl.attach(pipe, config, "x")
    with torch.no_grad():
        for p in impl.trainable_parameters(pipe, "x"):
            p.normal_()
    path = save_adapter(tmp_path / f"{method}.safetensors", method, config, impl.state_dict(pipe, "x"),
                        base_fingerprint(pipe))
    exported = load_file(str(export_adapter(path, "kohya")[0]))
    layers = [(p, m) for p, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for module_path, layer in layers:
        k = kohya_name("unet", module_path)
        scale = float(exported[f"{k}.alpha"]) / 4 if f"{k}.alpha" in exported else 1.0  # a full LoKr: folded in
        if method == "loha":
            rebuilt = (exported[f"{k}.hada_w1_a"] @ exported[f"{k}.hada_w1_b"]) * (
                exported[f"{k}.hada_w2_a"] @ exported[f"{k}.hada_w2_b"]) * scale
        else:
            w2 = exported.get(f"{k}.lokr_w2")
            w2 = w2 if w2 is not None else exported[f"{k}.lokr_w2_a"] @ exported[f"{k}.lokr_w2_b"]
            rebuilt = torch.kron(exported[f"{k}.lokr_w1"], w2) * scale
        torch.testing.assert_close(rebuilt, layer.get_delta_weight("x"), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="kohya"):
        export_adapter(path, "diffusers")


def test_dora_trains_saves_and_loads_exactly_in_diffusers(tmp_path):
    """LoRA with `dora=true`: PEFT's DoRA (a trained magnitude per output); the file holds the magnitudes, loads
    back to the same UNet output, weight 0 is the base model, and the diffusers export gives diffusers' own
    `load_lora_weights` the same output (0.0 measured); the kohya export is refused with the reason."""
    from studio.adapters import AdapterError, set_adapter_weights
    from studio.adapters.io import export_adapter

    pipe = load_pipeline("shapes")
    impl = get_method("lora")
    config = impl.config_class.from_dict({"rank": 4, "dora": True})
    torch.manual_seed(0)
    impl.attach(pipe, config, "x")
    with torch.no_grad():
        for p in impl.trainable_parameters(pipe, "x"):
            p.add_(torch.randn_like(p) * 0.1)
    tensors = impl.state_dict(pipe, "x")
    assert sum(".lora_magnitude_vector." in k for k in tensors) == len(tensors) // 3
    path = save_adapter(tmp_path / "dora.safetensors", "lora", config, tensors, base_fingerprint(pipe))
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 32, 128, generator=g)

    def out(model):
        with torch.no_grad():
            return model.unet(x, t, encoder_hidden_states=text).sample

    ours = out(pipe)
    loaded = load_pipeline("shapes", adapters={path: 1.0})
    assert torch.equal(out(loaded), ours)
    set_adapter_weights(loaded, {"dora": 0.0})
    assert torch.equal(out(loaded), out(load_pipeline("shapes")))
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(export_adapter(path, "diffusers")[0]))
    assert (out(theirs) - ours).abs().max() < 1e-5
    with pytest.raises(AdapterError, match="DoRA"):
        export_adapter(path, "kohya")
