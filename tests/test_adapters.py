"""The adapter framework with LoRA: save/load/merge round trips, several adapters at once, export to the
kohya and diffusers key formats (read back by diffusers itself), and refusal of adapters that do not fit."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio import load_pipeline
from studio.adapters import (AdapterError, base_fingerprint, get_method, load_adapters, merge_adapters, read_adapter,
                             save_adapter, set_adapter_weights)
from studio.adapters.io import export_adapter
from studio.adapters.lora import LoraConfig


def _image(pipe, seed=0):
    return pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def _random_lora(pipe, name, seed, rank=4, alpha=8.0, std=0.05, **kw):
    lora = get_method("lora")
    lora.attach(pipe, LoraConfig(rank=rank, alpha=alpha, **kw), name)
    g = torch.Generator().manual_seed(seed)
    for p in lora.trainable_parameters(pipe, name):
        p.data = torch.randn(p.shape, generator=g) * std
    return lora.state_dict(pipe, name)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A LoRA with random (non-zero) weights saved in our format, and the image it gives."""
    pipe = load_pipeline("shapes")
    tensors = _random_lora(pipe, "rand", seed=1)
    path = tmp_path_factory.mktemp("lora") / "rand.safetensors"
    save_adapter(path, "lora", LoraConfig(rank=4, alpha=8.0), tensors, base_fingerprint(pipe))
    get_method("lora").set_weights(pipe, {"rand": 1.0})
    with_adapter = _image(pipe)
    get_method("lora").set_weights(pipe, {})
    return path, tensors, with_adapter, _image(pipe)


def test_file_carries_method_config_and_base_fingerprint(adapter_file):
    path, tensors, _, _ = adapter_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "lora" and meta["format"] == "studio-adapter"
    assert json.loads(meta["config"])["rank"] == 4 and json.loads(meta["config"])["alpha"] == 8.0
    base = json.loads(meta["base_model"])
    assert base["cross_attention_dim"] == 128 and len(base["layers_sha256"]) == 16
    assert meta["studio_version"]
    assert len(tensors) == 2 * 7 * 10  # A and B on 7 linears in each of the UNet's 10 transformer blocks


def test_save_load_round_trip_gives_the_same_image(adapter_file):
    path, tensors, with_adapter, without = adapter_file
    assert np.abs(with_adapter - without).max() > 0.05  # the adapter does change the image
    pipe = load_pipeline("shapes", adapters={path: 1.0})
    loaded = get_method("lora").state_dict(pipe, "rand")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert np.abs(_image(pipe) - with_adapter).max() == 0.0


def test_merge_unmerge_and_merge_into_checkpoint(adapter_file, tmp_path):
    path, _, with_adapter, without = adapter_file
    pipe = load_pipeline("shapes", adapters={path: 1.0})
    lora = get_method("lora")
    lora.merge(pipe, "rand", 1.0)
    assert np.abs(_image(pipe) - with_adapter).max() < 2e-3  # merged weights = unmerged forward
    lora.unmerge(pipe)
    assert np.abs(_image(pipe) - with_adapter).max() < 2e-3
    merge_adapters(pipe)  # fold and drop the layers: a plain diffusers pipeline
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    pipe.save_pretrained(tmp_path / "merged")
    again = load_pipeline(str(tmp_path / "merged"))
    assert np.abs(_image(again) - with_adapter).max() < 2e-3
    assert np.abs(_image(load_pipeline("shapes")) - without).max() == 0.0  # the shipped model is untouched


def test_weights_scale_and_several_adapters_mix(adapter_file, tmp_path):
    path, _, with_adapter, without = adapter_file
    pipe = load_pipeline("shapes")
    other = _random_lora(pipe, "tmp", seed=2)
    get_method("lora").remove(pipe, "tmp")
    second = save_adapter(tmp_path / "second.safetensors", "lora", LoraConfig(rank=4, alpha=8.0), other,
                          base_fingerprint(pipe))
    names = load_adapters(pipe, {path: 1.0, second: 0.0})
    assert names == ["rand", "second"]
    assert np.abs(_image(pipe) - with_adapter).max() == 0.0  # weight 0 is off
    with get_method("lora").disabled(pipe):  # the base model's prediction, as a preservation target
        assert np.abs(_image(pipe) - without).max() == 0.0
    assert np.abs(_image(pipe) - with_adapter).max() == 0.0
    set_adapter_weights(pipe, {})
    assert np.abs(_image(pipe) - without).max() == 0.0
    # at weight w the LoRA term is w times the weight-1 term, and two adapters add up
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features)
    base = layer.base_layer(x)
    outs = {}
    for weights in ({"rand": 1.0}, {"rand": 0.5}, {"second": 1.0}, {"rand": 0.5, "second": 1.0}):
        set_adapter_weights(pipe, weights)
        outs[tuple(weights.items())] = layer(x) - base
    half = outs[(("rand", 0.5),)]
    torch.testing.assert_close(half, 0.5 * outs[(("rand", 1.0),)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[(("rand", 0.5), ("second", 1.0))], half + outs[(("second", 1.0),)],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="no adapter named nope"):
        set_adapter_weights(pipe, {"nope": 1.0})


def test_diffusers_export_loads_in_diffusers_with_the_same_image(adapter_file, tmp_path):
    path, _, with_adapter, _ = adapter_file
    out, = export_adapter(path, "diffusers", tmp_path / "rand_diffusers.safetensors")
    pipe = load_pipeline("shapes")
    pipe.load_lora_weights(str(out), adapter_name="x")  # diffusers' own loader, alpha from the header
    diff = np.abs(_image(pipe) - with_adapter).max()
    # ours runs the fused kernel, diffusers PEFT's layer: the same sums in another order (measured 1.2e-5
    # after 4 steps, on pixels in [0, 1]; one 8-bit level is 3.9e-3)
    assert diff < 1e-4, diff
    back = read_adapter(out)  # and our reader takes it back
    assert back.method == "lora" and back.config["alpha"] == 8.0


def test_kohya_export_converts_back_and_loads_in_diffusers(adapter_file, tmp_path):
    path, tensors, with_adapter, _ = adapter_file
    out, = export_adapter(path, "kohya", tmp_path / "rand_kohya.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8.0"
    back = read_adapter(out)
    assert set(back.tensors) == set(tensors)
    assert all(torch.equal(back.tensors[k], tensors[k]) for k in tensors)
    assert back.config["alpha"] == 8.0 and back.config["rank"] == 4
    pipe = load_pipeline("shapes")
    pipe.load_lora_weights(str(out), adapter_name="k")  # diffusers' kohya converter, as ComfyUI-style files load
    assert np.abs(_image(pipe) - with_adapter).max() < 1e-4
    ours = load_pipeline("shapes", adapters=[out])
    assert np.abs(_image(ours) - with_adapter).max() == 0.0


def test_adapter_for_another_architecture_is_refused(sdxl_folder, adapter_file, tmp_path):
    xl = load_pipeline(str(sdxl_folder))
    tensors = _random_lora(xl, "xl", seed=3, rank=2, alpha=2.0)
    path = save_adapter(tmp_path / "xl.safetensors", "lora", LoraConfig(rank=2), tensors, base_fingerprint(xl))
    pipe = load_pipeline("shapes")
    with pytest.raises(AdapterError, match=r"xl.safetensors was trained for sdxl .*the loaded model is custom"):
        load_adapters(pipe, [path])
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())  # nothing half-attached
    with pytest.raises(AdapterError, match="trained for custom"):
        load_adapters(xl, [adapter_file[0]])


def test_shape_mismatch_and_unreadable_files_are_refused(adapter_file, tmp_path):
    path, tensors, _, _ = adapter_file
    key = next(k for k in tensors if k.endswith("to_k.lora_A.weight") and "attn2" in k)
    bad = dict(tensors)
    bad[key] = torch.zeros(4, 77)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError, match=r"has shape \(4, 77\), the loaded model needs \(4, 128\)"):
        load_adapters(load_pipeline("shapes"), [tmp_path / "bad.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterError, match="neither a studio adapter nor a kohya/diffusers LoRA"):
        read_adapter(tmp_path / "other.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(AdapterError, match="safetensors files only"):
        read_adapter(tmp_path / "model.ckpt")


def test_a_trigger_token_exports_as_an_embedding_diffusers_loads(adapter_file, tmp_path):
    """A LoRA trained with its trigger as a new token: the export writes the LoRA and `sks.safetensors`
    (emb_params), and diffusers' own load_lora_weights + load_textual_inversion give our loader's image."""
    path, tensors, _, _ = adapter_file
    pipe = load_pipeline("shapes")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vector = torch.randn(1, width, generator=torch.Generator().manual_seed(5)) * 0.3
    with_token = save_adapter(tmp_path / "star.safetensors", "lora", LoraConfig(rank=4, alpha=8.0),
                              {**tensors, "trigger_embedding": vector}, base_fingerprint(pipe), {"trigger": "sks"})

    def draw(p):
        return p("a red sks on a blue background", num_inference_steps=4, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]

    ours = draw(load_pipeline("shapes", adapters=[with_token]))
    assert np.abs(ours - draw(load_pipeline("shapes", adapters=[path]))).max() > 0.02  # the token matters
    out, embedding = export_adapter(with_token, "diffusers", tmp_path / "export" / "star.diffusers.safetensors")
    assert embedding == out.with_name("sks.safetensors")
    with safe_open(str(embedding), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
    assert "trigger_embedding" not in read_adapter(out).tensors
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(out), adapter_name="star")
    theirs.load_textual_inversion(str(embedding), token="sks")
    assert np.abs(draw(theirs) - ours).max() < 1e-4
    wide = save_adapter(tmp_path / "wide.safetensors", "lora", LoraConfig(rank=4, alpha=8.0),
                        {**tensors, "trigger_embedding": torch.zeros(1, width + 1)}, base_fingerprint(pipe),
                        {"trigger": "sks"})
    fresh = load_pipeline("shapes")
    with pytest.raises(AdapterError, match=f"width {width + 1}, the loaded text encoder's is {width}"):
        load_adapters(fresh, [wide])
    assert not any("lora" in n for n, _ in fresh.unet.named_parameters())  # refused before anything attached


def test_resnet_conv_lora_round_trips_and_loads_in_diffusers(tmp_path):
    """`resnet_convs=True` adds the ResNet 3x3 convolutions (LoCon-style) to the LoRA's targets."""
    pipe = load_pipeline("shapes")
    tensors = _random_lora(pipe, "conv", seed=4, rank=2, alpha=2.0, std=0.02, resnet_convs=True)
    convs = [k for k in tensors if ".resnets." in k]
    assert convs and tensors[next(k for k in convs if k.endswith("lora_A.weight"))].dim() == 4
    expected = _image(pipe)
    path = save_adapter(tmp_path / "conv.safetensors", "lora", LoraConfig(rank=2, alpha=2.0, resnet_convs=True),
                        tensors, base_fingerprint(pipe))
    assert np.abs(_image(load_pipeline("shapes", adapters=[path])) - expected).max() == 0.0
    assert np.abs(_image(load_pipeline("shapes")) - expected).max() > 0.02  # the convs' update shows
    out, = export_adapter(path, "diffusers", tmp_path / "conv.diffusers.safetensors")
    theirs = load_pipeline("shapes")
    theirs.load_lora_weights(str(out), adapter_name="conv")
    assert np.abs(_image(theirs) - expected).max() < 1e-4
