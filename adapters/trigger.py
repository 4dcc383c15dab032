"""A trained token for the trigger word, beside any adapter (pivotal tuning: textual inversion and the adapter
trained together, as the diffusers advanced DreamBooth script and ai-toolkit do).

The trigger becomes one new token of the (first) tokenizer; its input embedding is the only text-encoder weight
that trains, so prompts without the trigger encode exactly as before. The vector travels in the adapter file
under TRIGGER_KEY, with the word in the header's "trigger".
"""

from __future__ import annotations

import torch

from studio.adapters.base import AdapterError

TRIGGER_KEY = "trigger_embedding"


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


def _single_text_encoder(pipe) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise AdapterError("a trained trigger token is supported for models with one text encoder (SD 1.x/2.x); "
                           "this model has two")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise AdapterError("the loaded model has no text encoder to hold a trigger token")


def add_trigger_token(pipe, trigger: str) -> tuple[int, torch.Tensor]:
    """Make `trigger` one token of the tokenizer (growing the embedding table if needed); returns its id and the
    mean embedding of the tokens it was split into before (a starting point that changes no prompt's meaning)."""
    _single_text_encoder(pipe)
    if not trigger or any(c.isspace() for c in trigger):
        raise AdapterError(f"a trigger token is one word without spaces, got {trigger!r}")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    table = encoder.get_input_embeddings()
    before = tokenizer(trigger, add_special_tokens=False).input_ids
    init = table.weight[before].mean(dim=0).detach()
    tokenizer.add_tokens([trigger])
    token_id = tokenizer.convert_tokens_to_ids(trigger)
    if token_id >= table.num_embeddings:
        encoder.resize_token_embeddings(len(tokenizer))
    return token_id, init


def attach_trigger_embedding(pipe, trigger: str, init_words: str | None = None) -> TriggerEmbedding:
    """Add the trigger token and make its embedding trainable; `init_words`: start from the mean embedding of
    these words (e.g. a class word) instead of the trigger's old tokens."""
    token_id, init = add_trigger_token(pipe, trigger)
    encoder = pipe.text_encoder
    if init_words:
        ids = pipe.tokenizer(init_words, add_special_tokens=False).input_ids
        init = encoder.get_input_embeddings().weight[ids].mean(dim=0).detach()
    module = TriggerEmbedding(encoder.get_input_embeddings(), token_id, init)
    encoder.set_input_embeddings(module)
    return module


def detach_trigger_embedding(pipe) -> None:
    """Write a trained trigger vector into the embedding table and put the plain table back (if one trains)."""
    module = pipe.text_encoder.get_input_embeddings()
    if isinstance(module, TriggerEmbedding):
        with torch.no_grad():
            module.base.weight[module.token_id] = module.vector.to(module.base.weight.dtype)
        pipe.text_encoder.set_input_embeddings(module.base)


def trigger_tensors(pipe) -> dict[str, torch.Tensor]:
    """{TRIGGER_KEY: vector[1, dim]} while a trigger embedding trains, else {}."""
    module = pipe.text_encoder.get_input_embeddings()
    if isinstance(module, TriggerEmbedding):
        return {TRIGGER_KEY: module.vector.detach().float().cpu().unsqueeze(0)}
    return {}


def check_trigger_vector(pipe, trigger: str, vector: torch.Tensor, source: str) -> None:
    """Refuse a trigger embedding that this pipeline cannot hold, naming why."""
    if not trigger:
        raise AdapterError(f"{source} holds a trigger embedding but names no trigger word")
    _single_text_encoder(pipe)
    module = pipe.text_encoder.get_input_embeddings()
    width = module.weight.shape[1]
    if vector.numel() != width:
        raise AdapterError(f"{source}: its trigger embedding has width {vector.numel()}, the loaded text encoder's "
                           f"is {width}")
    if isinstance(module, TriggerEmbedding):
        raise AdapterError("a trigger embedding is training in this pipeline; load adapters into another")


def set_trigger_vector(pipe, trigger: str, vector: torch.Tensor) -> None:
    """Load a trained trigger token (from an adapter file, after check_trigger_vector) into `pipe`: the word
    becomes that token."""
    token_id, _ = add_trigger_token(pipe, trigger)
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        table[token_id] = vector.reshape(-1).to(device=table.device, dtype=table.dtype)
