"""Every adapter-linear path against the plain-torch reference, gradients included."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from studio import load_pipeline
from studio.adapters import get_method
from studio.adapters.lora import LoraConfig
from studio.adapters.lora.layer import FusedLoraLinear
from studio.kernels import (SparsePattern, attention_backend, kernel_path, lora_linear, sparse_delta_conv2d,
                            sparse_delta_linear)
from studio.kernels.check import lora_outputs_and_grads
from studio.kernels.lora_linear import merge_pays
from studio.kernels.paths import auto_path, triton_available
from studio.kernels.sparse_delta import SAMPLED_BELOW

# fp32 sums over a few hundred terms: agreement to a few ulps of the largest value
TOL = dict(rtol=1e-5, atol=1e-4)


def _lora_case(tokens, fan_in, fan_out, ranks, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, fan_in, generator=g, requires_grad=True)
    weight = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
    b = torch.randn(fan_out, generator=g) if bias else None
    lora_a = [torch.randn(r, fan_in, generator=g, requires_grad=True) for r in ranks]
    lora_b = [torch.randn(fan_out, r, generator=g, requires_grad=True) for r in ranks]
    return x, weight, b, lora_a, lora_b


@pytest.fixture(params=["unmerged", "merged"])
def fused_mode(request, monkeypatch):
    """The fused path's two ways (thin products, or W + B·A made for the call), each forced."""
    module = importlib.import_module("studio.kernels.lora_linear")  # (the package's name is the function)
    at = float("inf") if request.param == "unmerged" else 0.0
    monkeypatch.setattr(module, "MERGE_AT", {"inference": at, "training": at})
    monkeypatch.setattr(module, "TRAINING_MERGE_MIN_RANK", 0)
    return request.param


@pytest.mark.parametrize("tokens,fan_in,fan_out,ranks,bias", [
    (37, 33, 45, [1], True),          # odd sizes, rank 1
    (1, 64, 17, [3], False),          # one token, no bias
    (100, 70, 130, [4, 2, 8], True),  # out > in, three adapters at once
])
def test_fused_lora_equals_reference_forward_and_backward(tokens, fan_in, fan_out, ranks, bias, fused_mode):
    case = _lora_case(tokens, fan_in, fan_out, ranks, bias)
    scales = [0.5, -1.25, 2.0][:len(ranks)]
    ref = lora_outputs_and_grads("reference", *case, scales)
    fused = lora_outputs_and_grads("fused", *case, scales)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, **TOL)
    # and the reference is the textbook sum of separate adapters
    x, weight, b, lora_a, lora_b = case
    textbook = torch.nn.functional.linear(x, weight, b) + sum(
        s * (x @ a.t()) @ bb.t() for a, bb, s in zip(lora_a, lora_b, scales))
    torch.testing.assert_close(ref[0], textbook.detach(), **TOL)


def test_fused_lora_merges_only_when_the_tokens_pay_for_it():
    assert not merge_pays(256, 1280, 1280, 4) and merge_pays(4096, 1280, 1280, 4)
    assert merge_pays(1024, 320, 320, 4) and not merge_pays(1, 64, 17, 4)
    assert merge_pays(512, 640, 640, 16) and not merge_pays(512, 640, 640, 16, training=True)
    assert merge_pays(1024, 320, 320, 16, training=True) and not merge_pays(1024, 320, 320, 4, training=True)
    x, weight, b, lora_a, lora_b = _lora_case(300, 64, 64, [4])
    assert merge_pays(2 * 300, 64, 64, 4)
    with torch.no_grad():  # inference takes the merged path too, without an autograd node
        y = lora_linear(x, weight, b, lora_a[0], lora_b[0], path="fused")
    torch.testing.assert_close(y, lora_linear(x, weight, b, lora_a[0], lora_b[0], path="reference").detach(), **TOL)


def test_fused_lora_trains_the_base_weight_when_asked(fused_mode):
    x, weight, b, lora_a, lora_b = _lora_case(20, 24, 40, [2])
    grads = {}
    for path in ("reference", "fused"):
        w = weight.clone().requires_grad_(True)
        bias = b.clone().requires_grad_(True)
        lora_linear(x, w, bias, lora_a[0], lora_b[0], path=path).square().sum().backward()
        grads[path] = (w.grad, bias.grad)
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("density", [0.01, 0.2])  # sampled (SDDMM) and dense-then-gather gradients
def test_fused_sparse_delta_equals_reference(density):
    assert 0.01 < SAMPLED_BELOW < 0.2  # the two cases take the two gradient routes
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 96, generator=g, requires_grad=True)
    weight = torch.randn(80, 96, generator=g)
    bias = torch.randn(80, generator=g)
    pattern = SparsePattern.from_mask(torch.rand(80, 96, generator=g) < density)
    values = torch.randn(pattern.index.numel(), generator=g, requires_grad=True)
    outs = {}
    for path in ("reference", "fused"):
        x.grad = values.grad = None
        y = sparse_delta_linear(x, weight, bias, values, pattern, path=path)
        (y * torch.linspace(-1, 1, 80)).sum().backward()
        outs[path] = (y.detach(), x.grad.clone(), values.grad.clone())
    for got, want in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(got, want, **TOL)
    # the values' gradient is the dense weight gradient read at the trained entries
    dense = (torch.linspace(-1, 1, 80)[None, :].expand(150, 80).t() @ x.detach().reshape(150, 96)).reshape(-1)
    torch.testing.assert_close(outs["fused"][2], dense[pattern.index], **TOL)


class _BigOutputs(TorchDispatchMode):
    """Records the shapes of matmul/convolution outputs with at least `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "convolution_backward") and any(
                isinstance(t, torch.Tensor) and t.numel() >= self.limit for t in (out if isinstance(out, tuple)
                                                                                   else (out,))):
            self.seen.append(name)
        return out


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparse_delta_saves_no_dense_weight_and_never_forms_its_gradient(kind, monkeypatch):
    """SaRA's memory claim on every device: autograd keeps no weight-sized tensor but the frozen weight itself
    (the parameter, not a copy), and the values' gradient is formed in row blocks, never weight-sized."""
    import studio.kernels.sparse_delta as sd

    monkeypatch.setattr(sd, "CHUNK_ELEMENTS", 4096)
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        weight = torch.randn(256, 128, generator=g)
        x = torch.randn(2, 8, 128, generator=g, requires_grad=True)
    else:
        conv = torch.nn.Conv2d(32, 64, 3, padding=1)
        weight = conv.weight.detach().requires_grad_(False)
        conv.weight.requires_grad_(False)
        x = torch.randn(1, 32, 6, 6, generator=g, requires_grad=True)
    pattern = SparsePattern.from_mask(torch.rand(weight.shape[0], weight[0].numel(), generator=g) < 0.2)
    values = torch.randn(pattern.index.numel(), generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = (sparse_delta_linear(x, weight, None, values, pattern, path="fused") if kind == "linear"
             else sparse_delta_conv2d(x, conv, values, pattern.index, path="fused"))
    weight_sized = [t for t in saved if t.numel() >= weight.numel()]
    assert all(t.data_ptr() == weight.data_ptr() for t in weight_sized), [t.shape for t in weight_sized]
    with _BigOutputs(weight.numel()) as mode:
        y.square().sum().backward()
    assert mode.seen == [], mode.seen
    ref = x.detach().clone().requires_grad_(True), values.detach().clone().requires_grad_(True)
    y_ref = (sparse_delta_linear(ref[0], weight, None, ref[1], pattern, path="reference") if kind == "linear"
             else sparse_delta_conv2d(ref[0], conv, ref[1], pattern.index, path="reference"))
    y_ref.square().sum().backward()
    torch.testing.assert_close(values.grad, ref[1].grad, **TOL)
    torch.testing.assert_close(x.grad, ref[0].grad, **TOL)


def test_sparse_pattern_from_index_sorts_and_checks_bounds():
    pattern = SparsePattern.from_index(torch.tensor([7, 2, 2, 5]), (3, 4))
    assert pattern.index.tolist() == [2, 5, 7]
    assert pattern.rows.tolist() == [0, 1, 1] and pattern.cols.tolist() == [2, 1, 3]
    assert pattern.crow.tolist() == [0, 1, 3, 3]
    with pytest.raises(ValueError, match="outside a 3×4 weight"):
        SparsePattern.from_index(torch.tensor([12]), (3, 4))


def test_triton_kernels_in_interpreter_mode_equal_the_reference():
    """The kernels' odd-shape check (`studio.kernels.check`: blocks not filled, rank 1, batch 1, one token,
    out > in), its Triton kernels run by the interpreter on the CPU, in fp32."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "STUDIO_KERNELS": "triton"}
    r = subprocess.run([sys.executable, "-m", "studio.kernels.check", "--paths", "triton", "fused"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count(" ok") == 2, r.stdout


def test_kernel_path_is_chosen_and_can_be_forced(monkeypatch):
    monkeypatch.delenv("STUDIO_KERNELS", raising=False)
    assert kernel_path(torch.zeros(1)) == "fused"
    assert kernel_path(torch.zeros(1, dtype=torch.bfloat16)) == "fused"
    # on CUDA (the choice measured on an H100): Triton for fp32, the plain path for half precision
    assert auto_path(True, torch.float32) == ("triton" if triton_available() else "reference")
    assert auto_path(True, torch.float16) == auto_path(True, torch.bfloat16) == "reference"
    # the sparse delta: fused everywhere (it keeps no merged weight for backward; SaRA's memory saving)
    assert auto_path(True, torch.float32, op="sparse") == auto_path(True, torch.bfloat16, op="sparse") == "fused"
    monkeypatch.setenv("STUDIO_KERNELS", "reference")
    assert kernel_path(torch.zeros(1)) == "reference"
    monkeypatch.setenv("STUDIO_KERNELS", "fast")
    with pytest.raises(ValueError, match="STUDIO_KERNELS='fast'"):
        kernel_path(torch.zeros(1))
    monkeypatch.setenv("STUDIO_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        kernel_path(torch.zeros(1))


def test_attention_backend_is_sdpa_on_the_cpu_and_xformers_is_refused_there(monkeypatch):
    monkeypatch.delenv("STUDIO_ATTENTION", raising=False)
    assert attention_backend("cpu") == "sdpa"
    monkeypatch.setenv("STUDIO_ATTENTION", "xformers")
    with pytest.raises(RuntimeError, match="needs CUDA and the xformers package"):
        attention_backend("cpu")


def test_lora_adapters_run_on_the_fused_kernel_and_match_peft(monkeypatch):
    """Two LoRAs active with weights: the UNet's output and the trained adapter's gradients are the same
    through the fused kernel, the reference path and PEFT's own layer."""
    pipe = load_pipeline("shapes")
    lora = get_method("lora")
    for name, seed in (("one", 1), ("two", 2)):
        lora.attach(pipe, LoraConfig(rank=4, alpha=8.0), name)
        g = torch.Generator().manual_seed(seed)
        for p in lora.trainable_parameters(pipe, name):
            p.data = torch.randn(p.shape, generator=g) * 0.05
    lora.set_weights(pipe, {"one": 0.8, "two": -0.5})
    layers = [m for m in pipe.unet.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    for p in lora.trainable_parameters(pipe, "one"):
        p.requires_grad_(True)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([500, 100])

    def run():
        pipe.unet.zero_grad(set_to_none=True)
        out = pipe.unet(latents, t, encoder_hidden_states=text).sample
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in lora.trainable_parameters(pipe, "one")]

    import studio.adapters.lora.layer as layer_module
    paths = []
    monkeypatch.setattr(layer_module, "lora_linear",
                        lambda *a, path=None: paths.append(path) or lora_linear(*a, path=path))
    monkeypatch.delenv("STUDIO_KERNELS", raising=False)
    fused = run()
    assert len(paths) == len(layers) and set(paths) == {"fused"}  # every LoRA layer took the kernel
    monkeypatch.setenv("STUDIO_KERNELS", "reference")
    reference = run()
    monkeypatch.setattr(FusedLoraLinear, "forward", PeftLoraLinear.forward)
    peft = run()
    for other in (reference, peft):
        torch.testing.assert_close(fused[0], other[0], **TOL)
        for got, want in zip(fused[1], other[1]):
            torch.testing.assert_close(got, want, **TOL)


def test_inference_cache_follows_weights_scales_and_adapters():
    """The stacked adapters are kept between no-grad calls; any change to what they depend on is seen."""
    pipe = load_pipeline("shapes")
    lora = get_method("lora")
    for name in ("one", "two"):
        lora.attach(pipe, LoraConfig(rank=2, alpha=2.0), name)
    layer = next(m for m in pipe.unet.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(1, 5, layer.in_features)

    def expected(weights):
        out = layer.base_layer(x)
        for name, w in weights.items():
            out = out + w * (x @ layer.lora_A[name].weight.t()) @ layer.lora_B[name].weight.t()
        return out

    with torch.no_grad():
        lora.set_weights(pipe, {"one": 1.0})
        torch.testing.assert_close(layer(x), expected({"one": 1.0}), **TOL)  # B is zero at init
        layer.lora_B["one"].weight.normal_()  # in place: the version counter moves
        torch.testing.assert_close(layer(x), expected({"one": 1.0}), **TOL)
        lora.set_weights(pipe, {"one": 0.25})
        torch.testing.assert_close(layer(x), expected({"one": 0.25}), **TOL)
        layer.lora_B["two"].weight.normal_()
        lora.set_weights(pipe, {"one": 0.25, "two": -1.0})
        torch.testing.assert_close(layer(x), expected({"one": 0.25, "two": -1.0}), **TOL)
        lora.set_weights(pipe, {"one": 0.0, "two": 0.0})
        assert torch.equal(layer(x), layer.base_layer(x))  # weight 0 is off, exactly


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_sparse_delta_conv_equals_reference(kernel, stride, padding):
    from studio.kernels import sparse_delta_conv2d

    g = torch.Generator().manual_seed(kernel + stride)
    conv = torch.nn.Conv2d(6, 10, kernel, stride=stride, padding=padding).requires_grad_(False)
    x = torch.randn(2, 6, 9, 9, generator=g, requires_grad=True)
    index = torch.randperm(conv.weight.numel(), generator=g)[:40].sort().values
    values = torch.randn(40, generator=g, requires_grad=True)
    outs = {}
    for path in ("reference", "fused"):
        x.grad = values.grad = None
        y = sparse_delta_conv2d(x, conv, values, index, path=path)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[path] = (y.detach(), x.grad.clone(), values.grad.clone())
    for got, want in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(got, want, **TOL)
