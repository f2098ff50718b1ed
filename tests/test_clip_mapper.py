"""CLIP backbone and anomaly mapper on a real open_clip architecture (ViT-S-32).

No CLIP weights can be had on this machine (docs/models.md), so every model here is open_clip's real
ViT-S-32 architecture and BPE tokenizer with RANDOM weights: these tests check shapes, plumbing, caching
and refusal paths, never map quality.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from config.settings import Settings  # noqa: E402
from stream.contracts import ModelLoadError  # noqa: E402
from workers.clip.backbone import (  # noqa: E402
    encode_text,
    encode_tokens,
    load_clip_backbone,
    preprocess,
    project_patches,
)
from workers.clip.mapper import ClipAnomalyMapper, build_clip_mapper  # noqa: E402
from workers.interfaces import AnomalyMapper  # noqa: E402

MODEL = "ViT-S-32"  # 12 blocks, width 384, embed 384, patch 32, native 224 px
SIZE = 320  # not native: a 10 x 10 token grid instead of 7 x 7


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _random_backbone(size, seed=0):
    torch.manual_seed(seed)
    return load_clip_backbone(MODEL, "random", size, allow_random=True)


@pytest.fixture(scope="module")
def backbone():
    """ViT-S-32 with random weights (no CLIP weights exist here), run at 320 px."""
    return _random_backbone(SIZE)


@pytest.fixture(scope="module")
def frame(shared_data):
    import cv2

    path = sorted((shared_data / "hazelnut_toy" / "hazelnut_toy" / "test" / "crack").glob("*.jpg"))[0]
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.resize(img, (417, 301))  # odd, non-square size


def test_positional_grid_is_resized_and_rest_of_the_model_kept(backbone):
    """Random weights (none can be had here). The 320 px backbone has a 10x10 positional grid, keeps the
    class-token position and every other weight of the same (seeded) model at native 224 px."""
    native = _random_backbone(None)
    assert native.image_size == 224 and native.grid_size == 7
    assert backbone.image_size == SIZE and backbone.grid_size == 10
    pos_n = native.model.visual.positional_embedding
    pos_r = backbone.model.visual.positional_embedding
    assert pos_n.shape == (1 + 49, 384) and pos_r.shape == (1 + 100, 384)
    assert torch.equal(pos_r[0], pos_n[0])
    # bilinear resampling keeps the embedding inside the original's value range, and the grids differ
    assert pos_r[1:].min() >= pos_n[1:].min() - 1e-6 and pos_r[1:].max() <= pos_n[1:].max() + 1e-6
    sd_n, sd_r = native.model.state_dict(), backbone.model.state_dict()
    for k, v in sd_n.items():
        if k != "visual.positional_embedding":
            assert torch.equal(v, sd_r[k]), k
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_layer_taps_match_open_clip_intermediates(backbone, frame):
    """Random weights (none can be had here). Taps after blocks 3/6/12 have the configured shapes, differ
    from each other, and equal open_clip's own forward_intermediates; the global embedding equals
    encode_image (normalised). With v-v attention in the last 4 blocks only the taps inside them change."""
    x = preprocess(backbone, [frame, frame[::-1].copy()])
    assert x.shape == (2, 3, SIZE, SIZE)
    layers = (3, 6, 12)
    with torch.no_grad():
        glob, taps = encode_tokens(backbone, x, layers)
        ref = backbone.model.visual.forward_intermediates(x, indices=[2, 5, 11], output_fmt="NLC")
        ref_glob = torch.nn.functional.normalize(backbone.model.encode_image(x), dim=-1)
        glob_vv, taps_vv = encode_tokens(backbone, x, layers, vv_blocks=4)
    assert len(taps) == 3
    for t, r in zip(taps, ref["image_intermediates"], strict=True):
        assert t.shape == (2, 100, 384)
        torch.testing.assert_close(t, r)
    assert not torch.allclose(taps[0], taps[1]) and not torch.allclose(taps[1], taps[2])
    assert glob.shape == (2, 384)
    torch.testing.assert_close(glob, ref_glob)
    torch.testing.assert_close(glob_vv, glob)
    torch.testing.assert_close(taps_vv[0], taps[0])
    torch.testing.assert_close(taps_vv[1], taps[1])
    assert (taps_vv[2] - taps[2]).abs().max() > 1e-3
    assert project_patches(backbone, taps[2]).shape == (2, 100, 384)
    with pytest.raises(ValueError):
        encode_tokens(backbone, x, (13,))


def test_fast_text_path_equals_encode_text(backbone):
    """Random weights (none can be had here). Cutting the padding off causal CLIP text gives the same
    embeddings as open_clip's encode_text."""
    texts = ["a photo of a damaged object.", "flawless screw", "x"]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(backbone.model.encode_text(backbone.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(encode_text(backbone, texts), ref, atol=1e-5, rtol=1e-4)


def test_map_at_frame_size_and_text_encoded_once(backbone, frame):
    """Random weights (none can be had here). The map has the frame's size at a non-native backbone size,
    follows the 0.5 default threshold convention, and the prompt ensemble goes through the text tower once
    across several map() calls (and a calibrated copy)."""
    passes = []
    hook = backbone.model.transformer.register_forward_hook(lambda *a: passes.append(1))  # text tower
    try:
        mapper = ClipAnomalyMapper(backbone, (3, 6, 9, 12), vv_blocks=4, smoothing_sigma=4.0)
        assert isinstance(mapper, AnomalyMapper)
        assert mapper.name == "clip[ViT-S-32:random]"
        first = mapper.map(frame, None)
        second = mapper.map(frame, None)
        other = mapper.map(np.ascontiguousarray(frame[:, ::-1]), None)
        calibrated = mapper.calibrated(pixel_threshold=0.25, image_threshold=2.0)
        third = calibrated.map(frame, None)
    finally:
        hook.remove()
    assert len(passes) == 1 and mapper.text_encodings == 1
    assert first.pixel.shape == frame.shape[:2] and first.pixel.dtype == np.float32
    assert first.raw is not None and first.raw.shape == frame.shape[:2]
    assert 0.0 <= first.raw.min() and first.raw.max() <= 1.0
    np.testing.assert_allclose(first.pixel, first.raw / 0.5, rtol=1e-6)
    np.testing.assert_array_equal(first.pixel, second.pixel)
    assert not np.array_equal(first.raw, other.raw)
    np.testing.assert_allclose(third.pixel, first.raw / 0.25, rtol=1e-6)
    assert third.image_score == pytest.approx(first.image_score * 0.5 / 2.0)
    assert np.isfinite(first.image_score) and first.image_score > 0
    assert first.timings["clip_forward"] > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_local_checkpoint_files_load(tmp_path):
    """Random weights (none can be had here), written to disk the two ways production weights come: an
    open_clip/torch.save state dict, and an OpenAI-style TorchScript archive (read with torch.jit.load,
    QuickGELU forced). Both load into a model with exactly the saved weights."""
    import open_clip

    torch.manual_seed(3)
    src = open_clip.create_model(MODEL, pretrained=None, force_quick_gelu=True).eval()
    state_file = tmp_path / "vits32_state.pt"
    torch.save(src.state_dict(), state_file)
    jit_file = tmp_path / "vits32_openai_style.pt"
    with torch.no_grad():
        traced = torch.jit.trace(src, (torch.zeros(1, 3, 224, 224), open_clip.get_tokenizer(MODEL)(["a"])),
                                 check_trace=False, strict=False)
    traced.save(str(jit_file))
    for path, quick in ((state_file, False), (jit_file, True)):
        bb = load_clip_backbone(MODEL, str(path), 256)
        assert bb.weights == str(path.resolve()) and bb.label == f"{MODEL}:{path.name}" and not bb.is_random
        assert bb.image_size == 256 and bb.grid_size == 8
        loaded = bb.model.state_dict()
        for k, v in src.state_dict().items():
            if k != "visual.positional_embedding":
                assert torch.equal(v, loaded[k]), (path.name, k)
        act = type(bb.model.visual.transformer.resblocks[0].mlp.gelu).__name__
        assert (act == "QuickGELU") == quick


def test_build_from_settings_and_refusals(monkeypatch):
    """Random weights (none can be had here) only where allowed; a configured tag that cannot be
    downloaded, a missing checkpoint path, and "random" without allow_random_weights all raise
    ModelLoadError, so no verdicts come from random weights."""
    import huggingface_hub.constants

    base = {"clip.model": MODEL, "clip.image_size": 224, "clip.layers": [6, 12], "clip.vv_blocks": 2}
    ok = build_clip_mapper(Settings.load(overrides=base | {"clip.pretrained": "random",
                                                          "clip.allow_random_weights": True}).clip)
    assert ok.layers == (6, 12) and ok.vv_blocks == 2 and ok.backbone.is_random

    with pytest.raises(ModelLoadError, match="tests only"):
        build_clip_mapper(Settings.load(overrides=base | {"clip.pretrained": "random"}).clip)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip_backbone(MODEL, "/nonexistent/clip-weights.pt", None)
    with pytest.raises(ModelLoadError, match="layers"):
        build_clip_mapper(Settings.load(overrides=base | {"clip.pretrained": "random", "clip.layers": [6, 24],
                                                          "clip.allow_random_weights": True}).clip)
    # ViT-B-32 has an "openai" tag; the hub cannot be reached here. Offline mode makes the client fail at
    # once instead of after its network retries (about a minute); the failure path is the same.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    settings = Settings.load(overrides={"clip.model": "ViT-B-32", "clip.pretrained": "openai"})
    with pytest.raises(ModelLoadError, match="no CLIP weights for ViT-B-32.*clip.pretrained"):
        build_clip_mapper(settings.clip)
