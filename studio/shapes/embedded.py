"""The embedded base model "shapes": its architecture, tokenizer and where the shipped weights live.

A real Stable-Diffusion-architecture model (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, DDIM scheduler), small enough to train and run on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

from studio.shapes import world

MODELS_DIR = Path(__file__).resolve().parent / "models"
SHAPES_DIR = MODELS_DIR / "shapes"
JUDGE_PATH = MODELS_DIR / "judge.safetensors"
FAST_DECODER_DIR = MODELS_DIR / "fast_decoder"  # AutoencoderTiny distilled from the shapes VAE (one-step generation)

MAX_TOKENS = 32
TEXT_WIDTH = 128


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_vocab(shapes_world: world.World = world.V1) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE in CLIP's format whose merges make every word of the world one token.

    Unknown words (new trigger words) still tokenize, into byte-level pieces. V1's tokens, ids and merges
    come first and are the same in every world's tokenizer (the shipped tokenizer is V1's); a later world's
    new words get tokens and merges after them, so a V1 text encoder extends by appending embedding rows.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    _merge_whole_words(world.vocabulary(), tokens, merges)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    _merge_whole_words(shapes_world.vocabulary(), tokens, merges)  # nothing left to add for V1
    return {t: i for i, t in enumerate(tokens)}, merges


def _merge_whole_words(vocabulary: list[str], tokens: list[str], merges: list[tuple[str, str]]) -> None:
    """Append the merges (and their tokens) that make each word one token under all of `merges`."""
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in vocabulary]
    # A merge added for one word can pre-empt another's (BPE applies merges by rank), so chain
    # merges onto whatever pieces each word currently becomes until every word is one token.
    while True:
        pending = [pieces for pieces in (_apply_bpe(w, merges) for w in words) if len(pieces) > 1]
        if not pending:
            break
        for pieces in pending:
            pieces = _apply_bpe(pieces, merges)
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                    if left + right not in tokens:
                        tokens.append(left + right)
                left = left + right


def _apply_bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    rank = {pair: i for i, pair in enumerate(merges)}
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_tokenizer(shapes_world: world.World = world.V1):
    """The CLIPTokenizer of a world (V1: the shipped one)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab(shapes_world)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in shapes_world.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits the world word {word!r} into {ids}")
    return tok


def text_encoder_config(vocab_size: int, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu", eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id,
    )


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 96, 96), layers_per_block=1, norm_num_groups=16,
)

UNET_CONFIG = dict(
    sample_size=world.IMAGE_SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 96, 128), layers_per_block=1, cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8, norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def new_components(seed: int = 0, shapes_world: world.World = world.V1) -> dict:
    """Freshly initialised components of the shapes architecture (no weights loaded), for a world's tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(shapes_world)
    text_encoder = CLIPTextModel(text_encoder_config(
        len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id))
    return dict(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


def is_shapes_unet_config(config) -> bool:
    """Whether a UNet config (a dict or diffusers FrozenDict) is the shapes architecture."""
    return all(config.get(k) in (v, list(v) if isinstance(v, tuple) else v) for k, v in UNET_CONFIG.items())


def is_shipped() -> bool:
    return (SHAPES_DIR / "model_index.json").is_file()
