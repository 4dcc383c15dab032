"""The shapes' geometry: each shape as a polygon (or a circle or ring), drawn as anti-aliased coverage."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 128


def _heart_polygon(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    pts[:, 1] += (1 - pts[:, 1].max() - (-1 - pts[:, 1].min())) / 2  # centre vertically
    return pts


def _cross_polygon(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


def _regular_polygon(sides: int, radius: float, start: float) -> np.ndarray:
    angles = np.deg2rad(start) + np.arange(sides) * 2 * np.pi / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


def _semicircle_polygon(radius: float = 1.12, n: int = 24) -> np.ndarray:
    """A half disc, flat side down, centred on its bounding box."""
    t = np.linspace(np.pi, 2 * np.pi, n)  # y grows downwards: this arc is the upper half
    return np.stack([radius * np.cos(t), radius * np.sin(t) + radius / 2], 1)


_POLYGONS = {
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": np.array([(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]),
    "star": _star_polygon(),
    "heart": _heart_polygon(),
    "cross": _cross_polygon(),
    # world v2
    "diamond": np.array([(0.0, -1.05), (0.7, 0.0), (0.0, 1.05), (-0.7, 0.0)]),
    "hexagon": _regular_polygon(6, 1.0, 0.0),  # corners left and right, flat top and bottom
    "octagon": _regular_polygon(8, 1.0, 22.5),  # flat sides on all four axes
    "oval": _regular_polygon(40, 1.0, 0.0) * (1.15, 0.62),  # an ellipse, wider than tall
    "semicircle": _semicircle_polygon(),
    "arrow": np.array([(-1.0, -0.26), (0.12, -0.26), (0.12, -0.72), (1.0, 0.0), (0.12, 0.72), (0.12, 0.26),
                       (-1.0, 0.26)]),
    "trapezoid": np.array([(-0.45, -0.62), (0.45, -0.62), (1.0, 0.62), (-1.0, 0.62)]),
}
RING_INNER = 0.55  # the ring's hole, as a fraction of its outer radius

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside), vectorised over pixels."""
    d = np.full(px.shape, np.inf)
    sign = np.ones(px.shape)
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[i - 1]
        ex, ey = x1 - x0, y1 - y0
        wx, wy = px - x0, py - y0
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d = np.minimum(d, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        c1 = py >= y0
        c2 = py < y1
        c3 = ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = np.where(flip, -sign, sign)
    return sign * np.sqrt(d)


def shape_coverage(shape: str, cx: float, cy: float, radius: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, as a float array of IMAGE_SIZE x IMAGE_SIZE."""
    if shape == "circle":
        sdf = np.hypot(_XX - cx, _YY - cy) - radius
    elif shape == "ring":  # an annulus between RING_INNER * radius and radius
        half_width = radius * (1 - RING_INNER) / 2
        sdf = np.abs(np.hypot(_XX - cx, _YY - cy) - (radius - half_width)) - half_width
    else:
        c, s = np.cos(angle), np.sin(angle)
        verts = _POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * radius + np.array([cx, cy])
        return polygon_coverage(verts)
    return np.clip(0.5 - sdf, 0.0, 1.0)


def polygon_coverage(verts: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a closed polygon given in pixel coordinates."""
    return np.clip(0.5 - _polygon_sdf(_XX, _YY, verts), 0.0, 1.0)
