"""Visual features of an ad image, measured from its pixels alone.

The simulated users' click model (:mod:`sim.world`) sees an ad only
through these numbers, so a creative is liked for how it *looks*, never for
the prompt text that produced it. Nothing here knows the prompt or the
renderer's layout; every feature is an image statistic.

Features (all floats):

``hue``
    Circular mean hue in degrees [0, 360): the angle of the mean pixel in the
    opponent-colour plane (α = R − (G + B)/2, β = √3/2 · (G − B)), where each
    pixel's vector has its hue as angle and its chroma as length, so grey,
    white and black pixels do not vote.
``colorfulness``
    Length of that mean vector / 255, in [0, 1]: 0 for a grey image, high
    when one saturated hue dominates.
``saturation``
    Mean HSV saturation in [0, 1].
``brightness``
    Mean luma (Rec. 601) in [0, 1].
``contrast``
    Standard deviation of luma, in [0, 0.5].
``edge_density``
    Fraction of pixels whose luma gradient exceeds 0.12 (busy patterns, text).
``copy``
    1.0 when a text banner is detected, else 0.0. Cue: a full-width,
    uniformly filled horizontal band touching the top or bottom edge, 8–30 %
    of the height, bounded by a sharp edge across ≥ 90 % of the columns and
    holding some high-contrast (text) pixels (:func:`detect_banner`).
``product_area``, ``product_x``, ``product_y``
    Fraction of the image covered by the product, and its centroid as an
    offset from the image centre in [-0.5, 0.5] (x to the right, y down).
    Approximation: the background is assumed to be drawn from two colours
    and their blends (solid, gradients, patterns), so its pixels lie near one
    line in RGB space. That line is fitted (principal axis) to a ring of
    pixels along the image border (banner rows excluded); pixels farther than
    40 RGB units from it are product pixels, cleaned by a 3 × 3 opening and a
    closing. Product pixels that happen to match the background line (a red
    product on a red/white background) are missed, so area is then
    under-estimated; the estimate is monotone in the true scale.

>>> from PIL import Image
>>> feats = visual_features(Image.new("RGB", (64, 64), (33, 99, 214)))
>>> round(feats["hue"]), feats["product_area"], feats["copy"]
(219, 0.0, 0.0)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FEATURES: tuple[str, ...] = (
    "hue",
    "colorfulness",
    "saturation",
    "brightness",
    "contrast",
    "edge_density",
    "copy",
    "product_area",
    "product_x",
    "product_y",
)
"""Names of the features :func:`visual_features` returns, in order."""

FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "hue": (0.0, 360.0),
    "colorfulness": (0.0, 0.6),
    "saturation": (0.0, 0.8),
    "brightness": (0.15, 0.85),
    "contrast": (0.05, 0.4),
    "edge_density": (0.0, 0.2),
    "copy": (0.0, 1.0),
    "product_area": (0.0, 0.5),
    "product_x": (-0.3, 0.3),
    "product_y": (-0.3, 0.3),
}
"""Nominal range of each feature over typical ads (what the click model normalises by)."""

PRODUCT_DISTANCE = 40.0
"""RGB distance from the background line above which a pixel counts as product."""
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def visual_features(image: Image.Image) -> dict[str, float]:
    """Measure :data:`FEATURES` from the pixels of ``image`` (any mode; converted to RGB).

    Parameters
    ----------
    image
        The ad image.

    Returns
    -------
    dict
        Feature name to value; see the module docstring for definitions.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    luma = rgb @ _LUMA / 255.0
    features = _colour_features(rgb)
    features["brightness"] = float(luma.mean())
    features["contrast"] = float(luma.std())
    features["edge_density"] = _edge_density(luma)
    banner = detect_banner(luma)
    features["copy"] = 0.0 if banner is None else 1.0
    mask = product_mask(rgb, banner)
    features.update(_mask_geometry(mask))
    return features


def detect_banner(luma: np.ndarray) -> tuple[int, int] | None:
    """Rows ``(top, bottom)`` of a full-width text banner at the top or bottom edge, or None.

    ``luma`` is an H × W array in [0, 1]. A banner is a band 8–30 % of the
    height touching the top or bottom edge whose inner boundary is a sharp
    edge (within two rows) across ≥ 90 % of the columns, whose outer columns
    (5 % each side) are one uniform fill in ≥ 80 % of its rows, and which
    holds 0.3–50 % strongly contrasting (text) pixels.
    """
    height, width = luma.shape
    steps = np.abs(np.diff(luma, axis=0)) > 0.15  # steps[r]: row r vs row r + 1
    side = max(1, round(0.05 * width))
    outer = np.concatenate([luma[:, :side], luma[:, -side:]], axis=1)
    for rows in range(round(0.30 * height), max(2, round(0.08 * height)) - 1, -1):  # widest first
        for top, bottom, first_step in ((0, rows, rows - 2), (height - rows, height, height - rows - 1)):
            if not (steps[first_step] | steps[first_step + 1]).mean() >= 0.9:
                continue
            band_outer = outer[top:bottom]
            fill = float(np.median(band_outer))
            if (np.abs(band_outer - fill) < 0.05).all(axis=1).mean() < 0.8:
                continue
            text = (np.abs(luma[top:bottom] - fill) > 0.25).mean()
            if 0.003 <= text <= 0.5:
                return top, bottom
    return None


def product_mask(rgb: np.ndarray, banner: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean H × W mask of pixels that do not belong to the two-colour background."""
    height, width, _ = rgb.shape
    ring = max(2, round(0.035 * min(height, width)))
    keep_rows = np.ones(height, dtype=bool)
    if banner is not None:
        keep_rows[banner[0] : banner[1]] = False
    border = np.zeros((height, width), dtype=bool)
    border[:ring, :] = border[-ring:, :] = True
    border[:, :ring] = border[:, -ring:] = True
    border &= keep_rows[:, None]
    samples = rgb[border]
    if len(samples) == 0:
        return np.zeros((height, width), dtype=bool)
    centre = samples.mean(axis=0)
    spread = samples - centre
    eigenvalues, eigenvectors = np.linalg.eigh(spread.T @ spread / len(spread))
    offsets = [rgb[..., channel] - centre[channel] for channel in range(3)]
    squared = offsets[0] * offsets[0] + offsets[1] * offsets[1] + offsets[2] * offsets[2]
    if eigenvalues[-1] > 9.0:  # a real second colour (sd > 3 RGB units), not rounding noise
        axis = eigenvectors[:, -1]
        along = offsets[0] * axis[0] + offsets[1] * axis[1] + offsets[2] * axis[2]
        squared = squared - along * along
    mask = squared > PRODUCT_DISTANCE**2
    mask &= keep_rows[:, None]
    mask[border] = False
    mask = _dilate(_erode(mask))  # opening: drop specks
    return _erode(_dilate(mask))  # closing: fill pinholes


def _colour_features(rgb: np.ndarray) -> dict[str, float]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    chroma = high - np.minimum(np.minimum(r, g), b)
    saturation = chroma / np.maximum(high, 1e-9)
    alpha = float((r - 0.5 * (g + b)).mean()) / 255.0  # opponent-colour plane: its angle is
    beta = float((g - b).mean()) * (np.sqrt(3.0) / 2.0) / 255.0  # the hue, its length the chroma
    mean_hue = float(np.degrees(np.arctan2(beta, alpha)) % 360.0) if (alpha or beta) else 0.0
    return {
        "hue": mean_hue,
        "colorfulness": float(np.hypot(alpha, beta)),
        "saturation": float(saturation.mean()),
    }


def _edge_density(luma: np.ndarray) -> float:
    dx = np.abs(np.diff(luma, axis=1))[:-1, :]
    dy = np.abs(np.diff(luma, axis=0))[:, :-1]
    return float((np.maximum(dx, dy) > 0.12).mean())


def _mask_geometry(mask: np.ndarray) -> dict[str, float]:
    height, width = mask.shape
    count = int(mask.sum())
    if count == 0:
        return {"product_area": 0.0, "product_x": 0.0, "product_y": 0.0}
    rows, cols = np.nonzero(mask)
    return {
        "product_area": count / mask.size,
        "product_x": float((cols.mean() + 0.5) / width - 0.5),
        "product_y": float((rows.mean() + 0.5) / height - 0.5),
    }


def _erode(mask: np.ndarray) -> np.ndarray:
    """3 × 3 binary erosion (outside the image counts as set)."""
    return ~_dilate(~mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 × 3 binary dilation, done as a row pass then a column pass."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    out = rows.copy()
    out[1:, :] |= rows[:-1, :]
    out[:-1, :] |= rows[1:, :]
    return out
