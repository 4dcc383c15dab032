import json

from diffusers import StableDiffusionPipeline

from studio.shapes import embedded, world


def test_tokenizer_keeps_world_words_whole_and_splits_unknown_words():
    tok = embedded.build_tokenizer()
    for word in world.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    pieces = tok("sks", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and tok.unk_token_id not in pieces
    assert tok.decode(pieces) == "sks"


def test_shipped_model_is_a_plain_diffusers_pipeline_under_40mb():
    files = [p for p in embedded.SHAPES_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files) + embedded.JUDGE_PATH.stat().st_size
    assert total <= 40 * 2**20, total
    index = json.loads((embedded.SHAPES_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(embedded.SHAPES_DIR, local_files_only=True)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    # the shipped tokenizer is the one the recipe builds
    assert pipe.tokenizer.get_vocab() == embedded.build_tokenizer().get_vocab()
