"""UFC, Universal Few-Shot Control (Nguyen et al. 2025): a control signal built by analogy with a few support
image-condition pairs of the same kind.

A label encoder (a trainable copy of the UNet's encoder half) reads condition latents at t = 0 with the empty
prompt; the frozen UNet's own encoder half reads the support images the same way. At each injection site (every
skip connection of the UNet and its middle block) a matching module lets the query condition's features attend
over the support conditions' features and takes the matching support *image* features:

    Q = W_q LN(query condition)   K = W_k LN(support conditions)   V = W_v AdaLN_t(support images)
    O = softmax(Q Kᵀ / √d) V      out = Zero(O + g_t ⊙ GELU(W_o O))

`Zero` is zero-initialised, so an untrained module leaves the UNet as it is; `out` enters the UNet as ControlNet
residuals. Meta-training (`studio control-train --method ufc`, through the engine) trains the label encoder and
the matching modules on episodes of several seen kinds; a new kind adapts from a few pairs by tuning the task
parameters only (`tune="bias"`: the label encoder's biases, and the matching modules, as the paper does on SD 1.5).
The support set (its image and condition latents) is stored in the adapter file: generation reads it. SD 1.x-family
UNets only for now.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from studio.adapters.base import AdapterError, register, require_unet
from studio.adapters.control import inject
from studio.adapters.control.config import UFCConfig
from studio.adapters.control.method import LAYOUT_TIMESTEPS, ControlMethod


def encoder_features(parts: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The skip features and the middle block's output of a UNet's encoder half (`parts` has the UNet's
    time_proj, time_embedding, conv_in, down_blocks and mid_block), as UNet2DConditionModel's forward computes
    them. conv_in is applied as a plain convolution: no hook on the UNet's own conv_in runs."""
    emb = parts.time_embedding(parts.time_proj(timesteps).to(latents.dtype))
    conv = parts.conv_in
    sample = F.conv2d(latents, conv.weight, conv.bias, conv.stride, conv.padding)
    skips = [sample]
    for block in parts.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=text)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips.extend(res)
    return skips, parts.mid_block(sample, emb, encoder_hidden_states=text)


class LabelEncoder(nn.Module):
    """A trainable copy of the UNet's encoder half."""

    def __init__(self, unet) -> None:
        super().__init__()
        for name in ("time_proj", "time_embedding", "conv_in", "down_blocks", "mid_block"):
            setattr(self, name, copy.deepcopy(getattr(unet, name)))


class Matching(nn.Module):
    """One injection site's matching: the query condition's patches attend over every support pair's."""

    def __init__(self, channels: int, time_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_query, self.norm_key = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_value = nn.LayerNorm(channels, elementwise_affine=False)
        self.time = nn.Linear(time_dim, 3 * channels)  # AdaLN_t's shift and scale, and the gate g_t
        self.to_q, self.to_k, self.to_v, self.to_o = (nn.Linear(channels, channels) for _ in range(4))
        self.zero = nn.Linear(channels, channels)
        for layer in (self.time, self.zero):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: torch.Tensor, support_conditions: torch.Tensor, support_images: torch.Tensor,
                temb: torch.Tensor) -> torch.Tensor:
        b, c, h, w = query.shape
        q = self.to_q(self.norm_query(query.flatten(2).transpose(1, 2)))                  # b, hw, c
        k = self.to_k(self.norm_key(_tokens(support_conditions)))                          # 1, K·hw, c
        shift, scale, gate = self.time(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)          # b, 1, c each
        v = self.to_v(self.norm_value(_tokens(support_images)) * (1 + scale) + shift)       # b, K·hw, c
        k = k.expand(b, -1, -1)
        split = lambda x: x.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        out = self.zero(o + gate * F.gelu(self.to_o(o)))
        return out.transpose(1, 2).reshape(b, c, h, w)


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """K support feature maps as one sequence of K·h·w tokens."""
    return features.flatten(2).transpose(1, 2).reshape(1, -1, features.shape[1])


class UFCModule(nn.Module):
    """The label encoder, one matching module per injection site, the empty prompt's encoding and the support
    set (image and condition latents, K each), all saved with the adapter."""

    def __init__(self, unet, heads: int, null_text: torch.Tensor) -> None:
        super().__init__()
        self.label_encoder = LabelEncoder(unet)
        with torch.no_grad():
            skips, mid = encoder_features(unet, torch.zeros(1, unet.config.in_channels, 8, 8), torch.zeros(1),
                                          null_text[:1])
        time_dim = unet.time_embedding.linear_2.out_features
        widths = [s.shape[1] for s in skips] + [mid.shape[1]]
        for width in widths:
            if width % heads:
                raise AdapterError(f"UFC heads={heads} must divide every injection site's width ({widths})")
        self.matching = nn.ModuleList(Matching(width, time_dim, heads) for width in widths)
        self.register_buffer("null_text", null_text[:1].detach().clone())
        self.register_buffer("support_latents", torch.zeros(0))
        self.register_buffer("support_conditions", torch.zeros(0))

    def set_support(self, latents: torch.Tensor, conditions: torch.Tensor) -> None:
        """The support set: K image latents and the K condition latents drawn for them (as the denoiser sees them:
        VAE latents times the scaling factor)."""
        if latents.shape != conditions.shape or latents.ndim != 4 or not len(latents):
            raise AdapterError(f"a UFC support set is K image latents and K condition latents of one shape, got "
                               f"{tuple(latents.shape)} and {tuple(conditions.shape)}")
        self.support_latents = latents.detach().to(self.null_text)
        self.support_conditions = conditions.detach().to(self.null_text)

    def support_features(self, unet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The support conditions through the label encoder and the support images through the frozen UNet's
        encoder, at t = 0 with the empty prompt: one feature map per site, K each."""
        if not len(self.support_latents):
            raise AdapterError("this UFC adapter has no support set")
        k = len(self.support_latents)
        t, text = torch.zeros(k, device=self.null_text.device), self.null_text.expand(k, -1, -1)
        cond_skips, cond_mid = encoder_features(self.label_encoder, self.support_conditions, t, text)
        with torch.no_grad():
            image_skips, image_mid = encoder_features(unet, self.support_latents.to(unet.dtype), t.to(unet.dtype),
                                                      text.to(unet.dtype))
        return cond_skips + [cond_mid], [f.to(self.null_text.dtype) for f in image_skips + [image_mid]]

    def forward(self, unet, query_conditions: torch.Tensor, timesteps: torch.Tensor,
                support: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ControlNet-style residuals (down skips, middle) for the query condition latents at the denoising
        timesteps; `support`: the support features when already computed (generation reuses them)."""
        b = query_conditions.shape[0]
        support_conds, support_images = support or self.support_features(unet)
        zero = torch.zeros(b, device=query_conditions.device)
        q_skips, q_mid = encoder_features(self.label_encoder, query_conditions, zero, self.null_text.expand(b, -1, -1))
        timesteps = timesteps.expand(b) if timesteps.ndim == 0 or len(timesteps) == 1 else timesteps
        temb = unet.time_embedding(unet.time_proj(timesteps.to(query_conditions.device)).to(query_conditions.dtype))
        out = [m(q, c, i, temb) for m, q, c, i in zip(self.matching, q_skips + [q_mid], support_conds,
                                                       support_images)]
        return out[:-1], out[-1]


def _rows(value, rows: slice, n: int):
    """A batch entry's rows (tensors and lists of n, and pairs of them); anything else as it is."""
    if torch.is_tensor(value) and value.ndim and len(value) == n or isinstance(value, list) and len(value) == n:
        return value[rows]
    if isinstance(value, list):  # control_more: (images, present) pairs
        return [tuple(_rows(v, rows, n) for v in pair) for pair in value]
    return value


def null_prompt(pipe) -> torch.Tensor:
    """The empty prompt's encoder hidden states (1, tokens, width)."""
    from studio.adapters.prompts import embed_prompts

    with torch.no_grad():
        return embed_prompts(pipe, [""])[0].float().cpu()


@register
class UFCMethod(ControlMethod):
    name = "ufc"
    config_class = UFCConfig
    prefix = "ufc"
    presets = {"quick": {"lr": 1e-4, **LAYOUT_TIMESTEPS}, "standard": {"lr": 5e-5, **LAYOUT_TIMESTEPS}}
    episodic = True

    def training_loss(self, pipe, batch, default_loss):
        """An episode: the batch is of one kind; its first `support` pairs are the support set, the others the
        queries the loss is taken on (the support set's features are computed with gradients, through the label
        encoder). The file keeps the last episode's support set."""
        control = batch.get("control")
        if control is None:
            return default_loss(batch)
        name = inject.state(pipe)["training"]
        entry = self._entry(pipe, name)
        k, n = entry.config.support, control.shape[0]
        if n <= k:
            raise AdapterError(f"ufc trains on episodes of {k} support pairs and at least one query: a batch (per "
                               f"process and accumulation step) of {n} is too small; use batch_size >= {k + 1}")
        entry.module.set_support(batch["latents"][:k], inject.denoiser_latents(pipe.vae, control[:k]))
        query = {key: _rows(value, slice(k, None), n) for key, value in batch.items()}
        inputs = [inject.ControlInput(name, query["control"], 1.0)]
        inputs += [inject.ControlInput(name, images, present) for images, present in query.get("control_more", [])]
        with inject.using(pipe, inputs):
            return default_loss(query)

    def _require_denoiser(self, pipe) -> None:
        require_unet(pipe, self.name)
        if pipe.unet.config.get("addition_embed_type"):
            raise AdapterError("ufc is built for SD 1.x-family UNets; this UNet reads added conditioning (SDXL), "
                               "which its label encoder does not take yet")

    def build(self, pipe, config: UFCConfig) -> UFCModule:
        return UFCModule(pipe.unet, config.heads, null_prompt(pipe))

    def _train_biases_only(self, pipe, adapter: str) -> None:
        """The task parameters: the label encoder's biases, and every matching module (the paper, SD 1.5)."""
        for name, p in self._entry(pipe, adapter).module.named_parameters():
            p.requires_grad_(name.startswith("matching.") or name.endswith("bias"))

    def set_state(self, pipe, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        module = self._entry(pipe, adapter).module
        latents, conditions = tensors.get(f"{self.prefix}.support_latents"), tensors.get(
            f"{self.prefix}.support_conditions")
        if latents is not None and conditions is not None and len(latents):
            module.set_support(latents, conditions)  # sized before the load: its K is the file's
        super().set_state(pipe, adapter, tensors)

    def load_state_dict(self, pipe, adapter: str, tensors: dict[str, torch.Tensor], config: UFCConfig | None = None,
                        base: dict | None = None, source: str = "adapter") -> None:
        config = config or UFCConfig()
        self.check_base(pipe, base or {}, source)
        self._add_loaded(pipe, adapter, config, tensors, source)
