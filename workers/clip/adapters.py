"""Per-layer linear adapters: patch tokens of a tapped layer -> the joint image-text space.

One ``Linear(width -> embed_dim)`` per tapped layer, applied to ``ln_post(tokens)`` (the backbone's frozen
final LayerNorm, which puts every layer's tokens on a common scale), trained by ``workers.clip.train``.

File format (``save_adapters`` / ``load_adapters``): ``torch.save`` of a plain dict
``{"config": <JSON string>, "state": {name: tensor}}`` -- tensors and one string, nothing else, loaded with
``torch.load(weights_only=True)``. The JSON config holds format, version, model, layers, image_size, width,
embed_dim, vv_blocks and a free ``meta`` dict (training summary).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream.contracts import ModelLoadError

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "lineinspect.clip-adapters"
ADAPTER_VERSION = 1


@dataclass(frozen=True)
class AdapterConfig:
    model: str
    layers: tuple[int, ...]
    image_size: int
    width: int
    embed_dim: int
    vv_blocks: int = 0  # the v-v path the features were taken with (0: plain q-k attention)
    version: int = ADAPTER_VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = ADAPTER_FORMAT
        d["layers"] = list(self.layers)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        d = json.loads(text)
        if d.pop("format", None) != ADAPTER_FORMAT:
            raise ValueError("not a lineinspect CLIP adapter file")
        if int(d.get("version", 0)) != ADAPTER_VERSION:
            raise ValueError(f"adapter file version {d.get('version')} (this code reads {ADAPTER_VERSION})")
        return cls(model=str(d["model"]), layers=tuple(int(x) for x in d["layers"]),
                   image_size=int(d["image_size"]), width=int(d["width"]), embed_dim=int(d["embed_dim"]),
                   vv_blocks=int(d.get("vv_blocks", 0)), version=int(d["version"]), meta=dict(d.get("meta", {})))

    @classmethod
    def for_backbone(cls, backbone: Any, layers: tuple[int, ...], meta: dict[str, Any] | None = None
                     ) -> AdapterConfig:
        return cls(model=backbone.model_name, layers=tuple(int(x) for x in layers),
                   image_size=backbone.image_size, width=backbone.width, embed_dim=backbone.embed_dim,
                   meta=dict(meta or {}))


def new_adapters(config: AdapterConfig, seed: int | None = None, device: str = "cpu") -> Any:
    """A fresh ``torch.nn.ModuleList`` of one Linear(width -> embed_dim) per layer (PyTorch default init)."""
    import torch

    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed))
    try:
        mods = torch.nn.ModuleList(torch.nn.Linear(config.width, config.embed_dim) for _ in config.layers)
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
    return mods.to(device)


def apply_adapter(backbone: Any, adapter: Any, tokens: Any) -> Any:
    """Patch tokens [B, N, width] of one layer -> adapted features [B, N, D] (not normalised)."""
    return adapter(backbone.model.visual.ln_post(tokens))


def save_adapters(path: str | Path, config: AdapterConfig, adapters: Any) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapters.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": config.to_json(), "state": state}, tmp)
    tmp.replace(path)
    log.info("clip adapters saved to %s (%s, layers %s)", path, config.model, list(config.layers))
    return path


def load_adapters(path: str | Path, device: str = "cpu") -> tuple[AdapterConfig, Any]:
    """Read an adapter file (weights_only) -> (config, ModuleList in eval mode, frozen). ModelLoadError on
    anything missing, malformed or of the wrong shape."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"clip adapters: file {path} does not exist (clip.adapters)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config = AdapterConfig.from_json(blob["config"])
        state = blob["state"]
        adapters = new_adapters(config)
        adapters.load_state_dict(state, strict=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"clip adapters: cannot read {path}: {exc}") from exc
    adapters.eval().to(device)
    for p in adapters.parameters():
        p.requires_grad_(False)
    log.info("clip adapters loaded from %s: model %s, layers %s, trained at %d px", path, config.model,
             list(config.layers), config.image_size)
    return config, adapters


def check_compatible(config: AdapterConfig, backbone: Any, path: str | Path = "") -> None:
    """Raise ModelLoadError when the adapters were trained for another backbone."""
    where = f" ({path})" if path else ""
    if config.model != backbone.model_name or config.width != backbone.width \
            or config.embed_dim != backbone.embed_dim:
        raise ModelLoadError(
            f"clip adapters{where} were trained for {config.model} (width {config.width}, dim "
            f"{config.embed_dim}), not {backbone.model_name} (width {backbone.width}, dim {backbone.embed_dim})")
    if max(config.layers) > backbone.num_layers:
        raise ModelLoadError(f"clip adapters{where}: layer {max(config.layers)} > {backbone.num_layers} blocks")
    if config.image_size != backbone.image_size:
        log.warning("clip adapters%s were trained at %d px, the backbone runs at %d px", where,
                    config.image_size, backbone.image_size)
