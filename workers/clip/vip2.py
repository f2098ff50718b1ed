"""ViP²-CLIP: class-name-free, image-conditioned prompts for the CLIP anomaly map.

Three parts on top of a frozen open_clip ViT (see docs: method.md, section 1b):

* **ICA** (image-conditioned adapter, :class:`ImageConditionedPrompts`): two templates without a class name,
  ``[ctx x n_ctx] good [slot x r]`` and ``[ctx x n_ctx] damaged [slot x r]`` (own learnable context per state,
  slots shared). A meta-net maps the image's global embedding (CLS -> ln_post -> proj, normalised, plus a
  learnable bias) to ``r`` slot tokens (one MLP ``D -> D/2 -> token_width`` each); slot ``i`` = learnable
  ``o_i`` + meta-net output ``a_i``. The frozen text encoder runs from these token embeddings
  (:func:`encode_text_embeddings`), giving one normal and one abnormal text embedding *per image*.
* **FGP** (fine-grained perception, :class:`FineGrainedPerception`): one cross-attention shared by the tapped
  layers (query = the two text embeddings, keys/values = the layer's projected patch tokens); its normalised
  output replaces the text embedding for that layer.
* **UTPA** (unified text-patch alignment, :func:`align`, :func:`image_logits`): per layer cosine(patch, text)
  -> softmax over {normal, abnormal} at temperature 0.07 -> abnormal probability per patch; map = mean over
  layers, Gaussian smoothing (sigma 8 at 518 px, scaled); image score from the top-K most abnormal patches
  over all layers (mean of their cosine pairs / 0.07, softmax), not from the class token.

The trainable weights (ICA + FGP) are made by ``lineinspect train-prompts`` (:mod:`workers.clip.vip2_train`)
and stored with the configuration that made them (:func:`save_prompts` / :func:`load_prompts`); a file made
for another backbone or layout is refused with the setting that differs.

The mapper that runs them on frames is :mod:`workers.clip.vip2_mapper`. This module needs torch (and open_clip
through :mod:`workers.clip.backbone`); it is imported lazily, only when ``clip.prompt_mode == "vip2"`` or
for training.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stream.contracts import ModelLoadError

try:
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "workers.clip.vip2 needs torch and open_clip: pip install torch open_clip_torch") from exc

FILE_VERSION = 1
TEMPERATURE = 0.07
NORMAL_WORD = "good"
ABNORMAL_WORD = "damaged"
PLACEHOLDER = "X"
REFERENCE_SIZE = 518  # sigma of the map smoothing is given at this input size
DEFAULT_SIGMA = 8.0
DEFAULT_TOP_K = 50
DEFAULT_THRESHOLD = 0.5  # raw threshold on the abnormal probability (pixel and image)


class PromptFileError(ModelLoadError):
    """A ViP² prompt file is missing, unreadable or made for another backbone/layout.

    ``setting`` names the differing setting (e.g. ``clip.model``) when the file does not match.
    """

    def __init__(self, message: str, setting: str = ""):
        super().__init__(message)
        self.setting = setting


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Vip2Config:
    """What a prompt file was made for; stored inside the file as JSON."""

    model: str
    weights: str
    image_size: int
    layers: tuple[int, ...]
    embed_dim: int
    token_width: int
    n_ctx: int = 7
    n_slots: int = 3
    heads: int = 8
    normal_word: str = NORMAL_WORD
    abnormal_word: str = ABNORMAL_WORD
    version: int = FILE_VERSION

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.n_slots < 1 or self.heads < 1:
            raise ValueError(f"vip2: n_ctx, n_slots and heads must be >= 1 (got {self.n_ctx}, "
                             f"{self.n_slots}, {self.heads})")
        if self.embed_dim % self.heads:
            raise ValueError(f"vip2: embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if not self.layers:
            raise ValueError("vip2: at least one layer tap is needed")

    def to_json(self) -> str:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Vip2Config:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        data["layers"] = tuple(int(v) for v in data["layers"])
        return cls(**data)


# Which setting each checked config field corresponds to, for error messages.
_CHECKED = (
    ("version", "file version"),
    ("model", "clip.model"),
    ("weights", "clip.pretrained"),
    ("image_size", "clip.image_size"),
    ("layers", "clip.layers"),
    ("embed_dim", "embedding width of the backbone"),
    ("token_width", "text token width of the backbone"),
)


def weights_id(backbone: Any) -> str:
    """A machine-independent name of the backbone's weights: the tag ("openai"), a local checkpoint's file
    name, or "random"."""
    return str(backbone.label)[len(backbone.model_name) + 1:]


def config_for(backbone: Any, layers: Sequence[int], *, n_ctx: int = 7, n_slots: int = 3,
               heads: int = 8) -> Vip2Config:
    """The configuration of a new ViP² head on ``backbone`` (a :class:`workers.clip.backbone.ClipBackbone`)."""
    model = backbone.model
    depth = int(backbone.num_layers)
    bad = [int(v) for v in layers if not 1 <= int(v) <= depth]
    if bad or not layers:
        raise ModelLoadError(f"clip.layers {list(layers)}: {bad or 'empty'} outside 1..{depth} for "
                             f"{backbone.model_name}")
    return Vip2Config(
        model=backbone.model_name, weights=weights_id(backbone), image_size=int(backbone.image_size),
        layers=tuple(int(v) for v in layers), embed_dim=_embed_dim(model),
        token_width=int(model.token_embedding.weight.shape[1]), n_ctx=n_ctx, n_slots=n_slots, heads=heads)


def default_layers(backbone: Any, n_taps: int = 4) -> tuple[int, ...]:
    """Evenly spaced block taps ending at the last block (6/12/18/24 for a 24-block ViT), 1-based."""
    depth = int(backbone.num_layers)
    n = max(1, min(n_taps, depth))
    return tuple(sorted({round(depth * (i + 1) / n) for i in range(n)}))


def _embed_dim(model: Any) -> int:
    proj = model.text_projection
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    return int(proj.shape[1])


def _check_text_tower(model: Any) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [n for n in needed if getattr(model, n, None) is None]
    if missing:
        raise ModelLoadError(
            f"vip2: this open_clip model has no built-in CLIP text tower (missing {', '.join(missing)}); "
            "ViP² prompts need a CLIP-class model such as ViT-L-14-336 or ViT-B-32")


# ---------------------------------------------------------------------------------------------- ICA


def encode_text_embeddings(model: Any, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP text encoder run from token embeddings ``[N, L, W]`` -> text embeddings ``[N, D]``.

    token embeddings + positional embedding -> transformer (causal mask) -> ln_final -> the EOT position ->
    text_projection. Gradients flow through it (to the prompt tokens) although its weights are frozen.

    With the causal mask, nothing after the last EOT position can change the EOT outputs, so the sequence
    is cut there (ViP² prompts use ~14 of the 77 positions): the same result for a fraction of the work.
    """
    cast = model.transformer.get_cast_dtype()
    mask = model.attn_mask
    length = int(eot_positions.max()) + 1
    pos = model.positional_embedding
    x = embeddings[:, :length].to(cast) + pos[:length].to(cast)
    if mask is not None:
        mask = mask[:length, :length]
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_positions]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class ImageConditionedPrompts(nn.Module):
    """ICA: learnable contexts + the state word + image-conditioned slot tokens, as token embeddings.

    The template token embeddings (start, state word, end, padding) are copied from the frozen CLIP token
    embedding at construction and kept as non-persistent buffers: the state dict holds only what is trained.
    """

    def __init__(self, model: Any, tokenizer: Any, config: Vip2Config):
        super().__init__()
        _check_text_tower(model)
        width = config.token_width
        dim = config.embed_dim
        self.n_ctx = config.n_ctx
        self.n_slots = config.n_slots
        # index 0 = normal, 1 = abnormal
        self.ctx = nn.Parameter(torch.randn(2, config.n_ctx, width) * 0.02)
        self.slot_base = nn.Parameter(torch.randn(config.n_slots, width) * 0.02)
        self.meta_bias = nn.Parameter(torch.zeros(dim))
        self.meta_nets = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(inplace=True), nn.Linear(dim // 2, width))
            for _ in range(config.n_slots))

        placeholder_id = _single_token(tokenizer, PLACEHOLDER)
        ids, spans = [], []
        for word in (config.normal_word, config.abnormal_word):
            word_len = len(_word_tokens(tokenizer, word))
            text = " ".join([PLACEHOLDER] * config.n_ctx + [word] + [PLACEHOLDER] * config.n_slots) + "."
            row = tokenizer([text])[0].long()
            start = 1 + config.n_ctx
            end = start + word_len
            expected_ph = list(range(1, start)) + list(range(end, end + config.n_slots))
            if any(int(row[i]) != placeholder_id for i in expected_ph):
                raise ModelLoadError(f"vip2: unexpected tokenisation of the template {text!r}")
            ids.append(row)
            spans.append((start, end))
        token_ids = torch.stack(ids)
        self.spans = tuple(spans)
        device = model.token_embedding.weight.device
        with torch.no_grad():
            template = model.token_embedding(token_ids.to(device)).detach().clone()
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)
        self.register_buffer("template", template, persistent=False)
        # CLIP's EOT token has the highest id of the vocabulary: its position is the argmax.
        self.register_buffer("eot_positions", token_ids.argmax(dim=-1).to(device), persistent=False)

    def slot_tokens(self, global_emb: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` normalised global embeddings -> ``[B, r, W]`` slot tokens ``o_i + a_i``."""
        g = global_emb + self.meta_bias
        a = torch.stack([net(g) for net in self.meta_nets], dim=1)
        return self.slot_base.unsqueeze(0) + a

    def forward(self, global_emb: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` -> prompt token embeddings ``[B, 2, L, W]`` (normal, abnormal)."""
        b = global_emb.shape[0]
        slots = self.slot_tokens(global_emb)
        rows = []
        for k, (start, end) in enumerate(self.spans):
            t = self.template[k]
            w = t.shape[-1]
            rows.append(torch.cat([
                t[:1].expand(b, 1, w),
                self.ctx[k].unsqueeze(0).expand(b, -1, -1),
                t[start:end].expand(b, end - start, w),
                slots,
                t[end + self.n_slots:].expand(b, -1, w),
            ], dim=1))
        return torch.stack(rows, dim=1)


def _word_tokens(tokenizer: Any, word: str) -> list[int]:
    row = tokenizer([word])[0].long()
    eot = int(row.argmax())
    return [int(v) for v in row[1:eot]]


def _single_token(tokenizer: Any, word: str) -> int:
    toks = _word_tokens(tokenizer, word)
    if len(toks) != 1:
        raise ModelLoadError(f"vip2: placeholder {word!r} is not a single token for this tokenizer")
    return toks[0]


# ---------------------------------------------------------------------------------------------- FGP


class FineGrainedPerception(nn.Module):
    """FGP: text embeddings attend to a layer's patch tokens; one module shared by all tapped layers."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``text [B, 2, D]``, ``patches [B, N, D]`` -> per-layer text embeddings ``[B, 2, D]``, normalised."""
        out, _ = self.attn(text, patches, patches, need_weights=False)
        return F.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------- head


class Vip2Head(nn.Module):
    """The trainable part (ICA + FGP). CLIP is passed in, never registered as a submodule."""

    def __init__(self, model: Any, tokenizer: Any, config: Vip2Config):
        super().__init__()
        self.config = config
        self.ica = ImageConditionedPrompts(model, tokenizer, config)
        self.fgp = FineGrainedPerception(config.embed_dim, config.heads)

    def text_embeddings(self, model: Any, global_emb: torch.Tensor) -> torch.Tensor:
        """One normal and one abnormal text embedding per image, ``[B, 2, D]`` normalised.

        The text encoder runs once for the whole batch (2 prompts per image).
        """
        emb = self.ica(global_emb)
        b, two, length, width = emb.shape
        eot = self.ica.eot_positions.repeat(b)
        text = encode_text_embeddings(model, emb.reshape(b * two, length, width), eot)
        return F.normalize(text.reshape(b, two, -1).float(), dim=-1)

    def forward(self, model: Any, global_emb: torch.Tensor,
                patches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cosine pairs ``[L, B, N, 2]`` of each layer's (normalised) patches with its FGP text embeddings."""
        text = self.text_embeddings(model, global_emb)
        cos = []
        for p in patches:
            layer_text = self.fgp(text, p)
            cos.append(torch.einsum("bnd,bkd->bnk", p, layer_text))
        return torch.stack(cos)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"ica": list(self.ica.parameters()), "fgp": list(self.fgp.parameters())}


def new_head(backbone: Any, config: Vip2Config, seed: int | None = 0) -> Vip2Head:
    """A freshly initialised head (random ICA/FGP weights) for ``backbone``."""
    if seed is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        head = Vip2Head(backbone.model, backbone.tokenizer, config)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
    return head.to(next(backbone.model.parameters()).device)


# --------------------------------------------------------------------------------------------- UTPA


def patch_probabilities(cos: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """``[..., 2]`` cosine pairs -> softmax over {normal, abnormal} at ``temperature`` -> ``[..., 2]``."""
    return torch.softmax(cos / temperature, dim=-1)


def image_logits(cos: torch.Tensor, top_k: int = DEFAULT_TOP_K, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Image-level logits ``[B, 2]`` from the ``top_k`` most abnormal patches over all layers.

    ``cos`` is ``[L, B, N, 2]``; the patches are ranked by their abnormal probability (monotone in
    ``cos_abnormal - cos_normal``), their raw cosine pairs averaged and divided by the temperature.
    """
    n_layers, b, n, _ = cos.shape
    flat = cos.permute(1, 0, 2, 3).reshape(b, n_layers * n, 2)
    k = max(1, min(top_k, n_layers * n))
    idx = (flat[..., 1] - flat[..., 0]).topk(k, dim=1).indices
    chosen = torch.gather(flat, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    return chosen.mean(dim=1) / temperature


def grid_maps(cos: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Per-layer abnormal probability grids ``[L, B, h, w]`` (square token grid)."""
    n_layers, b, n, _ = cos.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"vip2: {n} patch tokens do not form a square grid")
    return patch_probabilities(cos, temperature)[..., 1].reshape(n_layers, b, side, side)


def upsampled_probabilities(cos: torch.Tensor, size: int, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Per-layer {normal, abnormal} probabilities bilinearly upsampled to ``size``: ``[L, B, 2, S, S]``."""
    n_layers, b, n, _ = cos.shape
    side = math.isqrt(n)
    probs = patch_probabilities(cos, temperature).reshape(n_layers * b, side, side, 2).permute(0, 3, 1, 2)
    up = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(n_layers, b, 2, size, size)


def align(head: Vip2Head, model: Any, global_emb: torch.Tensor, patches: Sequence[torch.Tensor],
          top_k: int = DEFAULT_TOP_K, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """UTPA for a batch: (mean-over-layers abnormal grid ``[B, h, w]``, image abnormal probability ``[B]``)."""
    cos = head(model, global_emb, patches)
    grid = grid_maps(cos, temperature).mean(dim=0)
    score = torch.softmax(image_logits(cos, top_k, temperature), dim=-1)[:, 1]
    return grid, score


# ----------------------------------------------------------------------------------------- features


def extract_features(backbone: Any, images_bgr: Sequence[np.ndarray],
                     layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Frozen image side: global embedding ``[B, D]`` (ln_post + proj, normalised) and, per tapped layer,
    the projected patch tokens (ln_post + proj) L2-normalised, ``[B, N, D]``. No V-V attention."""
    from workers.clip.backbone import encode_tokens, preprocess, project_patches

    with torch.no_grad():
        x = preprocess(backbone, list(images_bgr))
        global_emb, tokens = encode_tokens(backbone, x, tuple(layers), vv_blocks=0)
        patches = [F.normalize(project_patches(backbone, t).float(), dim=-1) for t in tokens]
        return F.normalize(global_emb.float(), dim=-1), patches


def smooth_sigma(image_size: int, sigma_at_reference: float = DEFAULT_SIGMA) -> float:
    """Gaussian sigma in map pixels at ``image_size`` for a sigma given at 518 px."""
    return sigma_at_reference * image_size / REFERENCE_SIZE


# ---------------------------------------------------------------------------------------- save/load


def save_prompts(head: Vip2Head, path: str | os.PathLike) -> Path:
    """Write the trained weights and their configuration: ``{"config": json, "state": {name: tensor}}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in head.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": head.config.to_json(), "state": state}, tmp)
    os.replace(tmp, path)
    return path


def read_prompt_file(path: str | os.PathLike) -> tuple[Vip2Config, dict[str, torch.Tensor]]:
    """Read a prompt file (``weights_only=True``: tensors and strings only)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"vip2 prompt file not found: {path} (make one with `lineinspect train-prompts`)",
                              "clip.prompts")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config = Vip2Config.from_json(blob["config"])
        state = dict(blob["state"])
    except Exception as exc:  # noqa: BLE001 - any corruption is reported the same way
        raise PromptFileError(f"vip2 prompt file {path} is not readable: {exc}", "clip.prompts") from exc
    return config, state


def check_config(saved: Vip2Config, expected: Vip2Config, path: str | os.PathLike = "") -> None:
    """Raise :class:`PromptFileError` naming the first setting where ``saved`` differs from ``expected``."""
    for name, setting in _CHECKED:
        a, b = getattr(saved, name), getattr(expected, name)
        if a != b:
            raise PromptFileError(
                f"vip2 prompt file {path} was made for {setting}={a!r}, but this run has {setting}={b!r}; "
                "train prompts for this backbone with `lineinspect train-prompts`", setting)


def load_prompts(path: str | os.PathLike, backbone: Any, layers: Sequence[int] | None = None) -> Vip2Head:
    """Load a prompt file for ``backbone``; ``layers`` (if given) must match the file's layer taps."""
    saved, state = read_prompt_file(path)
    expected = config_for(backbone, saved.layers if layers is None else layers)
    check_config(saved, replace(expected, version=FILE_VERSION), path)
    head = new_head(backbone, saved, seed=None)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PromptFileError(f"vip2 prompt file {path} does not fit its own configuration: {exc}",
                              "clip.prompts") from exc
    head.eval()
    return head
