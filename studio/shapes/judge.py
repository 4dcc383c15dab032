"""The judge: a small CNN that reads shape, colour, background, size and position from an image.

It is the shapes world's CLIP score and FID network: prompt accuracy comes from its heads,
Fréchet distance from its penultimate features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.shapes import world

NONE = "none"  # v2's shape head: a shape of no world ("none of the known")
COUNTS = ("one", "two")
ATTRIBUTES = ("shape", "colour", "background", "size", "position")


def heads_for(version: int = 1) -> dict[str, tuple[str, ...]]:
    """A judge's heads and their classes. V1 reads V1's six shapes; v2 reads every v2 shape (base and held out),
    says NONE for shapes of no world, and counts the objects (one, or a two-shape scene)."""
    w = world.get_world(version)
    heads = {"shape": w.shapes + ((NONE,) if version > 1 else ()), "colour": tuple(world.COLOURS),
             "background": tuple(world.BACKGROUNDS), "size": world.SIZES, "position": world.POSITIONS}
    return heads | ({"count": COUNTS} if version > 1 else {})


HEADS = heads_for(1)
FEATURES = 256


class Judge(nn.Module):
    def __init__(self, version: int = 1) -> None:
        super().__init__()
        self.version = version
        self.classes = heads_for(version)
        chans = [3, 32, 64, 96, 128, 128]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):  # 128 -> 4 pixels
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(c)) for name, c in self.classes.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: Bx3x128x128 in [0, 1]. Returns (features, logits per head)."""
        feats = self.features(self.body(images * 2 - 1))
        return feats, {name: head(feats) for name, head in self.heads.items()}


def stage_features(judge: Judge):
    """images (Bx3xHxW in [0, 1]) → the activations at the end of each of the judge's five stages (32 channels
    at half the resolution, down to 128 at 1/32). The judge is frozen; gradients reach the images."""
    judge.requires_grad_(False)
    stages = [judge.body[i:i + 6] for i in range(0, len(judge.body), 6)]

    def activations(images: torch.Tensor) -> list[torch.Tensor]:
        x, out = images * 2 - 1, []
        for stage in stages:
            x = stage(x)
            out.append(x)
        return out

    return activations


def perceptual_distance(judge: Judge):
    """An LPIPS-style distance on the judge's stages: per stage, channel-normalised activations, squared
    difference averaged; the mean over stages. Differentiable in both images (Bx3xHxW in [0, 1])."""
    features = stage_features(judge)

    def normalised(images: torch.Tensor) -> list[torch.Tensor]:
        return [x / (x.norm(dim=1, keepdim=True) + 1e-8) for x in features(images)]

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = normalised(a), normalised(b)
        return torch.stack([((x - y) ** 2).sum(1).mean() for x, y in zip(fa, fb)]).mean()

    return distance


IGNORE = -100  # the label of a head that does not apply to an image


def scene_labels(scenes: list[tuple[list[world.Spec], bool]], classes: dict[str, tuple[str, ...]] = HEADS
                 ) -> dict[str, torch.Tensor]:
    """Each head's class index for each training image, given the specs drawn in it and whether its shape was
    replaced by an outlier: NONE for an outlier; IGNORE for a two-shape scene's shape, size and position (their
    colour and background are shared, and the count head says two)."""
    out: dict[str, list[int]] = {name: [] for name in classes}
    for specs, outlier in scenes:
        for name, names in classes.items():
            if name == "count":
                out[name].append(len(specs) - 1)
            elif len(specs) > 1 and name in ("shape", "size", "position"):
                out[name].append(IGNORE)
            else:
                out[name].append(names.index(NONE if outlier and name == "shape" else getattr(specs[0], name)))
    return {name: torch.tensor(v) for name, v in out.items()}


def spec_labels(specs: list[world.Spec], classes: dict[str, tuple[str, ...]] = HEADS) -> dict[str, torch.Tensor]:
    return scene_labels([([s], False) for s in specs], classes)


def extend_judge(judge: Judge, version: int) -> Judge:
    """A judge for another world that starts from this one: every layer copied, and each head's rows for the
    classes both know (a new class's row, and a new head, start from their initialisation)."""
    new = Judge(version)
    state = {k: v for k, v in judge.state_dict().items() if not k.startswith("heads.")}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, names in new.classes.items():
            if name not in judge.classes:
                continue
            for i, cls in enumerate(names):
                if cls in judge.classes[name]:
                    j = judge.classes[name].index(cls)
                    new.heads[name].weight[i] = judge.heads[name].weight[j]
                    new.heads[name].bias[i] = judge.heads[name].bias[j]
    return new


def augment(images: torch.Tensor, generator: torch.Generator, blur: float = 1.6) -> torch.Tensor:
    """Blur (sigma up to `blur` pixels), noise, small shifts and a little contrast change: what a generated image
    may suffer."""
    b = images.shape[0]
    dev = images.device
    # small shifts, edge-replicated
    shift = torch.randint(-3, 4, (b, 2), generator=generator, device=dev).float()
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift * 2 / world.IMAGE_SIZE
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    # gaussian blur with a per-image sigma in [0, blur]
    sigma = torch.rand(b, generator=generator, device=dev) * blur + 1e-3
    x = torch.arange(-3, 4, device=dev).float()
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    padded = F.pad(images, (3, 3, 3, 3), mode="replicate")
    c = images.shape[1]
    kx = k.repeat_interleave(c, 0)[:, None, None, :]
    ky = k.repeat_interleave(c, 0)[:, None, :, None]
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[2:]), kx, groups=b * c)
    out = F.conv2d(out, ky, groups=b * c).reshape(b, c, *images.shape[2:])
    # contrast/brightness wobble and noise
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator, device=dev) - 0.5) * 0.2
    bias = (torch.rand(b, 1, 1, 1, generator=generator, device=dev) - 0.5) * 0.1
    noise = torch.randn(out.shape, generator=generator, device=dev) * torch.rand(
        b, 1, 1, 1, generator=generator, device=dev) * 0.08
    return (out * gain + bias + noise).clamp(0, 1)


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 BxHxWx3 (numpy or torch) -> float Bx3xHxW in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.permute(0, 3, 1, 2).float() / 255


def train_judge(images: torch.Tensor, labels: list[world.Spec] | dict[str, torch.Tensor], *, steps: int = 3000,
                batch: int = 256, lr: float = 2e-3, seed: int = 0, device: str = "cpu", version: int = 1,
                init: Judge | None = None, bf16: bool = False, blur: float = 1.6, log=print) -> Judge:
    """Train on uint8 renders (NxHxWx3, kept on `device`) with augmentation; labels are the renders' specs or
    scene_labels(...). `init` continues from a judge (extended to `version`); `bf16` autocasts (1.4-2.8x on CPU)."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    judge = (extend_judge(init, version) if init is not None else Judge(version)).to(device).train()
    if not isinstance(labels, dict):
        labels = spec_labels(labels, judge.classes)
    labels = {k: v.to(device) for k, v in labels.items()}
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = images.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen, device=device)
        x = augment(to_tensor(images[idx]), gen, blur)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            _, logits = judge(x)
        loss = sum(_head_loss(logits[k].float(), labels[k][idx]) for k in judge.classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f}")
    return judge.eval()


def _head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the images the head applies to (zero, not NaN, when it applies to none)."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Float Bx3xHxW images in [0, 1] -> (features, predicted attribute names per head)."""
    device = next(judge.parameters()).device
    feats, preds = [], {k: [] for k in judge.classes}
    for i in range(0, images.shape[0], batch):
        f, logits = judge(images[i:i + batch].to(device))
        feats.append(f.float().cpu())
        for k, classes in judge.classes.items():
            preds[k] += [classes[j] for j in logits[k].argmax(1).tolist()]
    return torch.cat(feats), preds


def accuracy(preds: dict[str, list[str]], specs: list[world.Spec]) -> dict[str, float]:
    """Per attribute the judge reads, the fraction of images where it reads the spec's value."""
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(preds[k], specs)])) for k in ATTRIBUTES if k in preds}


def save_judge(judge: Judge, path: Path) -> None:
    from safetensors.torch import save_file

    from studio.utils.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in judge.state_dict().items()}, str(tmp),
                  metadata={"kind": "studio-judge", "heads": ",".join(judge.classes),
                                                            "world": str(judge.version)})


def load_judge(path: Path | None = None, device: str = "cpu") -> Judge:
    from safetensors.torch import load_file

    from studio.shapes.embedded import JUDGE_PATH

    path = Path(path or JUDGE_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"no judge weights at {path}; run `studio pretrain` first")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        version = int((f.metadata() or {}).get("world", "1"))
    judge = Judge(version)
    judge.load_state_dict(load_file(str(path)))
    return judge.to(device).eval()
