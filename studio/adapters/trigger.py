"""A trained token for the trigger word, beside any adapter (pivotal tuning: textual inversion and the adapter
trained together, as the diffusers advanced DreamBooth script and ai-toolkit do).

The trigger becomes one new token of each tokenizer (SDXL: both CLIP encoders; SD3: CLIP-L, CLIP-G and T5; Flux:
CLIP-L and T5); its input embedding in each text encoder is the only text-encoder weight that trains, so prompts
without the trigger encode exactly as before. The vectors travel in the adapter file under TRIGGER_KEY (the first
encoder), TRIGGER_KEY_2 (the second) and TRIGGER_KEY_3 (SD3's T5), with the word in the header's "trigger".
"""

from __future__ import annotations

import torch

from studio.adapters.base import AdapterError, pipeline_text_encoders

TRIGGER_KEY = "trigger_embedding"
TRIGGER_KEY_2 = "trigger_embedding_2"
TRIGGER_KEY_3 = "trigger_embedding_3"
TRIGGER_KEYS = (TRIGGER_KEY, TRIGGER_KEY_2, TRIGGER_KEY_3)


class TriggerEmbedding(torch.nn.Module):
    """The text encoder's token embedding with the trigger's row replaced by a trainable vector."""

    def __init__(self, base: torch.nn.Embedding, token_id: int, init: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.token_id = token_id
        self.vector = torch.nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for dtype/device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        return torch.where((ids == self.token_id).unsqueeze(-1), self.vector.to(out.dtype), out)


def _encoders(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """(file key, tokenizer, text encoder) of each text encoder the pipeline has."""
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise AdapterError("the loaded model has no text encoder to hold a trigger token")
    encoders = pipeline_text_encoders(pipe)
    return [(key, tokenizer, encoder) for key, (_, tokenizer, encoder) in zip(TRIGGER_KEYS, encoders)]


def _add_token(tokenizer, encoder, trigger: str) -> int:
    tokenizer.add_tokens([trigger])
    token_id = tokenizer.convert_tokens_to_ids(trigger)
    if token_id >= encoder.get_input_embeddings().num_embeddings:
        encoder.resize_token_embeddings(len(tokenizer))
    return token_id


def add_trigger_token(pipe, trigger: str) -> list[tuple[int, torch.Tensor]]:
    """Make `trigger` one token of each tokenizer (growing the embedding tables if needed); returns, per text
    encoder, its id and the mean embedding of the tokens it was split into before (a starting point that changes
    no prompt's meaning)."""
    if not trigger or any(c.isspace() for c in trigger):
        raise AdapterError(f"a trigger token is one word without spaces, got {trigger!r}")
    encoders = _encoders(pipe)
    # the init is read before any tokenizer learns the word (SDXL's two may be one object)
    inits = [tok(trigger, add_special_tokens=False).input_ids for _, tok, _ in encoders]
    out = []
    for (_, tokenizer, encoder), before in zip(encoders, inits):
        init = encoder.get_input_embeddings().weight[before].mean(dim=0).detach()
        out.append((_add_token(tokenizer, encoder, trigger), init))
    return out


def attach_trigger_embedding(pipe, trigger: str, init_words: str | None = None) -> list[TriggerEmbedding]:
    """Add the trigger token and make its embedding trainable in each text encoder; `init_words`: start from the
    mean embedding of these words (e.g. a class word) instead of the trigger's old tokens."""
    modules = []
    for (_, tokenizer, encoder), (token_id, init) in zip(_encoders(pipe), add_trigger_token(pipe, trigger)):
        if init_words:
            ids = tokenizer(init_words, add_special_tokens=False).input_ids
            init = encoder.get_input_embeddings().weight[ids].mean(dim=0).detach()
        module = TriggerEmbedding(encoder.get_input_embeddings(), token_id, init)
        encoder.set_input_embeddings(module)
        modules.append(module)
    return modules


def detach_trigger_embedding(pipe) -> None:
    """Write trained trigger vectors into the embedding tables and put the plain tables back (if one trains)."""
    for _, _, encoder in _encoders(pipe):
        module = encoder.get_input_embeddings()
        if isinstance(module, TriggerEmbedding):
            with torch.no_grad():
                module.base.weight[module.token_id] = module.vector.to(module.base.weight.dtype)
            encoder.set_input_embeddings(module.base)


def trigger_tensors(pipe) -> dict[str, torch.Tensor]:
    """{TRIGGER_KEY: vector[1, dim], TRIGGER_KEY_2: ... (one per text encoder)} while trigger embeddings train,
    else {}."""
    out = {}
    for key, _, encoder in _encoders(pipe):
        module = encoder.get_input_embeddings()
        if isinstance(module, TriggerEmbedding):
            out[key] = module.vector.detach().float().cpu().unsqueeze(0)
    return out


def training_trigger(pipe) -> list[TriggerEmbedding]:
    """The trigger embeddings training in `pipe`, one per text encoder, or []."""
    modules = [encoder.get_input_embeddings() for _, _, encoder in _encoders(pipe)]
    return [m for m in modules if isinstance(m, TriggerEmbedding)]


def check_trigger_vectors(pipe, trigger: str, vectors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse trigger embeddings that this pipeline cannot hold, naming why."""
    if not trigger:
        raise AdapterError(f"{source} holds a trigger embedding but names no trigger word")
    encoders = _encoders(pipe)
    if set(vectors) != {key for key, _, _ in encoders}:
        raise AdapterError(f"{source} holds trigger embeddings for {len(vectors)} text encoder(s); the loaded model "
                           f"has {len(encoders)}")
    for key, _, encoder in encoders:
        module = encoder.get_input_embeddings()
        width = module.weight.shape[1]
        if vectors[key].numel() != width:
            raise AdapterError(f"{source}: its trigger embedding has width {vectors[key].numel()}, the loaded text "
                               f"encoder's is {width}")
        if isinstance(module, TriggerEmbedding):
            raise AdapterError("a trigger embedding is training in this pipeline; load adapters into another")


def set_trigger_vectors(pipe, trigger: str, vectors: dict[str, torch.Tensor]) -> None:
    """Load trained trigger tokens (from an adapter file, after check_trigger_vectors) into `pipe`: the word
    becomes that token in each text encoder."""
    for (key, _, encoder), (token_id, _) in zip(_encoders(pipe), add_trigger_token(pipe, trigger)):
        with torch.no_grad():
            table = encoder.get_input_embeddings().weight
            table[token_id] = vectors[key].reshape(-1).to(device=table.device, dtype=table.dtype)
