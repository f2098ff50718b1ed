"""``lineinspect train-adapter DATASET --out FILE``: train per-layer linear CLIP adapters (APRIL-GAN style).

DATASET is an auxiliary set in MVTec layout (a category folder with ``test/<type>/``,
``ground_truth/<type>/<stem>_mask.png`` and ``train/good/``, or a folder of such categories, one nesting
level allowed). The backbone stays frozen: every image goes through it once and the tapped layers' tokens
(after the frozen ``ln_post``) are cached, so each epoch only runs the adapters, which is cheap on a CPU.
Loss per layer: focal loss + dice(abnormal, mask) + dice(normal, 1 - mask) on the abnormal-probability map
upsampled to the mask size; Adam. The output file is described in ``workers.clip.adapters``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.contracts import ModelLoadError
from workers.dataset import find_categories
from workers.imageio import images_in, read_image

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

FOCAL_GAMMA = 2.0
FEATURE_CACHE_FLOAT16_BYTES = 512 * 1024 * 1024  # above this the cached tokens are kept in float16


@dataclass(frozen=True)
class TrainSample:
    image: Path
    mask: Path | None  # None: a good image (all-normal mask)
    category: str
    kind: str  # defect type folder, "good" for normal images


def find_samples(dataset: str | Path, max_images: int = 0) -> list[TrainSample]:
    """Defect images with masks plus about as many good images (test/good first, then train/good), per
    category. ``max_images`` > 0 keeps that many, taken round-robin over (category, type) groups."""
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    groups: list[list[TrainSample]] = []
    for cat in (c.root for c in find_categories(root)):
        n_defect = 0
        for tdir in sorted(p for p in (cat / "test").iterdir() if p.is_dir() and p.name != "good"):
            items = []
            for img in images_in(tdir):
                mask = cat / "ground_truth" / tdir.name / f"{img.stem}_mask.png"
                if mask.is_file():
                    items.append(TrainSample(img, mask, cat.name, tdir.name))
                else:
                    log.warning("train-adapter: no mask for %s, skipped", img)
            n_defect += len(items)
            if items:
                groups.append(items)
        good = images_in(cat / "test" / "good") + images_in(cat / "train" / "good")
        good = good[: max(n_defect, 1)]
        if good:
            groups.append([TrainSample(p, None, cat.name, "good") for p in good])
    samples: list[TrainSample] = []
    depth = max((len(g) for g in groups), default=0)
    for i in range(depth):  # round robin, so any prefix is balanced
        samples.extend(g[i] for g in groups if i < len(g))
    if max_images > 0:
        samples = samples[:max_images]
    if not any(s.mask is not None for s in samples):
        raise FileNotFoundError(f"no defect images with masks under {root} (MVTec layout expected)")
    return samples


def _read_mask(sample: TrainSample, size: int) -> np.ndarray:
    import cv2

    if sample.mask is None:
        return np.zeros((size, size), np.uint8)
    m = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ValueError(f"cannot read mask {sample.mask}")
    m = cv2.resize((m > 127).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (m >= 0.5).astype(np.uint8)


def cache_features(backbone: Any, samples: list[TrainSample], layers: tuple[int, ...], mask_size: int,
                   batch: int = 4, progress: bool = True) -> tuple[list[Any], Any]:
    """Run the frozen backbone once: per layer ``ln_post(tokens)`` [n, N, width] and masks [n, S, S] (uint8)."""
    import torch
    from tqdm import tqdm

    from workers.clip.backbone import encode_tokens, preprocess

    n = len(samples)
    n_tok = backbone.grid_size ** 2
    nbytes = n * n_tok * backbone.width * len(layers) * 4
    dtype = torch.float16 if nbytes > FEATURE_CACHE_FLOAT16_BYTES else torch.float32
    feats = [torch.empty((n, n_tok, backbone.width), dtype=dtype) for _ in layers]
    masks = torch.empty((n, mask_size, mask_size), dtype=torch.uint8)
    ln_post = backbone.model.visual.ln_post
    bar = tqdm(total=n, desc="caching CLIP features", unit="img", disable=not progress)
    with torch.no_grad():
        for start in range(0, n, batch):
            chunk = samples[start:start + batch]
            x = preprocess(backbone, [read_image(s.image) for s in chunk])
            _, tokens = encode_tokens(backbone, x, layers, vv_blocks=0)
            for li, tok in enumerate(tokens):
                feats[li][start:start + len(chunk)] = ln_post(tok).to("cpu", dtype)
            for j, s in enumerate(chunk):
                masks[start + j] = torch.from_numpy(_read_mask(s, mask_size))
            bar.update(len(chunk))
    bar.close()
    log.info("train-adapter: cached %d images x %d layers (%s, %.0f MB)", n, len(layers), str(dtype),
             nbytes / (2 if dtype == torch.float16 else 1) / 1e6)
    return feats, masks


def focal_loss(prob: Any, target: Any, gamma: float = FOCAL_GAMMA, eps: float = 1e-6) -> Any:
    """Binary focal loss on probabilities of the positive (abnormal) class."""
    p = prob.clamp(eps, 1.0 - eps)
    pos = -target * (1.0 - p) ** gamma * p.log()
    neg = -(1.0 - target) * p ** gamma * (1.0 - p).log()
    return (pos + neg).mean()


def dice_loss(prob: Any, target: Any, eps: float = 1.0) -> Any:
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def adapter_loss(adapters: Any, text: Any, feats: list[Any], masks: Any, grid: int) -> Any:
    """Summed over layers: focal + dice(abnormal, mask) + dice(normal, 1 - mask)."""
    import torch.nn.functional as F

    from workers.clip.mapper import abnormal_probability

    target = masks.float().unsqueeze(1)  # [b, 1, S, S]
    size = target.shape[-2:]
    total = 0.0
    for adapter, f in zip(adapters, feats, strict=True):
        p = abnormal_probability(adapter(f.float()), text)  # [b, N]
        p = F.interpolate(p.reshape(-1, 1, grid, grid), size=size, mode="bilinear", align_corners=False)
        total = total + focal_loss(p, target) + dice_loss(p, target) + dice_loss(1.0 - p, 1.0 - target)
    return total


def train_adapters(backbone: Any, text: Any, feats: list[Any], masks: Any, layers: tuple[int, ...], *,
                   epochs: int = 5, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
                   progress: bool = True) -> tuple[Any, list[float]]:
    """Train fresh adapters on cached features. Returns (adapters in eval mode, mean loss per epoch)."""
    import torch
    from tqdm import tqdm

    from workers.clip.adapters import AdapterConfig, new_adapters

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch size must be >= 1 and lr > 0")
    config = AdapterConfig.for_backbone(backbone, layers)
    adapters = new_adapters(config, seed=seed)
    adapters.train()
    opt = torch.optim.Adam(adapters.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    n = masks.shape[0]
    steps = math.ceil(n / batch_size)
    history: list[float] = []
    bar = tqdm(total=epochs * steps, desc="training adapters", unit="step", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            loss = adapter_loss(adapters, text, [f[idx] for f in feats], masks[idx], backbone.grid_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
        history.append(total / count)
        log.info("train-adapter: epoch %d/%d loss %.5f", epoch + 1, epochs, history[-1])
    bar.close()
    adapters.eval()
    for p in adapters.parameters():
        p.requires_grad_(False)
    return adapters, history


def main(settings: Settings, args: argparse.Namespace) -> int:
    """CLI entry: DATASET, --out, --epochs, --batch, --lr, --seed, --max-images (see stream.cli)."""
    import torch

    from workers.clip.adapters import AdapterConfig, save_adapters
    from workers.clip.backbone import load_clip_backbone
    from workers.clip.prompts import ensemble_text_embeddings

    c = settings.clip
    epochs = int(getattr(args, "epochs", 5))
    batch = int(getattr(args, "batch", 8))
    lr = float(getattr(args, "lr", 1e-3))
    seed = int(getattr(args, "seed", 0))
    max_images = int(getattr(args, "max_images", 0) or 0)
    progress = not bool(getattr(args, "quiet", False))
    out = Path(args.out)
    try:
        samples = find_samples(args.dataset, max_images)
    except (FileNotFoundError, OSError) as exc:
        log.error("train-adapter: %s", exc)
        return 2
    n_def = sum(s.mask is not None for s in samples)
    log.info("train-adapter: %d images (%d with defect masks, %d good) from %s", len(samples), n_def,
             len(samples) - n_def, args.dataset)
    try:
        backbone = load_clip_backbone(c.model, c.pretrained, c.image_size, device="cpu",
                                      allow_random=bool(c.allow_random_weights))
    except ModelLoadError as exc:
        log.error("train-adapter: %s", exc)
        return 3
    layers = tuple(int(x) for x in c.layers)
    bad = [x for x in layers if not 1 <= x <= backbone.num_layers]
    if bad:
        log.error("train-adapter: clip.layers %s outside 1..%d of %s", bad, backbone.num_layers, c.model)
        return 2
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    text = ensemble_text_embeddings(backbone, c.class_name)
    feats, masks = cache_features(backbone, samples, layers, backbone.image_size, progress=progress)
    t1 = time.perf_counter()
    adapters, history = train_adapters(backbone, text, feats, masks, layers, epochs=epochs, batch_size=batch,
                                       lr=lr, seed=seed, progress=progress)
    t2 = time.perf_counter()
    meta = {"dataset": str(args.dataset), "images": len(samples), "defect_images": n_def, "epochs": epochs,
            "batch": batch, "lr": lr, "seed": seed, "loss_history": [round(x, 6) for x in history],
            "weights": backbone.weights, "class_name": c.class_name, "cache_s": round(t1 - t0, 2),
            "train_s": round(t2 - t1, 2)}
    config = AdapterConfig.for_backbone(backbone, layers, meta=meta)
    save_adapters(out, config, adapters)
    print(f"train-adapter: loss {history[0]:.4f} -> {history[-1]:.4f} over {epochs} epochs "
          f"({len(samples)} images, features {t1 - t0:.1f} s, training {t2 - t1:.1f} s); wrote {out}")
    if backbone.is_random:
        print("train-adapter: WARNING the backbone has random weights (tests only); these adapters are useless")
    return 0
