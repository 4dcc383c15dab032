"""LoHa and LoKr files in LyCORIS's kohya key layout (`lora_unet_<module>.hada_w1_a`, `.lokr_w1`, `.lokr_w2_a` …
plus `.alpha`), the layout ComfyUI's and A1111's LyCORIS loaders read. Studio's tensors already carry LyCORIS's
names (PEFT keeps them), keyed `unet.<module>.<name>`; a LoKr whose two factors are both full is written with
its scale folded into `lokr_w1` and no alpha (LyCORIS and ComfyUI take no scale for it; PEFT's is alpha/rank)."""

from __future__ import annotations

import json
from typing import Any

import torch

from studio.adapters.base import AdapterError
from studio.adapters.lora.convert import KOHYA_PREFIX, kohya_name

NETWORK = {"loha": ("lycoris.kohya", "loha"), "lokr": ("lycoris.kohya", "lokr")}


def to_lycoris_kohya(method: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], base: dict[str, Any],
                     name: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if sorted({k.partition(".")[0] for k in tensors} - set(KOHYA_PREFIX)):
        raise AdapterError(f"the kohya key layout of a {method} adapter is written for UNet models only (sd1, sdxl)")
    family = base.get("family", "sd1")
    sdxl = family == "sdxl"
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        comp, _, rest = key.partition(".")
        path, _, part = rest.rpartition(".")
        modules.setdefault(kohya_name(comp, path, sdxl), {})[part] = tensor.contiguous()
    alpha, rank = float(config.get("alpha") or config["rank"]), int(config["rank"])
    out: dict[str, torch.Tensor] = {}
    for kname, parts in modules.items():
        full_lokr = method == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts
        for part, tensor in parts.items():
            out[f"{kname}.{part}"] = tensor * (alpha / rank) if full_lokr and part == "lokr_w1" else tensor
        if not full_lokr:
            out[f"{kname}.alpha"] = torch.tensor(alpha)
    module, algo = NETWORK[method]
    metadata = {"ss_network_module": module, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps({"algo": algo}), "ss_output_name": name,
                "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)}
    return out, metadata
