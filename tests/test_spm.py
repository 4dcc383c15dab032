"""SPM membranes: per-prompt strength (Facilitated Transport), exactness at strength 0, order-free stacking,
refusal across architectures, export as a plain LoRA, and that the erase objective trains."""

import numpy as np
import pytest
import torch

from studio import load_pipeline
from studio.adapters import AdapterError, base_fingerprint, get_method, read_adapter, save_adapter
from studio.adapters.io import export_adapter
from studio.adapters.spm import SpmConfig
from studio.adapters.spm.config import EraseSettings
from studio.adapters.spm.erase import TRAINING_NAME, random_anchors
from studio.tasks.erase import erase_esd, train_membrane
from studio.adapters.spm.transport import permeability
from studio.pipelines.membranes import load_membranes, use_membranes

PROMPTS = ["a large red circle on a blue background", "a small green square at the top"]


def _membrane(pipe, path, concepts, seed, std=0.3):
    """A membrane with random non-zero weights (training is tested below), saved as a studio file."""
    spm = get_method("spm")
    config = SpmConfig(concepts=concepts)
    spm.attach(pipe, config, "m")
    g = torch.Generator().manual_seed(seed)
    for p in spm.trainable_parameters(pipe, "m"):
        p.data = torch.randn(p.shape, generator=g) * std
    return save_adapter(path, "spm", config, spm.state_dict(pipe, "m"), base_fingerprint(pipe))


@pytest.fixture(scope="module")
def membrane_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    return (_membrane(load_pipeline("shapes"), folder / "circle.safetensors", ["circle"], 1),
            _membrane(load_pipeline("shapes"), folder / "red.safetensors", ["red"], 2))


def _images(pipe, prompts, steps=4):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images


def test_permeability_is_high_for_the_concept_and_zero_for_other_prompts(shapes_pipe):
    gamma = permeability(shapes_pipe, PROMPTS + ["a blue triangle", "circle"], ["circle"])
    assert gamma.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert permeability(shapes_pipe, PROMPTS, ["red", "square"]).tolist() == [1.0, 1.0]
    # the official clipcos metric has a floor on unrelated prompts (why it is not the default)
    floor = permeability(shapes_pipe, ["a small green square at the top"], ["circle"], metric="clipcos")
    assert 0.5 < float(floor) < 1.0
    with pytest.raises(AdapterError, match="unknown permeability metric"):
        permeability(shapes_pipe, PROMPTS, ["circle"], metric="cosine")


def test_tokensim_opens_the_membrane_on_a_synonym_and_stays_shut_on_unrelated_prompts():
    """On the shipped encoder extended with world v2's words (as v2 pretraining starts: "disc" at "circle", then
    moved a little, as training moves it), the default metric gives the paraphrase a high strength, tokenuni 0;
    every prompt naming no circle, in any word, gets exactly 0."""
    from transformers import CLIPTextModel

    from studio.shapes import embedded, world
    from studio.shapes.pretrain import extend_text_encoder

    pipe = load_pipeline("shapes")
    old, pipe.tokenizer = pipe.tokenizer, embedded.build_tokenizer(world.V2)
    pipe.text_encoder = extend_text_encoder(CLIPTextModel.from_pretrained(embedded.SHAPES_DIR / "text_encoder"), old,
                                            pipe.tokenizer, world.V2)
    table = pipe.text_encoder.get_input_embeddings().weight
    disc = pipe.tokenizer.convert_tokens_to_ids("disc</w>")
    with torch.no_grad():
        table[disc] += 0.1 * table[disc].norm() * torch.nn.functional.normalize(
            torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
    paraphrase, unrelated = ["a red disc on a blue background"], ["a red box on a blue background", "a green hoop",
                                                                  "a small yellow hexagon at the top", ""]
    gamma = permeability(pipe, paraphrase + unrelated + ["a circle"], ["circle"])
    assert gamma[0] > 0.5 and gamma[1:-1].tolist() == [0.0] * len(unrelated) and gamma[-1] == pytest.approx(1.0)
    assert permeability(pipe, paraphrase, ["circle"], metric="tokenuni").tolist() == [0.0]


def test_strength_zero_gives_the_base_model_exactly_and_each_prompt_gets_its_own(shapes_pipe, membrane_files):
    base = _images(shapes_pipe, PROMPTS)
    pipe = load_pipeline("shapes", membranes=[membrane_files[0]])
    mixed = _images(pipe, PROMPTS)
    assert pipe.studio_last_permeability == {"circle": [1.0, 0.0]}
    assert np.array_equal(mixed[1], base[1])            # the square prompt passes through untouched
    assert np.abs(mixed[0] - base[0]).max() > 0.05       # the circle prompt is changed ...
    alone = _images(pipe, PROMPTS[:1])
    assert np.abs(mixed[0] - alone[0]).max() < 1e-4      # ... exactly as when it runs alone
    use_membranes(pipe, None)                             # no transport: the membrane acts on every prompt
    assert np.abs(_images(pipe, PROMPTS)[1] - base[1]).max() > 0.05


def test_stacking_order_does_not_matter(membrane_files):
    circle, red = membrane_files
    one = _images(load_pipeline("shapes", membranes=[circle, red]), PROMPTS)
    two = _images(load_pipeline("shapes", membranes=[red, circle]), PROMPTS)
    # the same sum in another order: float reassociation only, through 25 steps (1.2e-5 seen on a busy CPU;
    # one 8-bit level is 3.9e-3, and a real dependence on order shows as > 0.05 like the line below)
    assert np.abs(one - two).max() < 1e-4
    assert np.abs(one - _images(load_pipeline("shapes", membranes=[circle]), PROMPTS)).max() > 0.05


def test_membrane_for_another_architecture_is_refused(sd1_folder, membrane_files, tmp_path):
    other = load_pipeline(str(sd1_folder))
    path = _membrane(other, tmp_path / "sd1.safetensors", ["circle"], 3)
    with pytest.raises(AdapterError, match="was trained for"):
        load_membranes(load_pipeline("shapes"), [path])
    with pytest.raises(AdapterError, match="trained for"):
        load_membranes(other, [membrane_files[0]])
    with pytest.raises(AdapterError, match="not a membrane"):
        lora = tmp_path / "lora.safetensors"
        save_adapter(lora, "lora", {"rank": 1}, read_adapter(membrane_files[0]).tensors, {})
        load_membranes(load_pipeline("shapes"), [lora])


def test_membrane_exports_as_a_plain_lora_that_diffusers_loads(membrane_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, = export_adapter(membrane_files[0], "diffusers", tmp_path / "circle.diffusers.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(_shapes_dir(), safety_checker=None)
    pipe.load_lora_weights(str(out))
    ours = load_pipeline("shapes", membranes=[membrane_files[0]], transport=None)
    a, b = _images(pipe, PROMPTS[1:]), _images(ours, PROMPTS[1:])
    assert np.abs(a - b).max() < 1e-3


def _shapes_dir():
    from studio.shapes.embedded import SHAPES_DIR

    return str(SHAPES_DIR)


def test_anchors_have_the_target_norm_range():
    target = torch.randn(8, 16)
    anchors = random_anchors(target, 50, torch.Generator().manual_seed(0))
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert anchors.shape == (50, 8, 16) and ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6


def _erase_gap(pipe, config, spm_on: bool) -> float:
    """Distance of the model's prediction on a circle prompt from the erase target (at fixed noise)."""
    from studio.adapters.prompts import embed_prompts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor(600)
    text = embed_prompts(pipe, config.prompts[:1] * 2)[0]
    empty = embed_prompts(pipe, [""] * 2)[0]
    spm = get_method("spm")
    with torch.no_grad():
        with spm.disabled(pipe):
            e_tar = pipe.unet(x, t, encoder_hidden_states=text).sample
            e_sur = pipe.unet(x, t, encoder_hidden_states=empty).sample
        goal = e_sur - config.eta * (e_tar - e_sur)
        pred = pipe.unet(x, t, encoder_hidden_states=text).sample if spm_on else e_tar
    return float((pred - goal).pow(2).mean())


def test_erase_training_moves_the_prediction_to_the_target_and_only_trains_the_membrane(tmp_path):
    pipe = load_pipeline("shapes")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    config = SpmConfig(concepts=["circle"], prompts=["a red circle", "a large blue circle on a gray background"])
    result = train_membrane(pipe, config, EraseSettings(steps=80, lr=5e-3, batch=2, denoise_steps=4),
                            tmp_path / "c.safetensors")
    gap_base, gap_trained = _erase_gap(pipe, config, False), _erase_gap(pipe, config, True)
    assert gap_trained < 0.7 * gap_base
    for name, p in pipe.unet.named_parameters():
        if name in before:  # every base weight is untouched
            assert torch.equal(p, before[name]), name
    assert result.trainable_parameters == sum(t.numel() for t in read_adapter(result.path).tensors.values())
    assert read_adapter(result.path).config["concepts"] == ["circle"]
    assert TRAINING_NAME in pipe._studio_membranes


def test_esd_baseline_changes_only_cross_attention():
    pipe = load_pipeline("shapes")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    erase_esd(pipe, SpmConfig(concepts=["circle"], prompts=["a red circle"]),
              EraseSettings(steps=3, lr=1e-3, batch=1, denoise_steps=3))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn2." in n for n in changed)


def test_the_same_seed_trains_the_same_membrane(tmp_path):
    files = []
    for i in range(2):
        torch.randn(17 + i)  # whatever the process drew before must not matter
        config = SpmConfig(concepts=["circle"], prompts=["a red circle"])
        files.append(train_membrane(load_pipeline("shapes"), config, EraseSettings(steps=3, batch=1, denoise_steps=3),
                                    tmp_path / f"{i}.safetensors").path)
    one, two = (read_adapter(f).tensors for f in files)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_membranes_and_loras_share_layers_without_switching_each_other_off(membrane_files, tmp_path):
    from studio.adapters import attached_adapters, load_adapters, set_adapter_weights
    from studio.adapters.lora import LoraConfig

    pipe = load_pipeline("shapes")
    lora = get_method("lora")
    lora.attach(pipe, LoraConfig(rank=2), "l")
    path = save_adapter(tmp_path / "l.safetensors", "lora", LoraConfig(rank=2), lora.state_dict(pipe, "l"),
                        base_fingerprint(pipe))
    pipe = load_pipeline("shapes")
    names = load_adapters(pipe, {path: 1.0}) + load_adapters(pipe, {membrane_files[0]: 0.0})
    set_adapter_weights(pipe, {names[0]: 0.5, names[1]: 1.0})
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert set(layer.active_adapters) == set(names) and attached_adapters(pipe)[names[1]]["weight"] == 1.0


def test_anchors_are_not_capped_by_the_batch(shapes_pipe):
    """The sd15 preset trains with batch 1 and 3 anchors: a step draws all 3 (each reading the one row's
    latents), and the loss takes them."""
    from studio.adapters.spm.config import EraseSettings, SpmConfig
    from studio.adapters.spm.erase import erase_draw, erase_loss, erase_targets
    from studio.adapters.denoise import denoiser_call

    config = SpmConfig(concepts=["circle"], anchors=3, anchor_weight=1.0, anchor_empty=False)
    settings = EraseSettings(denoise_steps=2, batch=1)
    targets = erase_targets(shapes_pipe, config, settings)
    draw = erase_draw(targets, config, 1, torch.Generator().manual_seed(0), anchors=True)
    assert len(draw.anchors) == 3 and draw.anchor_rows == [0, 0, 0]
    call = denoiser_call(shapes_pipe, shapes_pipe.unet, targets.pixels)
    loss = erase_loss(call, call, targets, config, settings, draw, range(1))
    assert torch.isfinite(loss)


def test_the_paraphrase_set_pairs_each_word_with_the_same_circles_and_its_goal_reads_the_table():
    """B3's paraphrase set: the same specs and seeds under 'circle', 'disc' and 'round shape' (so residuals compare
    image for image), world v2's parser reads each as a circle, the collateral set names no circle; the goal reads
    the transport row's residuals and collateral."""
    from studio.bench.erase import PARAPHRASES, paraphrase_sets
    from studio.bench.goals import readings
    from studio.shapes import world

    sets, others = paraphrase_sets(8)
    assert list(sets) == ["circle", *PARAPHRASES["circle"]]
    seeds = [[seed for _, seed in pairs] for pairs in sets.values()]
    assert seeds[0] == seeds[1] == seeds[2]
    for word, pairs in sets.items():
        for prompt, _ in pairs:
            assert world.V2.parse_caption(prompt).shape == "circle"
            assert (word == "circle") == ("circle" in prompt)
    assert all(spec.shape != "circle" for spec, _ in others) and len(others) == 8
    header = ["model", "transport", "read as circle: 'circle' prompts", "read as circle: 'disc' prompts",
              "read as circle: 'round shape' prompts", "other shapes: mean attribute accuracy", "collateral (pts)"]
    rows = [["base model", "—", "95.0%", "90.0%", "88.0%", "97.0%", "+0.0"],
            ["SPM circle", "yes", "4.0%", "6.0%", "12.5%", "97.0%", "+0.0"]]
    (goal, (figure, met)), = [r for r in readings(("B3 paraphrase set v1 (shapes, n=8)", header, rows))]
    assert goal.metric.startswith("paraphrase set") and "12.5%" in figure and met is False
    rows[1][4] = "9.0%"
    (_, (_, met)), = readings(("B3 paraphrase set v1 (shapes, n=8)", header, rows))
    assert met is True
