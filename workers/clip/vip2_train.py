"""``lineinspect train-prompts DATASET --out FILE``: train the ViP² prompt head (ICA + FGP) on an auxiliary set.

The auxiliary set has the MVTec layout (``test/<defect>/*.png`` with ``ground_truth/<defect>/<stem>_mask.png``,
``test/good`` and ``train/good``); DATASET is one category folder or a folder of categories. CLIP stays
frozen and bit-identical: the image side (global embedding and the projected patch tokens of every tapped
layer) is computed once and cached, then only the prompt head is trained; the gradients reach the ICA through
the frozen text encoder. Loss per tapped layer: focal + dice(abnormal, mask) + dice(normal, 1 - mask), plus a
2-way cross-entropy on the image score (top-K patches). Adam with separate learning rates for ICA and FGP.

Output: ``--out`` (see :func:`workers.clip.vip2.save_prompts`) and a JSON-lines loss log next to it
(``<out>.loss.jsonl``, or ``--log``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.contracts import ModelLoadError
from workers.imageio import read_image

if TYPE_CHECKING:
    from config.settings import ClipSettings, Settings

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULTS = {"epochs": 10, "batch": 8, "seed": 0, "lr_ica": 1e-3, "lr_fgp": 1e-5, "max_images": 0,
            "n_ctx": 7, "slots": 3, "heads": 8, "top_k": 50}


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None  # None: a good image (empty mask)
    label: int  # 0 good, 1 defective


@dataclass(frozen=True)
class FeatureCache:
    """The frozen image side of every training image, computed once."""

    global_emb: Any  # torch float32 [M, D], normalised
    patches: Any  # torch float16 [M, L, N, D], normalised per token
    masks: Any  # torch uint8 [M, S, S] at the model input size
    labels: Any  # torch long [M]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ------------------------------------------------------------------------------------------- data


def _category_dirs(root: Path) -> list[Path]:
    if (root / "test").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
    if not found:
        found = sorted(q for p in root.iterdir() if p.is_dir() for q in p.iterdir()
                       if q.is_dir() and (q / "test").is_dir())
    return found


def discover_samples(dataset: str | Path, max_images: int = 0, seed: int = 0) -> list[Sample]:
    """Defective test images (with masks) and good images (test/good, train/good) of an MVTec-layout set.

    With ``max_images`` > 0 a seeded random subset keeps the defect/good proportion (at least one of each
    when both exist).
    """
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"train-prompts: dataset folder not found: {root}")
    cats = _category_dirs(root)
    if not cats:
        raise FileNotFoundError(f"train-prompts: no MVTec-layout category (a folder with test/) under {root}")
    bad: list[Sample] = []
    good: list[Sample] = []
    for cat in cats:
        for defect_dir in sorted(p for p in (cat / "test").iterdir() if p.is_dir()):
            for img in sorted(defect_dir.iterdir()):
                if img.suffix.lower() not in IMAGE_EXTS:
                    continue
                if defect_dir.name == "good":
                    good.append(Sample(img, None, 0))
                    continue
                mask = cat / "ground_truth" / defect_dir.name / f"{img.stem}_mask.png"
                if not mask.is_file():
                    log.warning("train-prompts: no mask for %s, skipped", img)
                    continue
                bad.append(Sample(img, mask, 1))
        train_good = cat / "train" / "good"
        if train_good.is_dir():
            good.extend(Sample(p, None, 0) for p in sorted(train_good.iterdir()) if p.suffix.lower() in IMAGE_EXTS)
    if max_images and len(bad) + len(good) > max_images:
        rng = random.Random(seed)
        n_bad = round(max_images * len(bad) / (len(bad) + len(good)))
        n_bad = min(len(bad), max(1 if bad else 0, min(n_bad, max_images - (1 if good else 0))))
        bad = rng.sample(bad, n_bad)
        good = rng.sample(good, min(len(good), max_images - n_bad))
    samples = bad + good
    if not samples:
        raise FileNotFoundError(f"train-prompts: no images found under {root}")
    return samples


def _read_mask(sample: Sample, size: int, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    if sample.mask is None:
        return np.zeros((size, size), np.uint8)
    m = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise OSError(f"train-prompts: cannot read mask {sample.mask}")
    if m.shape[:2] != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 127).astype(np.uint8)


def build_cache(backbone: Any, samples: Sequence[Sample], layers: Sequence[int], batch: int = 8,
                progress: bool = True) -> FeatureCache:
    """Run the frozen image side once over ``samples``; patches are stored as float16 to save memory."""
    import torch
    from tqdm import tqdm

    from workers.clip.vip2 import extract_features

    size = int(backbone.image_size)
    globals_, patches, masks = [], [], []
    chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    for chunk in tqdm(chunks, desc="caching CLIP features", unit="batch", disable=not progress, file=sys.stderr):
        images = [read_image(s.image) for s in chunk]
        g, p = extract_features(backbone, images, layers)
        globals_.append(g.cpu())
        patches.append(torch.stack(p, dim=1).cpu().half())
        masks.extend(torch.from_numpy(_read_mask(s, size, img.shape[:2])) for s, img in zip(chunk, images, strict=True))
    return FeatureCache(global_emb=torch.cat(globals_), patches=torch.cat(patches), masks=torch.stack(masks),
                        labels=torch.tensor([s.label for s in samples], dtype=torch.long))


# ------------------------------------------------------------------------------------------- loss


def focal_loss(probs: Any, target: Any, gamma: float = 2.0) -> Any:
    """Focal loss on softmax probabilities ``[B, 2, H, W]`` against a 0/1 mask ``[B, H, W]``."""
    import torch

    pt = torch.where(target.bool(), probs[:, 1], probs[:, 0]).clamp_min(1e-6)
    return (-(1.0 - pt) ** gamma * pt.log()).mean()


def dice_loss(pred: Any, target: Any, eps: float = 1.0) -> Any:
    """1 - soft Dice over the whole batch; ``pred`` and ``target`` ``[B, H, W]`` in [0, 1]."""
    inter = (pred * target).sum()
    return 1.0 - (2.0 * inter + eps) / (pred.sum() + target.sum() + eps)


def batch_loss(head: Any, model: Any, global_emb: Any, patches: Any, masks: Any, labels: Any,
               top_k: int = DEFAULTS["top_k"]) -> tuple[Any, dict[str, float]]:
    """The training loss of one batch. ``patches`` ``[B, L, N, D]`` float, ``masks`` ``[B, S, S]`` float."""
    import torch.nn.functional as F

    from workers.clip.vip2 import image_logits, upsampled_probabilities

    layers = [patches[:, i] for i in range(patches.shape[1])]
    cos = head(model, global_emb, layers)  # [L, B, N, 2]
    probs = upsampled_probabilities(cos, masks.shape[-1])  # [L, B, 2, S, S]
    focal = dice = 0.0
    for p in probs:
        focal = focal + focal_loss(p, masks)
        dice = dice + dice_loss(p[:, 1], masks) + dice_loss(p[:, 0], 1.0 - masks)
    ce = F.cross_entropy(image_logits(cos, top_k), labels)
    total = focal + dice + ce
    return total, {"loss": float(total.detach()), "focal": float(focal.detach()), "dice": float(dice.detach()),
                   "image_ce": float(ce.detach())}


# ------------------------------------------------------------------------------------------ train


def train_head(head: Any, backbone: Any, cache: FeatureCache, *, epochs: int = 10, batch: int = 8, seed: int = 0,
               lr_ica: float = 1e-3, lr_fgp: float = 1e-5, top_k: int = 50, log_file: Any = None,
               progress: bool = True) -> list[float]:
    """Train ``head`` in place on ``cache``; returns the mean loss of each epoch.

    Only the head's parameters are optimised (Adam, ``lr_ica`` for ICA, ``lr_fgp`` for FGP); the CLIP model
    is run in eval mode with frozen weights. One JSON line per step (and per epoch) goes to ``log_file``.
    """
    import torch
    from tqdm import tqdm

    model = backbone.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    groups = head.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["ica"], "lr": lr_ica}, {"params": groups["fgp"], "lr": lr_fgp}])
    device = next(head.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = len(cache)
    history: list[float] = []
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        steps = [order[i:i + batch] for i in range(0, n, batch)]
        losses: list[float] = []
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", disable=not progress, file=sys.stderr)
        for step, idx in enumerate(bar):
            g = cache.global_emb[idx].to(device)
            pt = cache.patches[idx].to(device).float()
            m = cache.masks[idx].to(device).float()
            y = cache.labels[idx].to(device)
            loss, parts = batch_loss(head, model, g, pt, m, y, top_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(parts["loss"])
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if log_file is not None:
                log_file.write(json.dumps({"event": "step", "epoch": epoch + 1, "step": step + 1,
                                           "batch": int(idx.numel()), **parts}) + "\n")
        mean = float(np.mean(losses))
        history.append(mean)
        if log_file is not None:
            log_file.write(json.dumps({"event": "epoch", "epoch": epoch + 1, "mean_loss": mean}) + "\n")
            log_file.flush()
        log.info("train-prompts: epoch %d/%d mean loss %.4f", epoch + 1, epochs, mean)
    head.eval()
    return history


def _arg(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return DEFAULTS[name] if value is None else value


def main(settings: Settings, args: argparse.Namespace) -> int:
    """Entry point of ``lineinspect train-prompts``. Uses ``settings.clip`` (model, pretrained, image_size,
    layers, device, allow_random_weights). Returns 0 on success, 2 on bad input or unloadable weights."""
    import torch

    from workers.clip.vip2 import new_head, save_prompts

    out = Path(args.out)
    log_path = Path(getattr(args, "log", None) or out.with_name(out.name + ".loss.jsonl"))
    epochs, batch, seed = int(_arg(args, "epochs")), int(_arg(args, "batch")), int(_arg(args, "seed"))
    if epochs < 1 or batch < 1:
        print("train-prompts: --epochs and --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        samples, backbone, config = _inputs(settings.clip, args, seed)
    except (FileNotFoundError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (ModelLoadError, ValueError) as exc:
        print(f"train-prompts: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    n_bad = sum(s.label for s in samples)
    print(f"train-prompts: {len(samples)} images ({n_bad} defective, {len(samples) - n_bad} good) from "
          f"{args.dataset}; backbone {backbone.label} at {backbone.image_size} px, layers {list(config.layers)}",
          file=sys.stderr)
    n_tokens = int(backbone.grid_size) ** 2
    cache_gb = len(samples) * (len(config.layers) * n_tokens * config.embed_dim * 2
                               + int(backbone.image_size) ** 2) / 1e9
    print(f"train-prompts: feature cache about {cache_gb:.2f} GB in memory (limit it with --max-images)",
          file=sys.stderr)
    t0 = time.perf_counter()
    cache = build_cache(backbone, samples, config.layers, batch=batch)
    t_cache = time.perf_counter() - t0
    head = new_head(backbone, config, seed=seed)
    n_params = sum(p.numel() for p in head.parameters())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as fh:
        fh.write(json.dumps({"event": "start", "config": json.loads(config.to_json()), "images": len(samples),
                             "defective": n_bad, "trainable_parameters": n_params, "epochs": epochs,
                             "batch": batch, "seed": seed, "lr_ica": float(_arg(args, "lr_ica")),
                             "lr_fgp": float(_arg(args, "lr_fgp")), "cache_s": t_cache}) + "\n")
        history = train_head(head, backbone, cache, epochs=epochs, batch=batch, seed=seed,
                             lr_ica=float(_arg(args, "lr_ica")), lr_fgp=float(_arg(args, "lr_fgp")),
                             top_k=int(_arg(args, "top_k")), log_file=fh)
        fh.write(json.dumps({"event": "done", "epoch_losses": history,
                             "train_s": time.perf_counter() - t0}) + "\n")
    save_prompts(head, out)
    print(f"train-prompts: wrote {out} ({n_params} trainable parameters; loss {history[0]:.4f} -> "
          f"{history[-1]:.4f}); log {log_path}", file=sys.stderr)
    return 0


def _inputs(cs: ClipSettings, args: argparse.Namespace, seed: int) -> tuple[list[Sample], Any, Any]:
    """The training samples, the frozen backbone of ``settings.clip`` and the head's configuration."""
    from workers.clip.backbone import load_clip_backbone
    from workers.clip.vip2 import config_for

    samples = discover_samples(args.dataset, int(_arg(args, "max_images")), seed)
    backbone = load_clip_backbone(cs.model, cs.pretrained, cs.image_size, device=cs.device,
                                  allow_random=cs.allow_random_weights)
    config = config_for(backbone, cs.layers, n_ctx=int(_arg(args, "n_ctx")), n_slots=int(_arg(args, "slots")),
                        heads=int(_arg(args, "heads")))
    return samples, backbone, config
