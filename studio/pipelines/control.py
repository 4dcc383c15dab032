"""Control inputs at generation: control adapters (ours, or diffusers ControlNet folders) loaded and given their
control images, scales and step windows; several are summed.

    pipe = load_pipeline("shapes", control={"adapter": "mask.safetensors", "image": "mask.png", "scale": 1.0})
    pipe("a red circle on a gray background")
    set_control(pipe, [...])   # other images / scales for the next calls

`controlnet_pipeline(pipe)` gives diffusers' own ControlNet pipeline of the model's family (SD 1.x, SDXL, SD3, Flux)
on the same components with the loaded ControlNets (the family's multi-ControlNet class for several), for
`controlnet_conditioning_scale`, `control_guidance_start/end` as diffusers spells them."""

from __future__ import annotations

from pathlib import Path

from studio.adapters.base import AdapterError
from studio.adapters.control import inject
from studio.adapters.control.inject import ControlError, clear_control, set_control

__all__ = ["load_control", "set_control", "clear_control", "controlnet_pipeline", "open_control_image"]


def open_control_image(image):
    """A path becomes a PIL image (a missing or unreadable file is named); anything else is passed through."""
    if isinstance(image, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise ControlError(f"control image not found: {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ControlError(f"{path}: not a readable image ({e})") from None
    return image


def load_control(pipe, control: dict | list[dict]) -> list[str]:
    """Attach control adapters and set their inputs. `control`: {"adapter": file or diffusers ControlNet folder,
    "image": control image (path, PIL, array or tensor), "scale": 1.0, "start": 0.0, "end": 1.0}, or a list of
    such dicts (multi-condition: their effects are summed; the same file twice is loaded once and given both
    images). Returns the adapters' names."""
    from studio.adapters import adapter_name_for, attached_adapters, load_adapters, method_names, read_adapter
    from studio.adapters.control.controlnet import load_controlnet_folder

    items = [control] if isinstance(control, dict) else list(control)
    inputs, names, loaded = [], [], {}
    for item in items:
        if not isinstance(item, dict) or "adapter" not in item:
            raise ControlError("each control is a dict with at least \"adapter\" (a file) and \"image\"")
        path = Path(item["adapter"])
        scale = float(item.get("scale", 1.0))
        if path.resolve() in loaded:
            name = loaded[path.resolve()]
        elif path.is_dir():
            name = load_controlnet_folder(pipe, path, adapter_name_for(path, set(attached_adapters(pipe))), scale)
        else:
            method = read_adapter(path).method
            if method not in method_names("control"):
                raise ControlError(f"{path} is a {method} adapter, not a control adapter "
                                   f"({', '.join(method_names('control'))}); pass it as an adapter instead")
            name = load_adapters(pipe, {path: scale})[0]
        loaded[path.resolve()] = name
        names.append(name)
        inputs.append({**{k: v for k, v in item.items() if k != "adapter"}, "adapter": name,
                       "image": open_control_image(item.get("image")), "scale": scale})
    kept = [dict(adapter=c.adapter, image=c.image, scale=c.scale, start=c.start, end=c.end)
            for c in inject.control_inputs(pipe)]
    set_control(pipe, kept + inputs)  # added to the inputs already set
    return names


# the denoiser's class -> diffusers' ControlNet pipeline for it and the class that holds several ControlNets
CONTROLNET_PIPELINES = {
    "UNet2DConditionModel": ("StableDiffusionControlNetPipeline", "MultiControlNetModel"),
    "SD3Transformer2DModel": ("StableDiffusion3ControlNetPipeline", "SD3MultiControlNetModel"),
    "FluxTransformer2DModel": ("FluxControlNetPipeline", "FluxMultiControlNetModel"),
}


def controlnet_pipeline(pipe, adapters: list[str] | None = None):
    """diffusers' ControlNet pipeline of `pipe`'s family (StableDiffusionControlNetPipeline, or the SDXL, SD3 and
    Flux ones) on its components with the loaded ControlNet adapters (all of them, or those named; the family's
    multi-ControlNet class when there are several). Studio's own control inputs are cleared so the ControlNets are
    not applied twice."""
    import inspect

    import diffusers

    from studio.adapters.base import denoiser
    from studio.adapters.control.controlnet import controlnet_module

    loaded = [n for n, m in inject.modules(pipe).items() if m.method == "controlnet"]
    names = adapters if adapters is not None else loaded
    if not names:
        raise AdapterError("no ControlNet adapter is loaded")
    models = [controlnet_module(pipe, n) for n in names]
    model = denoiser(pipe)[1]
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None:
        pipeline_name, multi_name = "StableDiffusionXLControlNetPipeline", "MultiControlNetModel"
    else:
        pipeline_name, multi_name = CONTROLNET_PIPELINES[type(model).__name__]
    cls = getattr(diffusers, pipeline_name)
    if multi_name == "MultiControlNetModel":
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel as multi
    else:
        multi = getattr(diffusers, multi_name)
    clear_control(pipe)
    wanted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in (("safety_checker", None), ("requires_safety_checker", False)) if k in wanted}
    parts = {k: v for k, v in pipe.components.items() if k in wanted and k not in extra and k != "controlnet"}
    out = cls(**parts, **extra, controlnet=models[0] if len(models) == 1 else multi(models))
    out.set_progress_bar_config(disable=True)
    return out
