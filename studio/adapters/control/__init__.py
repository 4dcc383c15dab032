"""Spatial control adapters: ControlNet, T2I-Adapter, ControlNeXt and UFC (few-shot, by matching against a support
set), all steering the denoiser through one hook (studio/adapters/control/inject.py) with a conditioning scale and a
start-end window, several conditions summed with their weights."""

from studio.adapters.control.config import ControlNetConfig, ControlNeXtConfig, T2IAdapterConfig, UFCConfig
from studio.adapters.control.controlnet import ControlNetMethod, controlnet_module, export_controlnet
from studio.adapters.control.controlnext import ControlNeXtEncoder, ControlNeXtMethod
from studio.adapters.control.t2i_adapter import T2IAdapterMethod
from studio.adapters.control.ufc import UFCMethod
from studio.adapters.control.inject import ControlError, clear_control, control_inputs, set_control

__all__ = ["ControlNetConfig", "ControlNeXtConfig", "T2IAdapterConfig", "UFCConfig", "ControlNetMethod",
           "ControlNeXtMethod", "T2IAdapterMethod", "UFCMethod", "ControlNeXtEncoder",
           "ControlError", "set_control", "clear_control", "control_inputs", "controlnet_module", "export_controlnet"]
