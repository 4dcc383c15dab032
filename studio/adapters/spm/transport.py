"""Facilitated Transport: each membrane's strength is set per prompt from how close the prompt is to the
concepts it erases, so prompts about other things pass through the model unchanged.

The combination is linear, sum_i gamma_i * dW_i (the paper's "dynamic LoRA merge"), not the official
code's (sum_i gamma_i U_i)(sum_j gamma_j D_j), which makes one membrane's strength gamma^2 and adds cross
terms between membranes. gamma is computed once per prompt and given to both CFG branches (it acts on
the weights); each image of a batch gets its own gamma through per-sample scales in the adapter layers."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from studio.adapters.base import AdapterError, denoiser, token_ids

METRICS = ("tokensim", "tokenuni", "clipcos_tokenuni", "clipcos")
SIMILAR_TOKEN_QUANTILE = 0.999  # a token counts as near a concept's when closer than all but 0.1% of the vocabulary


def encode_texts(pipe, texts: list[str]) -> tuple[torch.Tensor, list[set[int]]]:
    """Last hidden states of the (first) text encoder and each text's content token ids (BOS/EOS/PAD/UNK
    left out)."""
    tok = pipe.tokenizer
    ids = token_ids(pipe, texts)
    encoder = pipe.text_encoder
    with torch.no_grad():
        hidden = encoder(ids.to(encoder.device))[0].float().cpu()
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if t is not None}
    return hidden, [set(row.tolist()) - special for row in ids]


def permeability(pipe, prompts: list[str], concepts: list[str], metric: str = "tokensim") -> torch.Tensor:
    """gamma in [0, 1] for each prompt, the best match over `concepts`:

    - tokensim (default): each of a concept's tokens is matched by the prompt's nearest token in the text
      encoder's embedding table, their cosine calibrated per concept token (`token_similarity`): 1 for the
      token itself, 0 for any token no nearer than all but 0.1% of the vocabulary; gamma is the mean over the
      concept's tokens. A word the encoder places beside the concept's (a synonym, a plural, "disc" for
      "circle") opens the membrane; unrelated prompts get exactly 0;
    - tokenuni: the share of a concept's tokens that the prompt contains (exact tokens only);
    - clipcos: cosine of the whole text-encoder outputs, padding included (as the official code has it);
    - clipcos_tokenuni: the larger of the two (the official default).

    clipcos has a floor: shared padding and sentence structure make unrelated prompts similar (0.74-0.85 on
    the embedded model, where it does not separate prompts with the concept from prompts without at all;
    BENCHMARKS.md, B3), so a membrane would act at ~80% strength on every prompt. The contextual states of the
    embedded model's encoder are dominated by position too, which is why tokensim reads the embedding table."""
    if metric not in METRICS:
        raise AdapterError(f"unknown permeability metric {metric!r}; use one of {', '.join(METRICS)}")
    if not concepts:
        return torch.zeros(len(prompts))
    p_hidden, p_ids = encode_texts(pipe, prompts)
    c_hidden, c_ids = encode_texts(pipe, concepts)
    if metric == "tokensim":
        return token_similarity(pipe.text_encoder.get_input_embeddings().weight, p_ids, c_ids).max(1).values
    overlap = torch.tensor([[len(pt & ct) / max(len(ct), 1) for ct in c_ids] for pt in p_ids])
    if metric == "tokenuni":
        return overlap.max(1).values
    cosine = torch.nn.functional.cosine_similarity(p_hidden.flatten(1)[:, None], c_hidden.flatten(1)[None], dim=-1)
    cosine = cosine.clamp(0, 1)
    return (cosine if metric == "clipcos" else torch.maximum(cosine, overlap)).max(1).values


def token_similarity(table: torch.Tensor, prompt_ids: list[set[int]], concept_ids: list[set[int]]) -> torch.Tensor:
    """[prompt, concept] soft token overlap: for each concept token c, (cos(e_t, e_c) - floor_c) / (1 - floor_c)
    at the prompt's nearest token t, clamped to [0, 1], averaged over the concept's tokens. floor_c is the
    SIMILAR_TOKEN_QUANTILE quantile of c's cosine to every other row of the embedding table, so the calibration
    is per concept token and needs no reference prompts."""
    with torch.no_grad():
        unit = torch.nn.functional.normalize(table.detach().float(), dim=-1)
        tokens = sorted(set().union(*concept_ids))
        cosine = unit[tokens] @ unit.T  # [concept token, vocabulary]
        others = cosine.clone()
        others[torch.arange(len(tokens)), tokens] = -1.0
        floor = others.quantile(SIMILAR_TOKEN_QUANTILE, dim=1, keepdim=True)
        calibrated = ((cosine - floor) / (1 - floor).clamp_min(1e-6)).clamp(0, 1)
        calibrated[torch.arange(len(tokens)), tokens] = 1.0  # the token itself, exactly (not 1 - rounding)
    row = {token: i for i, token in enumerate(tokens)}
    out = torch.zeros(len(prompt_ids), len(concept_ids))
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            continue
        nearest = calibrated[:, sorted(prompt)].max(1).values  # each concept token's best match in the prompt
        for j, concept in enumerate(concept_ids):
            if concept:
                out[i, j] = nearest[[row[c] for c in concept]].mean()
    return out


# ---- per-sample strengths inside the adapter layers ----

def _membrane_layers(pipe, names):
    for module in denoiser(pipe)[1].modules():
        if isinstance(module, LoraLayer) and any(n in module.lora_A for n in names):
            yield module


def _add_membranes(strengths: dict[str, torch.Tensor]):
    def hook(layer, args, output):
        x = args[0]
        for name, gamma in strengths.items():
            if name not in layer.lora_A or not bool(gamma.any()):
                continue
            if x.shape[0] % gamma.shape[0]:
                raise AdapterError(f"membrane strengths for {gamma.shape[0]} images, the model runs {x.shape[0]}")
            # CFG runs [unconditional; conditional]: each half gets the prompt's strength
            g = gamma.to(output.dtype).repeat(x.shape[0] // gamma.shape[0])
            g = g.view(-1, *([1] * (output.dim() - 1))) * layer.scaling[name]
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            output = output + g * lora_b(lora_a(x.to(lora_a.weight.dtype))).to(output.dtype)
        return output
    return hook


@contextmanager
def membrane_strengths(pipe, strengths: dict[str, torch.Tensor]):
    """Inside: membrane `name` acts on image i of each denoiser call at strengths[name][i] times its weight
    (0 leaves that image's prediction exactly the base model's); outside, membranes act at their weight."""
    names = set(strengths)
    layers = list(_membrane_layers(pipe, names))
    saved = [layer._active_adapter for layer in layers]
    handles = []
    try:
        for layer in layers:
            active = [layer._active_adapter] if isinstance(layer._active_adapter, str) else layer._active_adapter
            layer._active_adapter = [n for n in active if n not in names]  # PEFT's forward leaves them out
            handles.append(layer.register_forward_hook(_add_membranes(
                {n: g for n, g in strengths.items() if n in active and n in layer.lora_A})))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, active in zip(layers, saved):
            layer._active_adapter = active
