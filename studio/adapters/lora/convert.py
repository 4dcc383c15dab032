"""LoRA key formats: ours and diffusers/PEFT (`unet.<module>.lora_A.weight`, on SD3 / Flux
`transformer.<module>.lora_A.weight`) are the same but for the text encoders' `text_model.` level (transformers >= 5
dropped it from CLIPTextModel; the files other tools read name it); kohya's
(`lora_unet_<module_with_underscores>.lora_down.weight` + `.alpha`, what ComfyUI and A1111 read) is converted both
ways here for UNet models (a diffusion transformer's kohya layout is not written). SDXL's kohya files name the two
text encoders `lora_te1_` and `lora_te2_`, SD 1.x files the one `lora_te_`."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import torch

from studio.adapters.base import COMPONENTS, AdapterError, module_path_of

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_SDXL_PREFIX = {**KOHYA_PREFIX, "text_encoder": "lora_te1_"}
# every prefix some tool writes, longest first, and the component it names
_KOHYA_READ = sorted({**{p: c for c, p in KOHYA_PREFIX.items()}, "lora_te1_": "text_encoder"}.items(),
                     key=lambda kv: -len(kv[0]))
TEXT_MODEL = "text_model."

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
    if any(k.startswith(tuple(p for p, _ in _KOHYA_READ)) and ".lora_down." in k for k in keys):
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return None


def standard_path(comp: str, path: str) -> str:
    """A module path as the files other tools read name it: text encoders' paths start at `text_model.`."""
    if comp.startswith("text_encoder") and not path.startswith(TEXT_MODEL):
        return TEXT_MODEL + path
    return path


def kohya_name(comp: str, path: str, sdxl: bool = False) -> str:
    return (KOHYA_SDXL_PREFIX if sdxl else KOHYA_PREFIX)[comp] + standard_path(comp, path).replace(".", "_")


def path_from_kohya(name: str) -> tuple[str, str]:
    for prefix, comp in _KOHYA_READ:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        raise AdapterError(f"kohya key {name!r} has no known prefix ({', '.join(p for p, _ in _KOHYA_READ)})")
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


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def to_kohya(tensors: dict[str, torch.Tensor], config: dict[str, Any], base: dict[str, Any],
             name: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors -> kohya keys with `.alpha`, plus the `ss_*` / `modelspec.*` header other tools read."""
    unwritten = sorted({k.partition(".")[0] for k in tensors} - set(KOHYA_PREFIX))
    if unwritten:  # the transformer of SD3 / Flux (kohya's sd3/flux scripts name its modules their own way)
        raise AdapterError("kohya key layout for sd3/flux is not written yet; use the diffusers format")
    if any(".lora_magnitude_vector." in k for k in tensors):
        # ComfyUI (checked at a125cd84) divides a per-output dora_scale by the norm of the base weight, not of
        # W + ΔW as DoRA (and PEFT, diffusers) do: such a file would load there and draw something else
        raise AdapterError("a DoRA adapter exports to diffusers keys only (diffusers loads it exactly); the kohya "
                           "layout's dora_scale is read differently by ComfyUI")
    out: dict[str, torch.Tensor] = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    family = base.get("family", "sd1")
    sdxl = family == "sdxl" or any(k.startswith("text_encoder_2.") for k in tensors)
    for key, tensor in tensors.items():
        comp, _, rest = key.partition(".")
        path = module_path_of(rest)
        kname = kohya_name(comp, path, sdxl)
        kind = "lora_down" if ".lora_A." in rest else "lora_up"
        out[f"{kname}.{kind}.weight"] = tensor.contiguous()
        alpha = float(alpha_pattern.get(f"{comp}.{path}", config.get("alpha") or config.get("rank")))
        out[f"{kname}.alpha"] = torch.tensor(alpha)
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


def module_pattern(comp: str, path: str) -> str:
    """The PEFT `rank_pattern` / `alpha_pattern` key naming exactly the module at `path` (PEFT matches
    `(.*\\.)?(key)$`; the `^` anchors it at the component's root). A text encoder's module matches with or
    without the `text_model.` level, so the key holds for transformers 4 and 5 alike."""
    if comp.startswith("text_encoder"):
        return r"^(?:text_model\.)?" + re.escape(path.removeprefix(TEXT_MODEL))
    return "^" + re.escape(path)


def module_value(patterns: dict[str, float], path: str) -> float | None:
    """The value `patterns` (PEFT keys, written by us or by diffusers/PEFT) gives the module at `path`."""
    for key, value in patterns.items():
        for candidate in {path, path.removeprefix(TEXT_MODEL)}:
            if re.match(rf"(.*\.)?({key})$", candidate):
                return value
    return None


def to_diffusers(tensors: dict[str, torch.Tensor],
                 config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors in diffusers/PEFT keys (text encoders' with their `text_model.` level), with the
    `lora_adapter_metadata` header diffusers (>= 0.33) reads instead of looking at the tensors: each
    component's rank `r`, `lora_alpha`, `target_modules` and, for modules whose rank or alpha differ from
    those (a baked layer narrower than the bake rank, kohya's per-module alphas), `rank_pattern` and
    `alpha_pattern`, and `use_dora` where DoRA magnitudes are in the file. Without the patterns diffusers would
    build every layer at `r` and fail on the others."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = float(config.get("alpha") or config["rank"])
    for comp in sorted({k.partition(".")[0] for k in tensors}):
        ranks: dict[str, int] = {}
        for key, tensor in tensors.items():
            head, _, rest = key.partition(".")
            if head == comp:
                out[f"{comp}.{standard_path(comp, rest)}"] = tensor
                if ".lora_A." in rest:
                    ranks[module_path_of(rest)] = int(tensor.shape[0])
        alphas = {p: float(alpha_pattern.get(f"{comp}.{p}", default_alpha)) for p in ranks}
        r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
        packed.update({
            f"{comp}.r": r, f"{comp}.lora_alpha": alpha,
            f"{comp}.target_modules": sorted(p.removeprefix(TEXT_MODEL) for p in ranks),
            f"{comp}.rank_pattern": {module_pattern(comp, p): v for p, v in sorted(ranks.items()) if v != r},
            f"{comp}.alpha_pattern": {module_pattern(comp, p): a for p, a in sorted(alphas.items()) if a != alpha},
            f"{comp}.use_dora": any(k.startswith(f"{comp}.") and ".lora_magnitude_vector." in k for k in tensors),
        })
    return out, {"lora_adapter_metadata": json.dumps(packed, sort_keys=True), "format": "pt"}


def _diffusers_alphas(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, float]:
    """Each module's alpha from a diffusers file's `lora_adapter_metadata` (none there: alpha = rank)."""
    packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        comp, _, rest = key.partition(".")
        if ".lora_A." not in rest:
            continue
        path = module_path_of(rest)
        alpha = float(tensor.shape[0])  # diffusers' rule for a file without the header: scale 1
        if f"{comp}.lora_alpha" in packed:
            own = module_value(packed.get(f"{comp}.alpha_pattern") or {}, path)
            alpha = packed[f"{comp}.lora_alpha"] if own is None else own
        alphas[f"{comp}.{path}"] = float(alpha)
    return alphas


def lora_from_foreign(tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA written by kohya, diffusers or PEFT -> (our tensors, LoraConfig dict). Text-encoder keys keep
    whatever `text_model.` level the file has (the loader fits them to the model)."""
    fmt = detect_lora_format(tensors)
    alphas: dict[str, float] = {}
    if fmt == "kohya":
        tensors, alphas = from_kohya(tensors)
    elif fmt == "diffusers":
        # keys naming no component are a UNet's (PEFT's own files of a bare UNet)
        tensors = {k if k.partition(".")[0] in COMPONENTS else f"unet.{k}": v for k, v in tensors.items()}
        alphas = _diffusers_alphas(tensors, metadata)
    else:
        raise AdapterError("not a LoRA in kohya or diffusers/PEFT keys")
    ranks = [int(t.shape[0]) for k, t in tensors.items() if ".lora_A." in k]
    if not ranks:
        raise AdapterError("the LoRA file has no lora_down / lora_A tensors")
    rank = _most_common(ranks)
    default_alpha = _most_common(alphas.values()) if alphas else float(rank)
    config = {"rank": rank, "alpha": default_alpha, "target_modules": [],
              "alpha_pattern": {k: a for k, a in alphas.items() if a != default_alpha},
              "text_encoder": any(k.startswith("text_encoder") for k in tensors)}
    return tensors, config
