import hashlib
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


def test_v1_tokenizer_vocabulary_and_merges_are_pinned():
    vocab, merges = embedded.tokenizer_vocab()
    digest = hashlib.sha256(repr((vocab, merges)).encode()).hexdigest()[:16]
    assert digest == "ea14fcdea2b38f9a"  # computed before world v2 was added
    assert embedded.tokenizer_vocab(world.V1) == (vocab, merges)


def test_v2_tokenizer_keeps_every_v2_caption_word_whole_and_v1_ids_unchanged():
    tok = embedded.build_tokenizer(world.V2)
    v2 = world.V2
    words = {w for sc in v2.pretraining_scenes(300, 0, two_shape_fraction=0.5)
             for c in v2.caption_variants(sc.specs, sc.seed) for w in c.split()}
    assert {"disc", "round", "shape", "rhombus", "hoop", "dome", "an", "and"} <= words
    for word in sorted(words | set(v2.vocabulary())):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    caption = "an orange round shape on the left and an orange trapezium on the right on a gray background"
    assert len(tok(caption, add_special_tokens=False).input_ids) == len(caption.split())
    pieces = tok("sks", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and tok.unk_token_id not in pieces and tok.decode(pieces) == "sks"
    # a v1 text encoder extends by appending rows: v1 tokens keep their ids, v1 merges come first
    (v1_vocab, v1_merges), (v2_vocab, v2_merges) = embedded.tokenizer_vocab(), embedded.tokenizer_vocab(v2)
    assert all(v2_vocab[token] == i for token, i in v1_vocab.items()) and v2_merges[:len(v1_merges)] == v1_merges
    assert sorted(v2_vocab.values()) == list(range(len(v2_vocab))) and len(v2_vocab) > len(v1_vocab)
    v1_tok = embedded.build_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id) == (v1_tok.bos_token_id, v1_tok.eos_token_id)
    for text in ("a small red circle at the top on a gray background", "a red sks on a blue background"):
        assert tok(text).input_ids == v1_tok(text).input_ids  # (sks too: pieces from v1 merges alone)


def test_new_components_of_world_v2_size_the_text_encoder_to_its_tokenizer():
    comps = embedded.new_components(0, world.V2)
    v2_tokens = len(embedded.tokenizer_vocab(world.V2)[0])
    assert comps["text_encoder"].config.vocab_size == len(comps["tokenizer"]) == v2_tokens
    assert len(embedded.new_components(0)["tokenizer"]) == len(embedded.tokenizer_vocab()[0]) < len(comps["tokenizer"])
