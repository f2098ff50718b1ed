"""A frozen open_clip ViT image/text backbone with patch-token taps (stage 1 of the detector).

``load_clip_backbone`` builds an open_clip CLIP model from a pretrained tag ("openai", downloaded through
open_clip's hub code), a local checkpoint file, or random weights (tests only), freezes it and, when the
requested input size differs from the native one, resizes the visual positional embedding bilinearly over
its grid. ``encode_tokens`` runs the visual tower block by block and returns the global image embedding and
the patch tokens after the requested blocks; in the last ``vv_blocks`` blocks it can run a second,
value-value attention path for the patch tokens (training-free maps, see docs/method.md section 1).

torch and open_clip are imported lazily inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.contracts import ModelLoadError

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random (tests only)"
_RANDOM_TAGS = ("random", "none", "")
_INSTALL_HINT = "install it with: pip install 'open_clip_torch==3.3.0' torch torchvision"


@dataclass(frozen=True)
class ClipBackbone:
    model: Any  # open_clip CLIP model (eval, frozen, requires_grad False)
    tokenizer: Any  # open_clip tokenizer
    model_name: str
    weights: str  # "openai" (a tag), a local path, or "random (tests only)"
    image_size: int  # input size used (positional grid resized when != native)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    # per-process caches of derived values (e.g. prompt text embeddings), shared by every user of this backbone
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def patch_size(self) -> int:
        return int(_pair(self.model.visual.patch_size)[0])

    @property
    def grid_size(self) -> int:
        """Side of the square patch-token grid at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def width(self) -> int:
        """Width of the visual transformer's tokens."""
        return int(self.model.visual.transformer.width)

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text space (``proj`` output)."""
        return int(self.model.visual.proj.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM_WEIGHTS

    @property
    def label(self) -> str:
        """Short identifier for results and logs, e.g. ``ViT-L-14-336:openai``."""
        w = "random" if self.is_random else (Path(self.weights).name if _looks_like_path(self.weights)
                                             else self.weights)
        return f"{self.model_name}:{w}"


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _is_torchscript_archive(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _load_torchscript_weights(net: Any, path: Path) -> None:
    """Copy the parameters of a TorchScript CLIP archive (OpenAI layout) into an open_clip model, strictly."""
    import torch

    with warnings.catch_warnings():  # torch marks torch.jit as deprecated; these release files need it
        warnings.simplefilter("ignore", FutureWarning)
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):  # not weights
        state.pop(key, None)
    net.load_state_dict(state, strict=True)


def _import_open_clip():
    try:
        import open_clip
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ModelLoadError(f"open_clip/torch is not importable ({exc}); {_INSTALL_HINT}") from exc
    return open_clip


def load_clip_backbone(model: str, pretrained: str, image_size: int | None, device: str = "cpu",
                       allow_random: bool = False) -> ClipBackbone:
    """Build a frozen open_clip model.

    ``pretrained``: an open_clip pretrained tag of ``model`` (e.g. "openai"; downloaded by open_clip), a
    path to a local checkpoint file, or "random" (only with ``allow_random``; tests). Any failure to get
    real weights raises ModelLoadError, so a worker configured for CLIP stops instead of emitting verdicts.
    ``image_size``: input size; None or the native size keeps the model's grid, another size resizes the
    positional embedding (rounded down to a multiple of the patch size).
    """
    open_clip = _import_open_clip()
    import torch

    if model not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    src = _weights_source(open_clip, model, pretrained, allow_random)
    net = _create_model(open_clip, model, src)
    visual = net.visual
    size, native, grid = _fit_input_size(visual, model, image_size)

    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.to(torch.device(device))

    pcfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(float(m) for m in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(s) for s in pcfg.get("std", open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(model)
    bb = ClipBackbone(model=net, tokenizer=tokenizer, model_name=model, weights=src.weights, image_size=size,
                      mean=mean, std=std, device=str(device))  # type: ignore[arg-type]
    log.info("clip backbone: model %s, weights %s from %s, input %d px (native %d, grid %dx%d), device %s",
             model, src.weights, src.source, size, native, grid, grid, device)
    if bb.is_random:
        log.warning("clip backbone %s has RANDOM weights: its maps mean nothing (tests only)", model)
    return bb


@dataclass
class _WeightsSource:
    """Where a model's weights come from: ``weights`` (reported), ``source`` (in words), ``arg`` (open_clip's
    ``pretrained``), ``kwargs`` of ``create_model`` and, for an OpenAI TorchScript release, its path."""

    weights: str
    source: str
    arg: str | None
    kwargs: dict[str, Any] = field(default_factory=lambda: {"device": "cpu", "weights_only": True})
    jit_path: Path | None = None


def _weights_source(open_clip: Any, model: str, pretrained: str, allow_random: bool) -> _WeightsSource:
    """Random weights (tests), a local checkpoint file or an open_clip pretrained tag; ModelLoadError otherwise."""
    tag = (pretrained or "").strip()
    if tag.lower() in _RANDOM_TAGS:
        if not allow_random:
            raise ModelLoadError(
                f"no CLIP weights for {model}: clip.pretrained={pretrained!r} means random weights, which are "
                "for tests only (set clip.allow_random_weights); configure clip.pretrained to 'openai' or a "
                "local checkpoint path")
        return _WeightsSource(RANDOM_WEIGHTS, "random initialisation (no weights loaded)", None)
    if Path(tag).expanduser().is_file():
        path = Path(tag).expanduser().resolve()
        src = _WeightsSource(str(path), f"local checkpoint {path}", str(path))
        if _is_torchscript_archive(path):
            # OpenAI's original release files (e.g. ViT-L-14-336px.pt) are TorchScript archives (torch.load
            # refuses them with weights_only) of models trained with QuickGELU: read their state dict with
            # torch.jit.load into the open_clip model built below.
            src.kwargs["force_quick_gelu"] = True
            src.source += " (OpenAI TorchScript release, QuickGELU)"
            src.jit_path, src.arg = path, None
        return src
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        if _looks_like_path(tag):
            raise ModelLoadError(
                f"no CLIP weights for {model}: checkpoint file {tag!r} does not exist; configure "
                "clip.pretrained to an existing local checkpoint path")
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ModelLoadError(
            f"no CLIP weights for {model}: {tag!r} is neither a pretrained tag of this model "
            f"(known: {known}) nor an existing file; configure clip.pretrained to a local checkpoint path")
    where = cfg.get("hf_hub") or cfg.get("url") or "the open_clip hub"
    src = _WeightsSource(tag, f"open_clip pretrained tag {tag!r} (download from {where})", tag)
    # OpenAI's weights were trained with QuickGELU; open_clip's tag config says so.
    src.kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    return src


def _create_model(open_clip: Any, model: str, src: _WeightsSource) -> Any:
    """The open_clip model with its weights; only ViT image towers without attentional pooling."""
    try:
        net = open_clip.create_model(model, pretrained=src.arg, **src.kwargs)
        if src.jit_path is not None:
            _load_torchscript_weights(net, src.jit_path)
    except Exception as exc:  # download, file format or shape mismatch: all mean "no usable weights"
        raise ModelLoadError(
            f"no CLIP weights for {model}: loading {src.source} failed: {exc}; configure clip.pretrained to a "
            "local checkpoint path") from exc
    visual = net.visual
    if not all(hasattr(visual, a) for a in ("conv1", "positional_embedding", "transformer", "ln_post", "proj")):
        raise ModelLoadError(f"{model}: only open_clip ViT image towers are supported (got {type(visual).__name__})")
    if getattr(visual, "attn_pool", None) is not None:
        raise ModelLoadError(f"{model}: image towers with attentional pooling are not supported")
    return net


def _fit_input_size(visual: Any, model: str, image_size: int | None) -> tuple[int, int, int]:
    """(input size, native size, grid): the asked size rounded down to the patch size, the positional
    embedding resized when it differs from the native one."""
    native = _pair(visual.image_size)[0]
    patch = _pair(visual.patch_size)[0]
    size = int(image_size) if image_size else native
    grid = size // patch
    if grid < 1:
        raise ModelLoadError(f"{model}: image size {size} is smaller than the patch size {patch}")
    if grid * patch != size:
        log.warning("clip: image size %d is not a multiple of the patch size %d; using %d", size, patch, grid * patch)
        size = grid * patch
    if size != native:
        _resize_positional_embedding(visual, grid)
    return size, native, grid


def _resize_positional_embedding(visual: Any, grid: int) -> None:
    """Bilinear resize of the learned positional embedding over its square grid (class token kept)."""
    import torch
    import torch.nn.functional as F

    pos = visual.positional_embedding.detach()
    old_grid = _pair(visual.grid_size)
    if old_grid[0] * old_grid[1] + 1 != pos.shape[0]:
        raise ModelLoadError(f"positional embedding of {pos.shape[0]} tokens does not match grid {old_grid}")
    cls_pos, patch_pos = pos[:1], pos[1:]
    width = pos.shape[1]
    patch_pos = patch_pos.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, width).to(pos.dtype)
    visual.positional_embedding = torch.nn.Parameter(torch.cat([cls_pos, patch_pos], dim=0),
                                                     requires_grad=False)
    visual.grid_size = (grid, grid)
    patch = _pair(visual.patch_size)[0]
    visual.image_size = (grid * patch, grid * patch)


def preprocess(backbone: ClipBackbone, images_bgr: list[np.ndarray]) -> Any:
    """BGR uint8 frames -> normalised RGB float tensor [B, 3, S, S] (whole frame squashed to S x S, so the
    token grid covers the frame and maps upsample back onto it without cropping)."""
    import cv2
    import torch

    s = backbone.image_size
    out = np.empty((len(images_bgr), s, s, 3), dtype=np.float32)
    for i, img in enumerate(images_bgr):
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        interp = cv2.INTER_AREA if min(img.shape[:2]) > s else cv2.INTER_CUBIC
        rgb = cv2.cvtColor(cv2.resize(img, (s, s), interpolation=interp), cv2.COLOR_BGR2RGB)
        out[i] = rgb.astype(np.float32) / 255.0
    out = (out - np.asarray(backbone.mean, np.float32)) / np.asarray(backbone.std, np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(backbone.device)


def _embed_patches(visual: Any, x: Any) -> Any:
    """Patchify, prepend the class token, add positions, ln_pre: [B, 1 + N, width]."""
    import torch

    h = visual.conv1(x.to(visual.conv1.weight.dtype))
    h = h.flatten(2).transpose(1, 2)  # [B, N, width]
    cls = visual.class_embedding.to(h.dtype).view(1, 1, -1).expand(h.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1)
    pos = visual.positional_embedding.to(h.dtype)
    if pos.shape[0] != h.shape[1]:
        raise ValueError(f"input gives {h.shape[1] - 1} patches but the positional grid has {pos.shape[0] - 1}; "
                         "preprocess the image with the backbone's image_size")
    return visual.ln_pre(h + pos)


def _vv_attention(block: Any, y: Any) -> Any:
    """Value-value self-attention of one block on its normalised input ``y`` [B, T, width] (batch first):
    the block's own value projection is used as query, key and value, then its output projection."""
    import torch.nn.functional as F

    attn = block.attn
    if not hasattr(attn, "in_proj_weight") or attn.in_proj_weight is None:
        raise ValueError("value-value attention needs nn.MultiheadAttention blocks with a packed in_proj")
    width = y.shape[-1]
    heads = attn.num_heads
    w_v = attn.in_proj_weight[2 * width:]
    b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)  # [B, T, width]
    b, t, _ = v.shape
    v = v.view(b, t, heads, width // heads).transpose(1, 2)  # [B, heads, T, d]
    out = F.scaled_dot_product_attention(v, v, v)
    out = out.transpose(1, 2).reshape(b, t, width)
    return attn.out_proj(out)


def _block_with_vv(block: Any, t: Any) -> Any:
    """One residual block on the value-value path: the attention output is replaced by v-v attention,
    layer scale and MLP kept."""
    t = t + block.ls_1(_vv_attention(block, block.ln_1(t)))
    return t + block.ls_2(block.mlp(block.ln_2(t)))


def encode_tokens(backbone: ClipBackbone, x: Any, layers: tuple[int, ...],
                  vv_blocks: int = 0) -> tuple[Any, list[Any]]:
    """Run the image tower on a preprocessed batch ``x`` [B, 3, S, S].

    Returns the L2-normalised global image embedding [B, D] (``ln_post(cls) @ proj`` of the unchanged
    model) and, for each 1-based block index in ``layers``, the patch tokens [B, N, width] after that block
    (before ln_post). With ``vv_blocks`` > 0, a second path starts at the input of block
    ``num_layers - vv_blocks + 1``; in each of those blocks it uses value-value attention instead of q-k
    attention, and taps in that range are read from it (the global embedding keeps the original path).
    """
    import torch.nn.functional as F

    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    n = len(blocks)
    for layer in layers:
        if not 1 <= int(layer) <= n:
            raise ValueError(f"layer {layer} out of range 1..{n} for {backbone.model_name}")
    vv_blocks = max(0, min(int(vv_blocks), n))
    vv_start = n - vv_blocks  # 0-based index of the first v-v block
    batch_first = getattr(visual.transformer, "batch_first", True)
    wanted = {int(layer) for layer in layers}
    taps: dict[int, Any] = {}

    h = _embed_patches(visual, x)
    t = None
    for i, block in enumerate(blocks):
        if i == vv_start and vv_blocks:
            t = h
        if t is not None:
            t = _block_with_vv(block, t)
        if batch_first:
            h = block(h)
        else:
            h = block(h.transpose(0, 1)).transpose(0, 1)
        if (i + 1) in wanted:
            taps[i + 1] = (t if t is not None else h)[:, 1:]
    pooled = h[:, 1:].mean(dim=1) if getattr(visual, "pool_type", "tok") == "avg" else h[:, 0]
    glob = visual.ln_post(pooled) @ visual.proj
    return F.normalize(glob, dim=-1), [taps[int(layer)] for layer in layers]


def project_patches(backbone: ClipBackbone, tokens: Any) -> Any:
    """Patch tokens [B, N, width] -> the joint space [B, N, D] through ln_post and proj (not normalised)."""
    visual = backbone.model.visual
    return visual.ln_post(tokens) @ visual.proj


def encode_text(backbone: ClipBackbone, texts: list[str], chunk: int = 256) -> Any:
    """Tokenise and embed texts with the frozen text tower: L2-normalised float [len(texts), D].

    For open_clip's causal CLIP text tower with end-of-text pooling, the padding after the longest prompt
    cannot influence the pooled token, so the sequence is cut there (same result as ``encode_text``, several
    times faster on CPU). Other text towers go through ``model.encode_text``.
    """
    import torch
    import torch.nn.functional as F

    model = backbone.model
    tokens = backbone.tokenizer(texts)
    fast = (isinstance(getattr(model, "attn_mask", None), torch.Tensor)
            and getattr(model, "text_pool_type", "") == "argmax"
            and hasattr(model, "token_embedding") and hasattr(model, "ln_final"))
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], chunk):
            tok = tokens[start:start + chunk].to(backbone.device)
            if not fast:
                out.append(model.encode_text(tok).float())
                continue
            length = int((tok != 0).sum(dim=1).max())
            tok = tok[:, :length]
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(tok).to(cast) + model.positional_embedding[:length].to(cast)
            x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
            x = model.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), tok.argmax(dim=-1)]
            proj = model.text_projection
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
            out.append(x.float())
    return F.normalize(torch.cat(out), dim=-1)
