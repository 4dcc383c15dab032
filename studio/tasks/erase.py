"""`studio erase`: what a membrane is trained on when the user names only concepts."""

from __future__ import annotations


def default_prompts(pipe, concepts: list[str], n: int = 64, seed: int = 0) -> list[str]:
    """What the membrane is trained on when no prompts are given: on the embedded model, captions of its
    world that name each concept (a shape or colour); otherwise the concepts themselves (as the paper)."""
    if getattr(pipe, "studio_architecture", "") == "shapes":
        from studio.shapes import world

        prompts = [p for i, c in enumerate(concepts) for p in world.prompts_naming(c, n // len(concepts), seed + i)]
        if prompts:
            return prompts
    return list(concepts)
