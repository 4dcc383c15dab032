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

HEADS = {
    "shape": world.SHAPES,
    "colour": tuple(world.COLOURS),
    "background": tuple(world.BACKGROUNDS),
    "size": world.SIZES,
    "position": world.POSITIONS,
}
FEATURES = 256


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 64, 96, 128, 128]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):  # 128 -> 4 pixels
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(classes)) for name, classes in HEADS.items()})

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


def spec_labels(specs: list[world.Spec]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([classes.index(getattr(s, name)) for s in specs]) for name, classes in HEADS.items()}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, small shifts and a little contrast change: what a generated image may suffer."""
    b = images.shape[0]
    dev = images.device
    # small shifts, edge-replicated
    shift = torch.randint(-3, 4, (b, 2), generator=generator, device=dev).float()
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift * 2 / world.IMAGE_SIZE
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    # gaussian blur with a per-image sigma in [0, 1.6]
    sigma = torch.rand(b, generator=generator, device=dev) * 1.6 + 1e-3
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


def train_judge(images: torch.Tensor, specs: list[world.Spec], *, steps: int = 3000, batch: int = 256,
                lr: float = 2e-3, seed: int = 0, device: str = "cpu", log=print) -> Judge:
    """Train on uint8 renders (NxHxWx3, kept on `device`) with augmentation."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    judge = Judge().to(device)
    labels = {k: v.to(device) for k, v in spec_labels(specs).items()}
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = images.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen, device=device)
        x = augment(to_tensor(images[idx]), gen)
        _, logits = judge(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f}")
    return judge.eval()


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Float Bx3xHxW images in [0, 1] -> (features, predicted attribute names per head)."""
    device = next(judge.parameters()).device
    feats, preds = [], {k: [] for k in HEADS}
    for i in range(0, images.shape[0], batch):
        f, logits = judge(images[i:i + batch].to(device))
        feats.append(f.float().cpu())
        for k, classes in HEADS.items():
            preds[k] += [classes[j] for j in logits[k].argmax(1).tolist()]
    return torch.cat(feats), preds


def accuracy(preds: dict[str, list[str]], specs: list[world.Spec]) -> dict[str, float]:
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(preds[k], specs)])) for k in HEADS}


def save_judge(judge: Judge, path: Path) -> None:
    from safetensors.torch import save_file

    from studio.utils.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in judge.state_dict().items()}, str(tmp),
                  metadata={"kind": "studio-judge", "heads": ",".join(HEADS)})


def load_judge(path: Path | None = None, device: str = "cpu") -> Judge:
    from safetensors.torch import load_file

    from studio.shapes.embedded import JUDGE_PATH

    path = Path(path or JUDGE_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"no judge weights at {path}; run `studio pretrain` first")
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.to(device).eval()
