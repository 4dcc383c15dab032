"""LoRA key formats: ours and diffusers/PEFT (`unet.<module>.lora_A.weight`) are the same; kohya's
(`lora_unet_<module_with_underscores>.lora_down.weight` + `.alpha`, what ComfyUI and A1111 read)
is converted both ways here."""

from __future__ import annotations

import json
from typing import Any

import torch

from studio.adapters.base import AdapterError, module_path_of

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

# module-name parts that contain underscores (diffusers UNet, transformers CLIP); kohya joins
# every path part with "_", so turning a kohya name back into a path has to re-join these
_COMPOUNDS = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "layer_norm1", "layer_norm2", "final_layer_norm", "token_embedding", "position_embedding", "add_time_proj",
}, key=lambda c: -c.count("_"))


def detect_lora_format(tensors: dict[str, torch.Tensor]) -> str | None:
    keys = list(tensors)
    if any(k.startswith(tuple(KOHYA_PREFIX.values())) and ".lora_down." in k for k in keys):
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return None


def kohya_name(comp: str, path: str) -> str:
    if comp.startswith("text_encoder") and not path.startswith("text_model."):
        path = "text_model." + path  # transformers >= 5 dropped the prefix; A1111/ComfyUI expect it
    return KOHYA_PREFIX[comp] + path.replace(".", "_")


def path_from_kohya(name: str) -> tuple[str, str]:
    for comp, prefix in sorted(KOHYA_PREFIX.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        raise AdapterError(f"kohya key {name!r} has no known prefix ({', '.join(KOHYA_PREFIX.values())})")
    parts = rest.split("_")
    out, i = [], 0
    while i < len(parts):
        for compound in _COMPOUNDS:
            n = compound.count("_") + 1
            if "_".join(parts[i:i + n]) == compound:
                out.append(compound)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return comp, ".".join(out)


def to_kohya(tensors: dict[str, torch.Tensor], config: dict[str, Any], base: dict[str, Any],
             name: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors -> kohya keys with `.alpha`, plus the `ss_*` / `modelspec.*` header other tools read."""
    out: dict[str, torch.Tensor] = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for key, tensor in tensors.items():
        comp, _, rest = key.partition(".")
        path = module_path_of(rest)
        kname = kohya_name(comp, path)
        kind = "lora_down" if ".lora_A." in rest else "lora_up"
        out[f"{kname}.{kind}.weight"] = tensor.contiguous()
        alpha = float(alpha_pattern.get(f"{comp}.{path}", config.get("alpha") or config.get("rank")))
        out[f"{kname}.alpha"] = torch.tensor(alpha)
    family = base.get("family", "sd1")
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.get("rank")),
        "ss_network_alpha": str(config.get("alpha") or config.get("rank")),
        "ss_network_args": json.dumps({}),
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                                   "sdxl": "stable-diffusion-xl-v1-base/lora"}.get(family, f"{family}/lora"),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": name,
    }
    return out, metadata


def from_kohya(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya keys -> our keys, and the alpha of each module keyed `<component>.<module>`."""
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        kname, _, kind = key.partition(".")
        comp, path = path_from_kohya(kname)
        if kind == "lora_down.weight":
            out[f"{comp}.{path}.lora_A.weight"] = tensor
        elif kind == "lora_up.weight":
            out[f"{comp}.{path}.lora_B.weight"] = tensor
        elif kind == "alpha":
            alphas[f"{comp}.{path}"] = float(tensor.float().item())
        else:
            raise AdapterError(f"kohya key {key!r} is not a plain LoRA tensor (LoHa/LoKr/DoRA are not read)")
    return out, alphas


def to_diffusers(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors are already diffusers/PEFT keys; add the `lora_adapter_metadata` header diffusers reads
    for alpha and rank (without it diffusers assumes alpha = rank)."""
    packed: dict[str, Any] = {}
    for comp in sorted({k.partition(".")[0] for k in tensors}):
        paths = sorted({module_path_of(k.partition(".")[2]) for k in tensors if k.startswith(comp + ".")})
        alpha_pattern = {p: a for key, a in (config.get("alpha_pattern") or {}).items()
                         for c, _, p in [key.partition(".")] if c == comp}
        packed.update({f"{comp}.r": int(config["rank"]), f"{comp}.lora_alpha": float(config.get("alpha") or config["rank"]),
                       f"{comp}.target_modules": paths, f"{comp}.alpha_pattern": alpha_pattern,
                       f"{comp}.rank_pattern": {}})
    return dict(tensors), {"lora_adapter_metadata": json.dumps(packed, sort_keys=True), "format": "pt"}


def lora_from_foreign(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA written by kohya, diffusers or PEFT -> (our tensors, LoraConfig dict)."""
    fmt = detect_lora_format(tensors)
    alphas: dict[str, float] = {}
    if fmt == "kohya":
        tensors, alphas = from_kohya(tensors)
    elif fmt == "diffusers":
        tensors = {k if k.partition(".")[0] in KOHYA_PREFIX else f"unet.{k}": v for k, v in tensors.items()}
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        for key, value in packed.items():
            comp, _, field = key.partition(".")
            if field == "lora_alpha":
                for k in tensors:
                    if k.startswith(comp + ".") and ".lora_A." in k:
                        alphas.setdefault(f"{comp}.{module_path_of(k.partition('.')[2])}", float(value))
            elif field == "alpha_pattern":
                alphas.update({f"{comp}.{p}": float(a) for p, a in value.items()})
    else:
        raise AdapterError("not a LoRA in kohya or diffusers/PEFT keys")
    ranks = [int(t.shape[0]) for k, t in tensors.items() if ".lora_A." in k]
    if not ranks:
        raise AdapterError("the LoRA file has no lora_down / lora_A tensors")
    rank = max(set(ranks), key=ranks.count)
    default_alpha = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else float(rank)
    config = {"rank": rank, "alpha": default_alpha, "target_modules": [],
              "alpha_pattern": {k: a for k, a in alphas.items() if a != default_alpha},
              "text_encoder": any(k.startswith("text_encoder") for k in tensors)}
    return tensors, config
