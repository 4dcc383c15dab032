"""SaRA: selection, exact sparsity of the update, the penalty's gradient, the engine's accumulation and
clipping, files that load only on their base, and baking to LoRA."""

import pytest
import torch

from conftest import unet_out
from studio import load_pipeline
from studio.adapters import AdapterError, base_fingerprint, get_method, load_adapters, save_adapter
from studio.adapters.sara import SaraConfig
from studio.adapters.sara.bake import bake_to_lora
from studio.adapters.sara.config import parse_budget
from studio.adapters.sara.layer import SaraLayer
from studio.adapters.sara.model import nuclear_penalty


def _layers(pipe):
    return {path: m for path, m in pipe.unet.named_modules() if isinstance(m, SaraLayer)}


def _randomise(pipe, name, seed=0, std=0.01):
    g = torch.Generator().manual_seed(seed)
    for p in get_method("sara").trainable_parameters(pipe, name):
        p.data = torch.randn(p.shape, generator=g) * std


def test_budget_and_threshold_select_the_smallest_weights():
    pipe = load_pipeline("shapes")
    originals = {p: m.weight.detach().clone() for p, m in pipe.unet.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="150k"), "b")
    sel = sara.selection
    assert sel["trained"] == 150_000 and sel["total"] == sum(w.numel() for w in originals.values())
    assert sum(n for n, _ in sel["per_layer"].values()) == 150_000  # the per-layer report adds up
    theta = sel["threshold"]
    for path, layer in _layers(pipe).items():
        w = originals[path].reshape(-1)
        chosen = torch.zeros_like(w, dtype=torch.bool)
        chosen[layer.patterns["b"].index] = True
        assert (w[chosen].abs() < theta).all() and (w[~chosen].abs() >= theta).all()
    # the same θ given as an absolute threshold selects the same entries
    other = load_pipeline("shapes")
    sara.attach(other, SaraConfig(threshold=theta, budget=None), "t")
    assert sara.selection["trained"] == 150_000
    assert parse_budget("3%", 1000) == parse_budget("0.03", 1000) == 30 and parse_budget("20M", 10**9) == 20_000_000
    for bad in ({"budget": "lots"}, {"budget": "5%", "threshold": 1e-3}, {"budget": None}):
        with pytest.raises(AdapterError):
            SaraConfig(**bad)


def test_only_the_selected_entries_change_and_exactly():
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="2%"), "s")
    params = sara.trainable_parameters(pipe, "s")
    opt = torch.optim.AdamW(params, lr=1e-2)
    pipe.unet.train()
    for seed in range(2):
        _step(pipe, opt, seed)
    pipe.unet.eval()
    for layer in _layers(pipe).values():
        before = layer.base_layer.weight.detach().reshape(-1).clone()
        after = layer._inference_weight([("s", 1.0)]).reshape(-1)
        changed = (after != before).nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(layer.patterns["s"].index.tolist())
    assert sum(int((p != 0).sum()) for p in params) > 0.9 * sum(p.numel() for p in params)


def test_nuclear_penalty_gradient_reaches_the_trained_values():
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="5%"), "s")
    _randomise(pipe, "s")
    training = [(p, layer, "s") for p, layer in sorted(_layers(pipe).items())]
    config = SaraConfig(budget="5%", nuclear_weight=0.1, nuclear_layers=0, nuclear_min_dim=32)
    penalty = nuclear_penalty(training, config, step=7)
    penalty.backward()
    for _, layer, _ in training:
        w = layer.base_layer.weight
        rows, cols = w.shape[0], w[0].numel()
        grad = layer.values["s"].grad
        if min(rows, cols) < 32:
            assert grad is None or not grad.any()
            continue
        delta = layer.dense_delta("s").view(rows, cols)
        u, _, vh = torch.linalg.svd(delta, full_matrices=False)
        expected = (0.1 * u @ vh).reshape(-1)[layer.patterns["s"].index]  # λ·(U Vᵀ) at the trained entries
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    # one layer per step: the draw depends on the step only
    one = SaraConfig(budget="5%", nuclear_layers=1)
    assert nuclear_penalty(training, one, 3).item() == nuclear_penalty(training, one, 3).item()


def _train(tmp_path, name, data, **kw):
    from studio.training.engine import train

    return train(data=str(data), trigger="sks", method="sara", adapter={"budget": "1%", "nuclear_layers": 0},
                 output_dir=str(tmp_path / name), name=name, steps=2, batch_size=4, lr=1e-2, lr_warmup_steps=0,
                 preview_every=0, checkpoint_every=100, tensorboard=False, progress_bar=False, **kw)


def test_accumulation_and_the_dense_path_equal_the_large_batch_with_clipping(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from studio.bench.evaluate import write_b2_training_set

    data = tmp_path / "stars"
    write_b2_training_set(data)
    clip = {"max_grad_norm": 1e-4}  # far below the gradient's norm: clipping acts on every step
    big = load_file(_train(tmp_path, "big", data, **clip).adapter_path)
    accumulated = load_file(_train(tmp_path, "acc", data, grad_accum=2, **clip).adapter_path)
    monkeypatch.setenv("STUDIO_KERNELS", "reference")  # dense ΔW through plain autograd
    dense = load_file(_train(tmp_path, "dense", data, **clip).adapter_path)
    values = [k for k in big if k.endswith(".values")]
    assert sum(int(big[k].ne(0).sum()) for k in values) > 0
    for other in (accumulated, dense):
        for k in values:
            torch.testing.assert_close(other[k], big[k], rtol=1e-3, atol=1e-5)  # updates are ~2e-2


def test_save_load_reproduces_outputs_and_another_base_is_refused(tmp_path, sd1_folder):
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="2%"), "s")
    _randomise(pipe, "s")
    sara.set_weights(pipe, {"s": 1.0})
    expected = unet_out(pipe)
    path = save_adapter(tmp_path / "s.safetensors", "sara", SaraConfig(budget="2%"), sara.state_dict(pipe, "s"),
                        base_fingerprint(pipe))
    fresh = load_pipeline("shapes")
    base_out = unet_out(fresh)
    load_adapters(fresh, {path: 1.0})
    assert torch.equal(unet_out(fresh), expected)
    assert not torch.equal(expected, base_out)
    # merged into the weights: the same model, as a plain pipeline
    from studio.adapters import merge_adapters

    merge_adapters(fresh)
    assert not _layers(fresh)
    torch.testing.assert_close(unet_out(fresh), expected, rtol=0, atol=1e-5)
    # the same architecture with other weights: refused, and nothing is left attached
    other = load_pipeline("shapes")
    layer = next(m for m in other.unet.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        layer.weight.mul_(1.001)
    with pytest.raises(AdapterError, match="trained on another checkpoint"):
        load_adapters(other, {path: 1.0})
    assert not _layers(other)
    # another architecture: refused naming the layer
    with pytest.raises(AdapterError, match="does not"):
        load_adapters(load_pipeline(str(sd1_folder)), {path: 1.0})


def test_bake_to_lora_error_falls_with_rank_and_the_lora_reproduces_sara(tmp_path):
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="2%"), "s")
    _randomise(pipe, "s", std=0.02)
    sara.set_weights(pipe, {"s": 1.0})
    expected = unet_out(pipe)
    path = save_adapter(tmp_path / "s.safetensors", "sara", SaraConfig(budget="2%"), sara.state_dict(pipe, "s"),
                        base_fingerprint(pipe))
    errors = [bake_to_lora(path, rank, tmp_path / f"l{rank}.safetensors")[1] for rank in (1, 4, 16, 64, 512)]
    assert all(a > b for a, b in zip(errors, errors[1:-1])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-5  # full rank: exact
    full = load_pipeline("shapes", adapters=[tmp_path / "l512.safetensors"])
    torch.testing.assert_close(unet_out(full), expected, rtol=0, atol=1e-4)
    with pytest.raises(AdapterError, match="lora adapter, not sara"):
        bake_to_lora(tmp_path / "l4.safetensors", 2)


def test_gradient_clipping_sees_the_dense_gradient_at_the_trained_entries():
    """The official UB mode clips a norm of 0; here the values are ordinary leaves whose gradient is the
    dense weight gradient read at the mask, so the clipped norm is the true one."""
    pipe = load_pipeline("shapes")
    dense = load_pipeline("shapes")
    sara = get_method("sara")
    sara.attach(pipe, SaraConfig(budget="2%"), "s")
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([700, 30])
    pipe.unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()
    dense.unet.requires_grad_(True)
    dense.unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()
    modules = dict(dense.unet.named_modules())
    gathered = []
    for path, layer in sorted(_layers(pipe).items()):
        want = modules[path].weight.grad.reshape(-1)[layer.patterns["s"].index]
        torch.testing.assert_close(layer.values["s"].grad, want, rtol=1e-4, atol=1e-9)
        gathered.append(want)
    norm = torch.nn.utils.clip_grad_norm_(sara.trainable_parameters(pipe, "s"), 1e-3)
    torch.testing.assert_close(norm, torch.cat(gathered).norm(), rtol=1e-4, atol=0)


def _step(pipe, opt, seed):
    opt.zero_grad()
    g = torch.Generator().manual_seed(seed)
    out = pipe.unet(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 50]),
                    encoder_hidden_states=torch.randn(2, 77, 128, generator=g)).sample
    out.square().mean().backward()
    opt.step()


def test_reselection_freezes_grown_entries_and_carries_the_others_optimizer_state():
    pipe = load_pipeline("shapes")
    sara = get_method("sara")
    config = SaraConfig(budget="1%", reselect_at=2)
    sara.attach(pipe, config, "s")
    theta = sara.selection["threshold"]
    params = sara.trainable_parameters(pipe, "s")
    opt = torch.optim.AdamW(params, lr=theta / 4, weight_decay=0.5)  # weight decay must not move frozen entries
    pipe.unet.train()
    for step in (1, 2):
        _step(pipe, opt, step)
        assert sara.after_step(pipe, "s", step, opt) is None or step == 2
    layers = list(_layers(pipe).values())
    frozen = torch.cat([layer.frozen["s"] for layer in layers])
    assert 0.05 < frozen.float().mean() < 0.95  # some grew past θ, some did not
    for layer in layers:  # frozen = exactly the entries with |W + ΔW| >= θ after step 2
        w = layer.base_layer.weight.detach().reshape(-1)[layer.patterns["s"].index] + layer.values["s"].detach()
        assert torch.equal(layer.frozen["s"], w.abs() >= theta)
    moments = {id(p): opt.state[p]["exp_avg"].clone() for p in params}
    at_reselection = [p.detach().clone() for p in params]
    for step in (3, 4):
        _step(pipe, opt, step)
        sara.after_step(pipe, "s", step, opt)
        if step == 3:  # the survivors' moments went on from where they were (not reset)
            for p, layer in zip(params, layers):
                keep = ~layer.frozen["s"]
                beta1 = 0.9
                expected = beta1 * moments[id(p)][keep] + (1 - beta1) * p.grad[keep]
                torch.testing.assert_close(opt.state[p]["exp_avg"][keep], expected)
    after = [p.detach() for p in params]
    for before, now, layer in zip(at_reselection, after, layers):
        mask = layer.frozen["s"]
        assert torch.equal(now[mask], before[mask])
    assert any(bool((now[~layer.frozen["s"]] != before[~layer.frozen["s"]]).any())
               for before, now, layer in zip(at_reselection, after, layers))


def test_reselection_is_on_by_default_at_half_the_steps():
    assert SaraConfig().for_run(1000).reselect_at == 500
    assert SaraConfig().for_run(1).reselect_at == 1
    assert SaraConfig(reselect=None).for_run(10).reselect_at is None
    assert SaraConfig(reselect_at=3).for_run(10).reselect_at == 3
    with pytest.raises(AdapterError, match="reselect is a fraction"):
        SaraConfig(reselect=1.5)


def test_resume_after_reselection_equals_an_uninterrupted_run(tmp_path):
    """Re-selection as the defaults have it (half the steps: step 2 of 4), and a run resumed after it."""
    import shutil

    from safetensors.torch import load_file

    from studio.bench.evaluate import write_b2_training_set
    from studio.training.engine import train

    data = tmp_path / "stars"
    write_b2_training_set(data)
    probe = load_pipeline("shapes")
    get_method("sara").attach(probe, SaraConfig(budget="1%"), "p")
    lr = get_method("sara").selection["threshold"] / 4
    events = []

    def run(name, steps, **kw):
        return train(data=str(data), trigger="sks", method="sara", output_dir=str(tmp_path / name), name=name,
                     adapter={"budget": "1%"}, steps=steps, batch_size=2, lr=lr,
                     lr_warmup_steps=0, preview_every=0, checkpoint_every=1, keep_checkpoints=10, tensorboard=False,
                     progress_bar=False, on_event=events.append, **kw)

    whole = load_file(run("whole", 4).adapter_path)
    assert any("re-selection at step 2" in e.get("message", "") for e in events)
    frozen = [k for k in whole if k.endswith(".frozen")]
    assert frozen and 0 < sum(int(whole[k].sum()) for k in frozen) < sum(whole[k].numel() for k in frozen)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_0000003",
                    tmp_path / "resumed" / "checkpoints" / "step_0000003")
    resumed = load_file(run("resumed", 4, resume="latest").adapter_path)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)


def test_the_training_cost_benchmark_steps_sara_as_the_engine_does(monkeypatch):
    """B6 measures SaRA with its own loss (the nuclear-norm term) and its after-step hook (re-selection at half
    the measured run), not the bare denoising loss."""
    from studio.bench import train_cost

    sara, seen = get_method("sara"), {"loss": [], "after": [], "reselect_at": []}
    loss, after = sara.training_loss, sara.after_step

    def counting_loss(pipe, batch, default_loss):
        seen["loss"].append(batch["step"])
        return loss(pipe, batch, default_loss)

    def counting_after(pipe, adapter, step, optimizer):
        seen["after"].append(step)
        seen["reselect_at"].append(pipe._studio_sara_config.reselect_at)
        return after(pipe, adapter, step, optimizer)

    monkeypatch.setattr(sara, "training_loss", counting_loss)
    monkeypatch.setattr(sara, "after_step", counting_after)
    result = train_cost.measure("shapes", "sara", 3)
    assert seen["loss"] == seen["after"] == [1, 2, 3, 4] and set(seen["reselect_at"]) == {2}
    assert result["trainable"] > 0 and result["step_s"] > 0
