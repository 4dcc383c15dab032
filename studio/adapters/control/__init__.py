"""Spatial control adapters: a light ControlNeXt-style module and ControlNet (diffusers `ControlNetModel`), both
steering the UNet through one hook (studio/adapters/control/inject.py) with a conditioning scale and a start-end window,
several conditions summed with their weights."""

from studio.adapters.control.config import ControlNetConfig, ControlNeXtConfig, T2IAdapterConfig
from studio.adapters.control.controlnet import ControlNetMethod, controlnet_module, export_controlnet
from studio.adapters.control.controlnext import ControlNeXtEncoder, ControlNeXtMethod
from studio.adapters.control.t2i_adapter import T2IAdapterMethod
from studio.adapters.control.inject import ControlError, clear_control, control_inputs, set_control

__all__ = ["ControlNetConfig", "ControlNeXtConfig", "T2IAdapterConfig", "ControlNetMethod", "ControlNeXtMethod",
           "T2IAdapterMethod", "ControlNeXtEncoder",
           "ControlError", "set_control", "clear_control", "control_inputs", "controlnet_module", "export_controlnet"]
