"""The contract every registered adapter method keeps (in the spirit of PEFT's common tester), checked on a tiny
random SD 1.x pipeline with each method's adapter moved off its starting point by a seeded random step (a fresh
LoRA, SODA or control adapter is the identity, which would make every "equals the base" check vacuous):

- the perturbed adapter changes the UNet's output;
- save -> load into a fresh pipeline reproduces that output exactly;
- `disabled()` and weight 0 give the base model's output exactly;
- merged equals unmerged (float rounding: within 1e-5 of the output's scale), or merging is refused by name;
- a weight between 0 and 1 scales the adapter, or is refused by name where the method cannot scale;
- remove restores every module exactly (state dict, module types, hooks);
- a file for another architecture is refused, naming the file and why, with nothing attached;
- every setting of every method declares its help;
- the file header has one layout (format, method, kind, config, base fingerprint, version, steps, trigger);
- `target_modules` selects the same modules in every method (a module path or a dotted suffix of it).

Methods registered later are covered by the same tests: the only per-method knowledge here is how to shrink a
default setting to the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import unet_out
from studio import load_pipeline
from studio.adapters import (AdapterError, base_fingerprint, get_method, load_adapters, merge_adapters, method_names,
                             read_adapter, save_adapter, set_adapter_weights)
from studio.adapters.base import FORMAT_VERSION, KINDS, matches_target
from studio.adapters.files import HEADER_KEYS
from studio.adapters.control import set_control
from studio.utils.settings import describe

# settings that fit the tiny model (its latents are 1/2 of the image: control encoders take one stage)
TINY = {
    "controlnet": {"embedding_channels": [16, 32]},
    "controlnext": {"unet_trainable": [r"attn2\.to_out"]},
    "t2i_adapter": {"num_res_blocks": 1},
    "hra": {"rank": 4},
    "oft": {"block_size": 16},
}
# what a method needs beside its settings before it runs: UFC's support set (its training sets one each episode)
PREPARE = {
    "ufc": lambda module: module.set_support(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)),
                                             torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))),
}
MERGE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # merged weights round differently from the unmerged sum
METHODS = method_names()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine two threads spin (a UNet call took 6 s instead of 0.1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(name: str):
    method = get_method(name)
    return method.config_class.from_dict(TINY.get(name, {}))


def _control_image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _output(pipe, method, adapter: str | None) -> torch.Tensor:
    """The UNet's output on fixed inputs; a control adapter is given its control image (scale from its weight)."""
    if method.conditioned and adapter is not None:
        set_control(pipe, [{"adapter": adapter, "image": _control_image()}])
    return unet_out(pipe)


def _snapshot(pipe) -> dict:
    unet = pipe.unet
    return {"state": {k: v.detach().clone() for k, v in unet.state_dict().items()},
            "types": [(n, type(m)) for n, m in unet.named_modules()],
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())}


def _assert_restored(pipe, before: dict) -> None:
    after = _snapshot(pipe)
    assert after["types"] == before["types"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, f"not restored exactly: {changed[:5]}"


def _attach_perturbed(pipe, name: str, adapter: str = "a", seed: int = 0):
    """Attach `name` for training and move every trainable parameter by a seeded random step."""
    method = get_method(name)
    config = _config(name)
    method.attach(pipe, config, adapter)
    if name in PREPARE:
        PREPARE[name](pipe._studio_control["modules"][adapter].module)
    params = method.trainable_parameters(pipe, adapter)
    assert params, f"{name} attached with nothing to train"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    return method, config


@pytest.fixture(scope="module", params=METHODS)
def case(request, sd1_folder, tmp_path_factory):
    """A method's perturbed adapter on the tiny pipeline, its output, the base output and the saved file."""
    name = request.param
    pipe = load_pipeline(str(sd1_folder))
    base, fingerprint = unet_out(pipe), base_fingerprint(pipe)
    method, config = _attach_perturbed(pipe, name)
    assert base_fingerprint(pipe) == fingerprint  # adapter layers count as the layers they wrap
    path = tmp_path_factory.mktemp(name) / f"{name}_file.safetensors"
    save_adapter(path, name, config, method.state_dict(pipe, "a"), fingerprint, {"note": "contract"},
                 steps=3, trigger="sks", training_config={"lr": 1e-3, "method": name})
    return {"name": name, "method": method, "config": config, "pipe": pipe, "fingerprint": fingerprint, "base": base,
            "adapted": _output(pipe, method, "a"), "path": path, "folder": sd1_folder}


def _loaded(case, weight: float = 1.0):
    pipe = load_pipeline(str(case["folder"]))
    (adapter,) = load_adapters(pipe, {case["path"]: weight})
    return pipe, adapter


def test_the_method_declares_its_kind_and_the_help_of_every_setting(case):
    method = case["method"]
    assert method.kind in KINDS
    missing = [spec.name for spec in describe(method.config_class) if not spec.help]
    assert not missing, f"{case['name']} settings without help: {missing}"


def test_the_file_header_has_one_layout(case, tmp_path):
    from studio.utils.version import __version__

    name, method = case["name"], case["method"]
    with safe_open(str(case["path"]), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "studio-adapter" and header["format_version"] == FORMAT_VERSION
    assert header["method"] == name and header["kind"] == method.kind
    assert method.config_class.from_dict(json.loads(header["config"])) == case["config"]
    assert json.loads(header["base_model"]) == case["fingerprint"]
    assert header["studio_version"] == __version__
    assert header["steps"] == "3" and header["trigger"] == "sks" and header["note"] == "contract"
    assert json.loads(header["training_config"]) == {"lr": 1e-3, "method": name}
    # without training details the header holds the identity keys only; bad ones are refused
    tensors = read_adapter(case["path"]).tensors
    bare = save_adapter(tmp_path / "bare.safetensors", name, case["config"], tensors, {})
    with safe_open(str(bare), framework="pt") as f:
        assert set(f.metadata()) == set(HEADER_KEYS)
    with pytest.raises(AdapterError, match="steps in an adapter header is a whole number"):
        save_adapter(tmp_path / "bad.safetensors", name, case["config"], tensors, {}, steps="three")
    with pytest.raises(AdapterError, match="writes kind itself"):
        save_adapter(tmp_path / "bad.safetensors", name, case["config"], tensors, {}, {"kind": "erase"})


def test_the_perturbed_adapter_changes_the_output(case):
    assert (case["adapted"] - case["base"]).abs().max() > 1e-3


def test_disabled_is_the_base_model(case):
    method, pipe = case["method"], case["pipe"]
    with method.disabled(pipe):
        assert torch.equal(_output(pipe, method, "a"), case["base"])
    assert torch.equal(_output(pipe, method, "a"), case["adapted"])  # and on again after the block


def test_save_then_load_into_a_fresh_pipeline_reproduces_the_output(case):
    pipe, adapter = _loaded(case)
    assert torch.equal(_output(pipe, case["method"], adapter), case["adapted"])


def test_weight_zero_is_the_base_model_and_weight_one_the_adapter(case):
    pipe, adapter = _loaded(case, weight=0.0)
    method = case["method"]
    assert torch.equal(_output(pipe, method, adapter), case["base"])
    set_adapter_weights(pipe, {adapter: 1.0})
    assert torch.equal(_output(pipe, method, adapter), case["adapted"])
    set_adapter_weights(pipe, {})
    assert torch.equal(_output(pipe, method, adapter), case["base"])


def test_a_weight_between_scales_the_adapter_or_is_refused(case):
    pipe, adapter = _loaded(case)
    method = case["method"]
    if not method.scalable:
        with pytest.raises(AdapterError, match="weight 1 or 0 only"):
            set_adapter_weights(pipe, {adapter: 0.5})
        return
    set_adapter_weights(pipe, {adapter: 0.5})
    half = _output(pipe, method, adapter)
    full_effect = (case["adapted"] - case["base"]).abs().max()
    assert 0.05 * full_effect < (half - case["base"]).abs().max() < 0.95 * full_effect


def test_merged_equals_unmerged(case):
    pipe, adapter = _loaded(case)
    method = case["method"]
    if not method.mergeable:
        with pytest.raises(AdapterError, match="cannot be merged"):
            method.merge(pipe, adapter, 1.0)
        with pytest.raises(AdapterError, match="cannot be merged"):
            merge_adapters(pipe)
        return
    method.merge(pipe, adapter, 1.0)
    torch.testing.assert_close(_output(pipe, method, adapter), case["adapted"], **MERGE_TOLERANCE)
    method.unmerge(pipe)
    torch.testing.assert_close(_output(pipe, method, adapter), case["adapted"], **MERGE_TOLERANCE)
    plain = load_pipeline(str(case["folder"]))
    before = _snapshot(plain)
    merge_adapters(pipe)  # folded in and the adapter layers dropped: a plain diffusers UNet again
    assert [t for _, t in _snapshot(pipe)["types"]] == [t for _, t in before["types"]]
    torch.testing.assert_close(_output(pipe, method, None), case["adapted"], **MERGE_TOLERANCE)


def test_remove_restores_every_module_exactly(case, sd1_folder):
    pipe = load_pipeline(str(sd1_folder))
    before = _snapshot(pipe)
    method, _ = _attach_perturbed(pipe, case["name"], adapter="t")
    method.remove(pipe, "t")  # after training
    _assert_restored(pipe, before)
    (adapter,) = load_adapters(pipe, [case["path"]])
    assert not torch.equal(_output(pipe, method, adapter), case["base"])
    method.remove(pipe, adapter)  # after loading a file
    _assert_restored(pipe, before)
    assert torch.equal(unet_out(pipe), case["base"])


def test_a_file_for_another_architecture_is_refused_with_the_reason(case, sdxl_folder):
    other = load_pipeline(str(sdxl_folder))
    before = _snapshot(other)
    with pytest.raises(AdapterError) as refused:
        load_adapters(other, [case["path"]])
    message = str(refused.value)
    assert case["path"].name in message and "\n" not in message
    assert "another architecture" in message, message
    _assert_restored(other, before)  # nothing half-attached


def test_a_target_pattern_matches_a_module_path_or_a_dotted_suffix_of_it():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for pattern in (path, r"attn1\.to_q", "to_q", r"attn[12]\.to_(q|k)", r"transformer_blocks\.\d+\.attn1\.to_q", ".*"):
        assert matches_target(path, [pattern]), pattern
    for pattern in (r"1\.to_q", "to_", "attn1", r"down_blocks\.0"):  # suffixes start after a dot and end the path
        assert not matches_target(path, [pattern]), pattern
    assert not matches_target(path, [])
    with pytest.raises(AdapterError, match="not valid regular expressions"):
        matches_target(path, ["attn1.(to_q"])


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).kind != "control"])  # those live in the UNet
def test_target_modules_select_the_same_modules_in_every_method(name, sd1_folder):
    pipe = load_pipeline(str(sd1_folder))
    before = dict(_snapshot(pipe)["types"])
    config = _config(name)
    config.target_modules = [r"attn1\.to_q"]
    get_method(name).attach(pipe, config, "t")
    after = dict(_snapshot(pipe)["types"])
    adapted = {path for path, kind in before.items() if after.get(path) is not kind}
    expected = {path for path in before if path.endswith(".attn1.to_q")}
    assert adapted == expected and expected
