"""PPG: co-feature point prompt generation (cascade paper, section 3.1), pure numpy / OpenCV.

For a normalised anomaly map ``Map`` (H x W, 1.0 = the pixel threshold) and the frame's SAM embedding:

1. ``S_a = Map >= threshold`` (``detector.ppg.threshold``), split into 8-connected components; components
   smaller than ``min_region_area`` (fraction of the image) are dropped, the ``max_regions`` with the highest
   peak are kept. Each region gets its own prompt set (the paper handles one region; a line must handle
   several).
2. Positive points: the top-``top_k`` locations of ``R_a = S_a * Map`` inside the region, greedily kept at
   least ``min_spacing * max(H, W)`` pixels apart (non-maximum suppression by distance).
3. Ring ``N_a = dilate(region) - S_a`` with a ``kernel_shape`` structuring element (ellipse / rect / cross)
   whose size is ``kernel_size`` at 1024 px on the longer side, scaled to the map's resolution. ``S_a`` here
   is every above-threshold pixel, so a ring never lies on another anomaly.
4. Negative points: the SAM features ``F`` [C, 64, 64] cover the zero-padded 1024 x 1024 encoder frame; each
   map pixel is mapped to its feature cell through the resize factor of the embedding (the padding is never
   sampled). The region's mean feature (pixels of the region averaged) is compared by cosine similarity with
   the feature at every ring pixel; the ``negatives`` ring locations with the LOWEST similarity, spaced like
   the positives, become negative points.

Points are returned in original image pixel coordinates (x, y), positives first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding, Prompts

if TYPE_CHECKING:
    from config.settings import PpgSettings

ENCODER_SIZE = 1024
_SHAPES = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}


@dataclass(frozen=True)
class RegionPrompts:
    """Prompts for one anomalous region (one connected component of ``S_a``)."""

    index: int  # rank of the region (0 = highest peak)
    mask: np.ndarray  # bool [H, W]: the region (at the map's resolution)
    ring: np.ndarray  # bool [H, W]: N_a of the region, where negatives were chosen
    points: np.ndarray  # float32 [N, 2] (x, y) original image pixels; positives first
    labels: np.ndarray  # int32 [N]: 1 positive, 0 negative
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the region (inclusive-exclusive), original pixels
    peak: float  # max of the map inside the region
    area: int  # pixels of the region (map resolution)

    @property
    def positives(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def negatives(self) -> np.ndarray:
        return self.points[self.labels == 0]

    def prompts(self) -> Prompts:
        """The point prompts of CPS pass 1."""
        return Prompts(points=self.points, labels=self.labels)


# ------------------------------------------------------------------------------------------ helpers


def kernel_pixels(kernel_size: int, map_shape: tuple[int, int]) -> int:
    """The dilation kernel size at this map's resolution (``kernel_size`` is given at 1024 px, >= 3)."""
    return max(3, int(round(kernel_size * max(map_shape[:2]) / ENCODER_SIZE)))


def dilation_kernel(shape: str, kernel_size: int, map_shape: tuple[int, int]) -> np.ndarray:
    if shape not in _SHAPES:
        raise ValueError(f"kernel shape {shape!r}: allowed {', '.join(_SHAPES)}")
    k = kernel_pixels(kernel_size, map_shape)
    return cv2.getStructuringElement(_SHAPES[shape], (k, k))


def spaced_top_k(values: np.ndarray, ys: np.ndarray, xs: np.ndarray, k: int, min_dist: float) -> np.ndarray:
    """Indices of up to ``k`` highest ``values``, greedily kept at least ``min_dist`` apart (ties: first)."""
    if k <= 0 or len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    v = values.astype(np.float64, copy=True)
    yf, xf = ys.astype(np.float64), xs.astype(np.float64)
    d2 = float(min_dist) ** 2
    chosen: list[int] = []
    for _ in range(k):
        i = int(np.argmax(v))
        if not np.isfinite(v[i]):
            break
        chosen.append(i)
        v[(yf - yf[i]) ** 2 + (xf - xf[i]) ** 2 < d2] = -np.inf
        v[i] = -np.inf
    return np.asarray(chosen, dtype=np.int64)


def feature_grid_index(embedding: ImageEmbedding, map_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row of the feature cell under each map row, column under each map column), ints.

    Map pixel centre -> original pixels -> the resized image inside the zero-padded 1024 frame -> feature
    grid (``features`` cover the whole padded frame, the padding is never reached).
    """
    h, w = map_shape[:2]
    _, gh, gw = embedding.features.shape
    ih, iw = embedding.input_size
    rows = np.clip(((np.arange(h) + 0.5) * ih / h * gh / ENCODER_SIZE).astype(np.int64), 0, gh - 1)
    cols = np.clip(((np.arange(w) + 0.5) * iw / w * gw / ENCODER_SIZE).astype(np.int64), 0, gw - 1)
    return rows, cols


def normalised_features(features: np.ndarray) -> np.ndarray:
    """float32 [C, gh*gw], every cell's feature L2-normalised."""
    flat = features.reshape(features.shape[0], -1).astype(np.float32, copy=False)
    return flat / np.maximum(np.linalg.norm(flat, axis=0, keepdims=True), 1e-12)


def cell_similarity(unit_features: np.ndarray, region_cells: np.ndarray) -> np.ndarray:
    """float [gh*gw]: cosine similarity of every cell to the region's mean feature.

    ``region_cells``: the flat cell index of every region pixel (a cell counts once per pixel over it).
    """
    counts = np.bincount(region_cells, minlength=unit_features.shape[1]).astype(np.float32)
    # einsum, not BLAS: these products are tiny, and a multi-threaded BLAS on a busy CPU costs 100x more
    mean = np.einsum("cn,n->c", unit_features, counts)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    return np.einsum("c,cn->n", mean, unit_features)


# ------------------------------------------------------------------------------------------ PPG


def min_area_pixels(fraction: float, size: int) -> int:
    """``ppg.min_region_area`` (a fraction of the frame) in pixels of a frame of ``size`` pixels: at least 1."""
    return max(1, int(np.ceil(fraction * size)))


def extreme_regions(pixel_map: np.ndarray, settings: PpgSettings, seed_level: float = 0.0
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(S_a, kept region masks sorted by peak, highest first); a region whose peak is below ``seed_level``
    is not kept (it stays in S_a, so no ring lies on it)."""
    s_a = np.asarray(pixel_map) >= settings.threshold
    n, labels, stats, _ = cv2.connectedComponentsWithStats(s_a.astype(np.uint8), connectivity=8)
    if n <= 1:
        return s_a, []
    min_area = min_area_pixels(settings.min_region_area, s_a.size)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels[s_a], pixel_map[s_a])
    order = [i for i in np.argsort(-peaks[1:], kind="stable") + 1
             if stats[i, cv2.CC_STAT_AREA] >= min_area and peaks[i] >= seed_level]
    return s_a, [labels == i for i in order[: max(0, settings.max_regions)]]


def generate_prompts(pixel_map: np.ndarray, embedding: ImageEmbedding, settings: PpgSettings,
                     seed_level: float = 0.0) -> tuple[RegionPrompts, ...]:
    """Prompt sets for every anomalous region of ``pixel_map`` (``settings``: ``detector.ppg``) whose peak
    reaches ``seed_level`` (see :attr:`workers.interfaces.AnomalyMap.seed_level`)."""
    pixel_map = np.asarray(pixel_map, dtype=np.float32)
    if pixel_map.ndim != 2:
        raise ValueError(f"anomaly map must be H x W, got {pixel_map.shape}")
    h, w = pixel_map.shape
    s_a, regions = extreme_regions(pixel_map, settings, seed_level)
    if not regions:
        return ()
    kernel = dilation_kernel(settings.kernel_shape, settings.kernel_size, (h, w))
    min_dist = settings.min_spacing * max(h, w)
    rows, cols = feature_grid_index(embedding, (h, w))
    gw = embedding.features.shape[2]
    unit = normalised_features(embedding.features) if settings.negatives > 0 else None
    oh, ow = embedding.original_size
    sx, sy = ow / w, oh / h
    out = []
    for idx, region in enumerate(regions):
        ys, xs = np.nonzero(region)
        pos = spaced_top_k(pixel_map[ys, xs], ys, xs, settings.top_k, min_dist)
        ring = cv2.dilate(region.astype(np.uint8), kernel).astype(bool) & ~s_a
        rys, rxs = np.nonzero(ring)
        neg = np.zeros(0, dtype=np.int64)
        if len(rys) and unit is not None:
            sim = cell_similarity(unit, rows[ys] * gw + cols[xs])[rows[rys] * gw + cols[rxs]]
            neg = spaced_top_k(-sim, rys, rxs, settings.negatives, min_dist)
        pts = np.concatenate([np.stack([xs[pos], ys[pos]], 1), np.stack([rxs[neg], rys[neg]], 1)])
        pts = pts.astype(np.float32) * np.array([sx, sy], dtype=np.float32)
        labels = np.concatenate([np.ones(len(pos), np.int32), np.zeros(len(neg), np.int32)])
        box = (int(xs.min() * sx), int(ys.min() * sy), int(np.ceil((xs.max() + 1) * sx)),
               int(np.ceil((ys.max() + 1) * sy)))
        out.append(RegionPrompts(index=idx, mask=region, ring=ring, points=pts, labels=labels, box=box,
                                 peak=float(pixel_map[ys, xs].max()), area=int(len(ys))))
    return tuple(out)
