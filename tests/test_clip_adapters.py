"""Per-layer linear CLIP adapters: training on real MVTec-layout data, the file format, save/load.

No CLIP weights can be had on this machine (docs/models.md): the backbone is open_clip's real ViT-S-32
architecture with RANDOM weights. Training must still lower the loss on the real masks (the adapters are
linear maps on fixed features), and a saved file must reproduce the maps exactly.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from config.settings import Settings  # noqa: E402
from stream.contracts import ModelLoadError  # noqa: E402
from workers.clip.adapters import (  # noqa: E402
    AdapterConfig,
    check_compatible,
    load_adapters,
    save_adapters,
)
from workers.clip.backbone import load_clip_backbone  # noqa: E402
from workers.clip.mapper import ClipAnomalyMapper, build_clip_mapper  # noqa: E402
from workers.clip.train import cache_features, find_samples, main, train_adapters  # noqa: E402

MODEL = "ViT-S-32"
LAYERS = (3, 6, 9, 12)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def dataset(shared_data):
    return shared_data / "hazelnut_toy"


@pytest.fixture(scope="module")
def backbone():
    """ViT-S-32 with random weights (no CLIP weights exist here) at its native 224 px."""
    torch.manual_seed(0)
    return load_clip_backbone(MODEL, "random", 224, allow_random=True)


def _settings(**extra):
    return Settings.load(overrides={"clip.model": MODEL, "clip.pretrained": "random",
                                    "clip.allow_random_weights": True, "clip.image_size": 224,
                                    "clip.layers": list(LAYERS), **extra})


def test_find_samples_balanced_with_masks(dataset):
    """The auxiliary set: defect images paired with their masks, good images without, round robin."""
    samples = find_samples(dataset, max_images=6)
    assert len(samples) == 6
    kinds = {s.kind for s in samples}
    assert {"colour", "crack", "good"} <= kinds
    for s in samples:
        assert (s.mask is None) == (s.kind == "good")
        if s.mask is not None:
            assert s.mask.name == f"{s.image.stem}_mask.png" and s.mask.is_file()


def test_train_adapter_cli_lowers_loss_and_writes_a_safe_file(dataset, tmp_path):
    """Random weights (none can be had here). ``train-adapter`` on 8 real images lowers the focal+dice
    loss, and the file holds only tensors and a JSON string (loads with weights_only=True)."""
    out = tmp_path / "adapters.pt"
    args = argparse.Namespace(dataset=str(dataset), out=str(out), epochs=6, batch=4, lr=1e-3, seed=0,
                              max_images=8, quiet=True)
    assert main(_settings(), args) == 0
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert set(blob) == {"config", "state"} and isinstance(blob["config"], str)
    assert all(isinstance(v, torch.Tensor) for v in blob["state"].values())
    config, adapters = load_adapters(out)
    assert config.model == MODEL and config.layers == LAYERS and config.image_size == 224
    assert [tuple(a.weight.shape) for a in adapters] == [(384, 384)] * 4
    history = config.meta["loss_history"]
    assert len(history) == 6 and history[-1] < 0.97 * history[0]
    assert config.meta["images"] == 8 and config.meta["weights"] == "random (tests only)"


def test_saved_adapters_reproduce_maps(backbone, dataset, tmp_path, shared_data):
    """Random weights (none can be had here). Adapters trained in memory and the same adapters saved and
    loaded again give identical maps; the adapted map differs from the zero-shot one; build_clip_mapper
    picks the file up from settings."""
    import cv2

    samples = find_samples(dataset, max_images=4)
    text = ClipAnomalyMapper(backbone, LAYERS).text_features()
    feats, masks = cache_features(backbone, samples, LAYERS, 224, progress=False)
    trained, history = train_adapters(backbone, text, feats, masks, LAYERS, epochs=2, batch_size=2,
                                      progress=False)
    path = save_adapters(tmp_path / "a.pt", AdapterConfig.for_backbone(backbone, LAYERS), trained)
    config, loaded = load_adapters(path)
    check_compatible(config, backbone, path)

    img = cv2.imread(str(samples[0].image), cv2.IMREAD_COLOR)
    a = ClipAnomalyMapper(backbone, LAYERS, adapters=trained).map(img, None)
    b = ClipAnomalyMapper(backbone, config.layers, adapters=loaded).map(img, None)
    zero = ClipAnomalyMapper(backbone, LAYERS).map(img, None)
    np.testing.assert_array_equal(a.pixel, b.pixel)
    assert a.image_score == b.image_score
    assert not np.allclose(a.raw, zero.raw)

    built = build_clip_mapper(_settings(**{"clip.adapters": str(path), "clip.layers": [12]}).clip)
    assert built.layers == LAYERS and built.adapters is not None and built.vv_blocks == 0


def test_bad_adapter_files_are_refused(backbone, tmp_path):
    """A pickled object inside the file, a file for another backbone, and a missing file: ModelLoadError."""
    from workers.clip.adapters import new_adapters

    config = AdapterConfig.for_backbone(backbone, LAYERS)
    adapters = new_adapters(config, seed=1)
    evil = tmp_path / "evil.pt"
    torch.save({"config": config.to_json(), "state": adapters.state_dict(), "extra": argparse.Namespace(a=1)},
               evil)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_adapters(evil)
    other = AdapterConfig(model="ViT-B-32", layers=LAYERS, image_size=224, width=768, embed_dim=512)
    with pytest.raises(ModelLoadError, match="trained for ViT-B-32"):
        check_compatible(other, backbone)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapters(tmp_path / "missing.pt")
