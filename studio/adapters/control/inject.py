"""How control reaches the UNet: one forward pre-hook on the UNet (ControlNet residuals into
`down_block_additional_residuals` / `mid_block_additional_residual`) and one forward hook on `conv_in` (ControlNeXt
features added, cross-normalised). Both run only while control inputs are set on the pipeline, so a plain
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
        image = self._sized[key]
        n = image.shape[0]
        if n == batch:
            return image
        if n == 1:
            return image.expand(batch, -1, -1, -1)
        if batch % n == 0:
            return image.repeat(batch // n, 1, 1, 1)
        raise ControlError(f"{n} control images for a batch of {batch}: give one image, or one per generated image")

    def scale_for(self, batch: int, like: torch.Tensor) -> float | torch.Tensor:
        """The scale as a number, or per image as a batch x 1 x 1 x 1 tensor."""
        if not torch.is_tensor(self.scale):
            return self.scale
        if self.scale.numel() != batch:
            raise ControlError(f"{self.scale.numel()} control scales for a batch of {batch}")
        return self.scale.to(like.device, like.dtype).view(batch, 1, 1, 1)

    @property
    def used(self) -> bool:
        return bool((self.scale != 0).any()) if torch.is_tensor(self.scale) else self.scale != 0


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
    where = (steps.to(t.device) == t).nonzero()
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
    """Put the hooks on the pipeline's UNet (once)."""
    st = state(pipe)
    unet = pipe.unet
    if st["handles"] and st.get("unet") is unet:
        return
    for h in st["handles"]:
        h.remove()
    st["unet"] = unet
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

    st["handles"] = [unet.register_forward_pre_hook(unet_pre, with_kwargs=True),
                     unet.conv_in.register_forward_hook(conv_in_post)]


def uninstall(pipe) -> None:
    st = state(pipe)
    for h in st["handles"]:
        h.remove()
    st["handles"] = []
