"""How control reaches the denoiser: on a UNet, one forward pre-hook (ControlNet residuals into
`down_block_additional_residuals` / `mid_block_additional_residual`, T2I-Adapter features into the blocks) and one
forward hook on `conv_in` (ControlNeXt features added, cross-normalised); on a diffusion transformer (SD3, Flux),
one forward pre-hook feeding a ControlNet's block samples to the transformer as diffusers' SD3 and Flux ControlNet
pipelines do (`block_controlnet_hidden_states`; `controlnet_block_samples` / `controlnet_single_block_samples`),
the control image read as VAE latents. Both run only while control inputs are set on the pipeline, so a plain
diffusers pipeline call is controlled, and with no input (or scale 0, or outside the start-end window) the UNet
runs exactly as the base model.

    set_control(pipe, [{"adapter": "mask_cn", "image": img, "scale": 1.0, "start": 0.0, "end": 1.0}])
    pipe("a red circle on a gray background")

Several inputs are summed, each at its scale (multi-condition control)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from studio.adapters.base import AdapterError

ASPECT_TOLERANCE = 0.01


class ControlError(AdapterError):
    """A control image or control setting that cannot be used."""


@dataclass
class ControlModule:
    method: str
    module: torch.nn.Module
    config: object
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)    # UNet parameter -> delta applied (ControlNeXt)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # UNet parameter -> base value (training)
    weight: float = 1.0  # the weight its UNet deltas act at (its default conditioning scale)
    cache: dict = field(default_factory=dict)  # what a frozen module computes once (UFC's support features)


@dataclass
class ControlInput:
    adapter: str
    image: torch.Tensor            # Bx3xHxW in [0, 1]
    scale: float | torch.Tensor = 1.0  # a tensor: one scale per image (training: 0 where an example lacks this input)
    start: float = 0.0
    end: float = 1.0
    _sized: dict = field(default_factory=dict, repr=False)

    def at(self, height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The image resized to (height, width) and matched to a batch of `batch` (one image for all, one per
        image, or one per image of a classifier-free-guidance doubled batch)."""
        key = (height, width, like.device, like.dtype)
        if key not in self._sized:
            self._sized[key] = fit_image(self.image, height, width).to(like.device, like.dtype)
        return _match_batch(self._sized[key], batch)

    def latents_at(self, vae, height: int, width: int, batch: int, like: torch.Tensor, shift: bool = True
                   ) -> torch.Tensor:
        """The image resized to (height, width) and encoded by `vae` as the SD3 / Flux ControlNet pipelines encode
        it ((z - shift) * scale), the distribution's mode rather than a sample, so a call is deterministic;
        encoded once per size and matched to the batch as `at`. shift=False: no shift (what the SD3 pipeline does
        for a ControlNet that reads zeros for the pooled prompt, InstantX's)."""
        key = ("latents", height, width, like.device, like.dtype, shift)
        if key not in self._sized:
            image = fit_image(self.image, height, width).to(like.device, vae.dtype)
            self._sized[key] = denoiser_latents(vae, image, shift).to(like.dtype)
        return _match_batch(self._sized[key], batch)

    def scale_for(self, batch: int, like: torch.Tensor) -> float | torch.Tensor:
        """The scale as a number, or per image as a tensor of `like`'s rank (batch x 1 x ...)."""
        if not torch.is_tensor(self.scale):
            return self.scale
        if self.scale.numel() != batch:
            raise ControlError(f"{self.scale.numel()} control scales for a batch of {batch}")
        return self.scale.to(like.device, like.dtype).view(batch, *[1] * (like.ndim - 1))

    @property
    def used(self) -> bool:
        return bool((self.scale != 0).any()) if torch.is_tensor(self.scale) else self.scale != 0


def denoiser_latents(vae, images: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Images (b, 3, H, W in [0, 1]) as latents the denoiser reads: an AutoencoderKL's mode, shifted and scaled
    (shift=False: not shifted); an AutoencoderTiny (a fast decoder) gives those latents itself."""
    with torch.no_grad():
        encoded = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1)
    if not hasattr(encoded, "latent_dist"):
        return encoded.latents
    offset = (vae.config.get("shift_factor") or 0.0) if shift else 0.0
    return (encoded.latent_dist.mode() - offset) * vae.config.scaling_factor


def _match_batch(image: torch.Tensor, batch: int) -> torch.Tensor:
    """One image for all, one per image, or one per image of a classifier-free-guidance doubled batch."""
    n = image.shape[0]
    if n == batch:
        return image
    if n == 1:
        return image.expand(batch, -1, -1, -1)
    if batch % n == 0:
        return image.repeat(batch // n, 1, 1, 1)
    raise ControlError(f"{n} control images for a batch of {batch}: give one image, or one per generated image")


def state(pipe) -> dict:
    """The pipeline's control state: {"modules": name -> ControlModule, "inputs": [ControlInput], ...}."""
    if not hasattr(pipe, "_studio_control"):
        # unet_bases: UNet parameter -> its value before any control adapter changed it (ControlNeXt's tuned layers)
        pipe._studio_control = {"modules": {}, "inputs": [], "handles": [], "suspended": 0, "training": None,
                                "unet_bases": {}}
    return pipe._studio_control


def modules(pipe) -> dict[str, ControlModule]:
    return state(pipe)["modules"]


def to_tensor(image) -> torch.Tensor:
    """PIL image, HxW / HxWxC uint8 array, or a CxHxW / BxCxHxW tensor in [0, 1] -> Bx3xHxW float in [0, 1]."""
    from PIL import Image

    if isinstance(image, (list, tuple)):
        return torch.cat([to_tensor(i) for i in image])
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ControlError(f"a control image array is HxW or HxWx3, got shape {image.shape}")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / scale
    if not torch.is_tensor(image):
        raise ControlError(f"a control image is a PIL image, an array or a tensor, not {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ControlError(f"a control image tensor is 3xHxW or Bx3xHxW, got shape {tuple(image.shape)}")
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    return image.float()


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a control image to the output size; one of another aspect ratio is refused (it would be distorted)."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if abs(w / h - width / height) > ASPECT_TOLERANCE * width / height:
        raise ControlError(f"the control image is {w}x{h} but the output is {width}x{height}: its aspect ratio "
                           "differs; crop it to the output's shape or set the output's height and width to match")
    if h >= height and w >= width:  # shrinking: each output pixel the mean of the area it covers (exact for an
        return F.interpolate(image, size=(height, width), mode="area")  # image enlarged by a whole factor)
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def set_control(pipe, inputs: list[dict] | None) -> None:
    """Set the control inputs used by every following call: dicts with "adapter" (a loaded control adapter's
    name), "image", and optional "scale" (default: the adapter's weight), "start", "end" (fractions of the
    denoising steps). None or [] clears them."""
    from studio.adapters import attached_adapters

    loaded = modules(pipe)
    out = []
    for item in inputs or []:
        unknown = set(item) - {"adapter", "image", "scale", "start", "end"}
        if unknown:
            raise ControlError(f"unknown control setting(s) {', '.join(sorted(unknown))}; "
                               "known: adapter, image, scale, start, end")
        name = item.get("adapter")
        if name not in loaded:
            raise ControlError(f"no control adapter named {name!r} is loaded; loaded: {', '.join(loaded) or 'none'}")
        if item.get("image") is None:
            raise ControlError(f"control adapter {name!r} has no control image")
        scale = item.get("scale", attached_adapters(pipe).get(name, {}).get("weight", 1.0))
        start, end = float(item.get("start", 0.0)), float(item.get("end", 1.0))
        if not 0.0 <= start < end <= 1.0:
            raise ControlError(f"control start and end are fractions of the steps with 0 <= start < end <= 1, "
                               f"got {start} and {end}")
        out.append(ControlInput(name, to_tensor(item["image"]), float(scale), start, end))
    state(pipe)["inputs"] = out


def control_inputs(pipe) -> list[ControlInput]:
    return list(state(pipe)["inputs"])


def clear_control(pipe) -> None:
    set_control(pipe, None)


@contextmanager
def using(pipe, inputs: list[ControlInput]):
    """Run with exactly these inputs (the engine's training step), then restore the previous ones."""
    st = state(pipe)
    before = st["inputs"]
    st["inputs"] = inputs
    try:
        yield
    finally:
        st["inputs"] = before


@contextmanager
def suspended(pipe):
    """No control at all inside (the base model's prediction)."""
    st = state(pipe)
    st["suspended"] += 1
    try:
        yield
    finally:
        st["suspended"] -= 1


def step_fraction_keep(pipe, timestep, start: float, end: float) -> bool:
    """diffusers' ControlNet window: step i of N is controlled unless i/N < start or (i+1)/N > end. The step is
    found from the timestep in the pipeline's scheduler (outside a sampling loop every step is controlled)."""
    if start <= 0.0 and end >= 1.0:
        return True
    steps = getattr(pipe.scheduler, "timesteps", None)
    if steps is None or not len(steps):
        return True
    t = timestep.flatten()[0] if torch.is_tensor(timestep) else torch.tensor(timestep)
    where = torch.isclose(steps.to(t.device).float(), t.float(), rtol=0.0, atol=1e-2).nonzero()
    if not len(where):
        return True
    i, n = int(where[0, 0]), len(steps)
    return not (i / n < start or (i + 1) / n > end)


def _active(pipe, timestep) -> list[ControlInput]:
    st = state(pipe)
    if st["suspended"]:
        return []
    return [c for c in st["inputs"] if c.used and step_fraction_keep(pipe, timestep, c.start, c.end)]


def install(pipe) -> None:
    """Put the hooks on the pipeline's denoiser (once)."""
    st = state(pipe)
    model = getattr(pipe, "unet", None) or pipe.transformer
    if st["handles"] and st.get("denoiser") is model:
        return
    for h in st["handles"]:
        h.remove()
    st["denoiser"] = model
    st["handles"] = _unet_hooks(pipe, model) if model is getattr(pipe, "unet", None) else [
        model.register_forward_pre_hook(_transformer_hook(pipe), with_kwargs=True)]


def _unet_hooks(pipe, unet) -> list:
    st = state(pipe)
    vae_factor = getattr(pipe, "vae_scale_factor", 8)

    def unet_pre(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        active = _active(pipe, timestep)
        st["feature_inputs"] = []
        if not active:
            return None
        height, width = sample.shape[-2] * vae_factor, sample.shape[-1] * vae_factor
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        down, mid, intra = None, None, None
        for c in active:
            mod = st["modules"][c.adapter]
            image = c.at(height, width, sample.shape[0], sample)
            scale = c.scale_for(sample.shape[0], sample)
            if mod.method == "controlnet":
                dtype = mod.module.dtype
                added = kwargs.get("added_cond_kwargs")  # SDXL's pooled text and size/crop ids
                d, m = mod.module(sample.to(dtype), timestep, encoder_hidden_states=text.to(dtype),
                                  controlnet_cond=image.to(dtype), conditioning_scale=scale, return_dict=False,
                                  added_cond_kwargs=added and {k: v.to(dtype) for k, v in added.items()})
                down = list(d) if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
            elif mod.method == "t2i_adapter":
                feats = [scale * f for f in mod.module(image.to(sample.dtype))]
                intra = feats if intra is None else [a + b for a, b in zip(intra, feats)]
            elif mod.method == "ufc":
                d, m = _ufc_residuals(pipe, mod, c, sample, timestep, scale)
                down = list(d) if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
            else:
                st["feature_inputs"].append((mod, image, scale, timestep))
        if down is None and intra is None:
            return None
        kwargs = dict(kwargs)
        if intra is not None:  # the UNet pops from this list: a new one per call
            given = kwargs.get("down_intrablock_additional_residuals")
            kwargs["down_intrablock_additional_residuals"] = (
                list(intra) if given is None else [a + b for a, b in zip(given, intra)])
        if down is None:
            return args, kwargs
        given_down = kwargs.get("down_block_additional_residuals")
        given_mid = kwargs.get("mid_block_additional_residual")
        kwargs["down_block_additional_residuals"] = (tuple(down) if given_down is None
                                                     else tuple(a + b for a, b in zip(given_down, down)))
        kwargs["mid_block_additional_residual"] = mid if given_mid is None else given_mid + mid
        return args, kwargs

    def conv_in_post(module, args, output):
        feats = st.get("feature_inputs")
        if not feats:
            return None
        for mod, image, scale, timestep in feats:
            output = output + scale * mod.module(image.to(output.dtype), output, timestep)
        return output

    return [unet.register_forward_pre_hook(unet_pre, with_kwargs=True),
            unet.conv_in.register_forward_hook(conv_in_post)]


def _ufc_residuals(pipe, mod: ControlModule, c: ControlInput, sample, timestep, scale):
    """A UFC adapter's residuals: the input's condition latents matched against the stored support set, whose
    features are computed once per device and dtype (the adapter is frozen at generation)."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    query = c.latents_at(pipe.vae, sample.shape[-2] * factor, sample.shape[-1] * factor, sample.shape[0], sample)
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
    support = None  # training: the support set's features through the label encoder as it learns
    if not mod.module.training:
        key = ("ufc_support", sample.device, sample.dtype)
        if key not in mod.cache:
            with torch.no_grad():
                mod.cache = {key: mod.module.support_features(pipe.unet)}
        support = mod.cache[key]
    down, mid = mod.module(pipe.unet, query.to(mod.module.null_text.dtype), t, support)
    return [scale * d.to(sample.dtype) for d in down], scale * mid.to(sample.dtype)


# SD3Transformer2DModel.forward's leading positional parameters (its pipelines pass keywords)
_SD3_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def _transformer_hook(pipe):
    """The pre-hook of an SD3 or Flux transformer: each active ControlNet input's block samples, at its scale,
    summed, passed as the keywords the transformer reads (what diffusers' ControlNet pipelines pass)."""
    st = state(pipe)
    flux = type(pipe.transformer).__name__.startswith("Flux")

    def transformer_pre(module, args, kwargs):
        kwargs = {**dict(zip(_SD3_ARGS, args)), **kwargs} if args else dict(kwargs)
        timestep = kwargs["timestep"]
        active = _active(pipe, timestep * 1000 if flux else timestep)  # Flux reads the timestep / 1000
        if not active:
            return None
        hidden = kwargs["hidden_states"]
        blocks, singles = None, None
        for c in active:
            controlnet = st["modules"][c.adapter].module
            cond = _control_latents(pipe, c, kwargs, flux,
                                    shift=not controlnet.config.get("force_zeros_for_pooled_projection"))
            scale = c.scale_for(hidden.shape[0], hidden)
            inputs = {k: kwargs.get(k) for k in ("encoder_hidden_states", "pooled_projections", "timestep")}
            if flux:
                inputs.update(img_ids=kwargs["img_ids"], txt_ids=kwargs["txt_ids"],
                              guidance=kwargs.get("guidance") if controlnet.config.guidance_embeds else None)
            else:  # as the SD3 ControlNet pipeline feeds such configs
                if controlnet.config.get("force_zeros_for_pooled_projection"):
                    inputs["pooled_projections"] = torch.zeros_like(inputs["pooled_projections"])
                if controlnet.config.get("joint_attention_dim") is None:
                    inputs["encoder_hidden_states"] = None
            dtype = controlnet.dtype
            out = controlnet(hidden_states=hidden.to(dtype), controlnet_cond=cond.to(dtype), return_dict=False,
                             **{k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                                for k, v in inputs.items()})
            b = [scale * x for x in out[0]]
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
            if flux and out[1] is not None:
                s = [scale * x for x in out[1]]
                singles = s if singles is None else [x + y for x, y in zip(singles, s)]
        if not flux:
            kwargs["block_controlnet_hidden_states"] = _added(kwargs.get("block_controlnet_hidden_states"), blocks)
            return (), kwargs
        kwargs["controlnet_block_samples"] = _added(kwargs.get("controlnet_block_samples"), blocks)
        if singles is not None:
            kwargs["controlnet_single_block_samples"] = _added(kwargs.get("controlnet_single_block_samples"), singles)
        return (), kwargs

    return transformer_pre


def _added(given, ours):
    return list(ours) if given is None else [a + b for a, b in zip(given, ours)]


def _control_latents(pipe, c: ControlInput, kwargs: dict, flux: bool, shift: bool = True) -> torch.Tensor:
    """The control image as the latents the transformer's input is: SD3's B x C x h x w, or Flux's 2x2-packed
    sequence (its size read from the image position ids)."""
    hidden, factor = kwargs["hidden_states"], pipe.vae_scale_factor
    if not flux:
        return c.latents_at(pipe.vae, hidden.shape[-2] * factor, hidden.shape[-1] * factor, hidden.shape[0], hidden,
                            shift)
    from diffusers import FluxPipeline

    ids = kwargs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    h, w = (int(ids[:, 1].max()) + 1) * 2, (int(ids[:, 2].max()) + 1) * 2  # latent rows and columns
    z = c.latents_at(pipe.vae, h * factor, w * factor, hidden.shape[0], hidden)
    return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], h, w)


def uninstall(pipe) -> None:
    st = state(pipe)
    for h in st["handles"]:
        h.remove()
    st["handles"] = []
