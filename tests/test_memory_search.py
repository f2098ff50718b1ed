"""Memory searches (workers/memory/search.py) against the exact float32 search, on constructed clustered data
(like patch features: rows near a few hundred centres, spread with a decaying spectrum, unit-normalised).
Speed is not asserted here: ``python -m workers.bench.memory_search`` prints it on real features."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from config.settings import Settings, SettingsError
from workers.interfaces import ImageEmbedding
from workers.memory.cli import describe
from workers.memory.mapper import MemoryMapper
from workers.memory.params import MemoryParams
from workers.memory.search import SearchSpec, exact_knn, make_search

DIM = 96


def clustered(n: int, centres, noise: float, seed: int):
    """Rows around ``centres``; the spread of dimension i is noise / (1 + i / 4) (a decaying spectrum)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    scale = noise / (1 + torch.arange(centres.shape[1]) / 4.0)
    x = centres[pick] + scale * torch.randn(n, centres.shape[1], generator=g)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.fixture(scope="module")
def data():
    import torch

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(200, DIM, generator=g), dim=1)
    memory = clustered(6000, centres, 0.25, 1)
    query = clustered(800, centres, 0.25, 2)
    d = torch.cdist(query.double(), memory.double())
    return query, memory, d


def test_exact_matches_brute_force_indices_and_distances(data):
    query, memory, d = data
    for k in (1, 4):
        d2, idx = make_search(SearchSpec("exact")).reset(memory).search(query, k)
        want_d, want_i = d.topk(k, largest=False)
        assert (idx == want_i).float().mean() == 1.0
        np.testing.assert_allclose(d2.sqrt().numpy(), want_d.numpy(), atol=2e-4)
        d2c, idxc = exact_knn(query, memory, k, chunk=777)  # chunking does not change the answer
        assert (idxc == idx).all()


@pytest.mark.parametrize("spec, min_same", [
    (SearchSpec("bf16", rerank=8), 0.99),
    (SearchSpec("projection", dim=32, rerank=8, basis="pca", scan="float32"), 0.98),
    (SearchSpec("projection", dim=32, rerank=8, basis="pca", scan="bfloat16"), 0.98),
    (SearchSpec("projection", dim=32, rerank=16, basis="random"), 0.95),
    (SearchSpec("ivf", nlist=64, nprobe=8), 0.97),
])
def test_reranked_searches_return_exact_distances_of_the_nearest_neighbour(data, spec, min_same):
    """Tolerance: at least ``min_same`` of the queries get the exact nearest neighbour; every returned
    distance is the exact float32 distance to the returned row (re-ranked, or IVF lists searched exactly),
    so never below the true one."""
    query, memory, d = data
    d2, idx = make_search(spec).reset(memory).search(query, 1)
    want_d, want_i = d.min(1)
    same = (idx[:, 0] == want_i).float().mean().item()
    assert same >= min_same, f"{spec.label()}: {same:.3f} of the nearest neighbours found"
    got = d2[:, 0].sqrt().double()
    np.testing.assert_allclose(got.numpy(), d[torch_arange(len(idx)), idx[:, 0]].numpy(), atol=2e-4)
    assert (got >= want_d - 2e-4).all()


def test_projection_scan_precision_is_resolved_once_and_reported():
    """auto: bfloat16 on a GPU; on a CPU whatever the one-off timing says (cached); an explicit choice stands.
    The search reports the precision it scans in."""
    import torch

    from workers.memory.search import cpu_bf16_pays, scan_dtype

    assert scan_dtype("auto", "cuda") is torch.bfloat16 and scan_dtype("float32", "cuda") is torch.float32
    assert scan_dtype("bfloat16", "cpu") is torch.bfloat16
    pays = cpu_bf16_pays()
    assert cpu_bf16_pays() is pays  # measured once per process
    assert scan_dtype("auto", "cpu") is (torch.bfloat16 if pays else torch.float32)
    memory = torch.nn.functional.normalize(torch.randn(500, 64), dim=1)
    for scan, want in (("float32", "float32"), ("bfloat16", "bfloat16")):
        s = make_search(SearchSpec("projection", dim=16, scan=scan)).reset(memory)
        assert s.describe()["scan"] == want and s.memp.dtype == getattr(torch, want)
        assert ("bfloat16 scan" in s.describe()["index"]) == (want == "bfloat16")
    resolved = make_search(SearchSpec("projection", dim=16)).reset(memory).describe()["index"]
    assert "auto" not in resolved
    assert "bfloat16 scan" in SearchSpec("projection", scan="bfloat16").label()
    with pytest.raises(ValueError, match="scan precision"):
        SearchSpec("projection", scan="fp8")
    with pytest.raises(SettingsError, match="memory.search_scan"):
        Settings().with_overrides(**{"memory.search_scan": "fp8"})


def test_projection_index_bytes_follow_the_scan_precision():
    """The bytes a projection index reports are those of the tensors it holds: the projected rows and their
    squared norms in the scan's precision, the float32 basis; a bfloat16 scan holds about half."""
    import torch

    memory = torch.nn.functional.normalize(torch.randn(500, 64), dim=1)
    for scan in ("float32", "bfloat16"):
        s = make_search(SearchSpec("projection", dim=16, scan=scan)).reset(memory)
        held = sum(int(t.numel()) * t.element_size() for t in (s.memp, s.memp_sq, s.proj))
        assert s.describe()["index_bytes"] == held
    f32 = SearchSpec("projection", dim=16, scan="float32").index_bytes(10_000, 64)
    b16 = SearchSpec("projection", dim=16, scan="bfloat16").index_bytes(10_000, 64)
    assert 0.45 < b16 / f32 < 0.55
    assert SearchSpec("projection", dim=16).index_bytes(10_000, 64) == f32  # auto, unresolved: the upper bound


def torch_arange(n):
    import torch

    return torch.arange(n)


@pytest.mark.parametrize("spec", [SearchSpec("bf16", rerank=8), SearchSpec("projection", dim=32, rerank=16),
                                  SearchSpec("ivf", nlist=64, nprobe=8)])
def test_k_nearest_are_the_exact_k_nearest_for_most_queries(data, spec):
    """k = 3: the returned set equals the exact 3 nearest rows for at least 95 % of the queries."""
    query, memory, d = data
    _, idx = make_search(spec).reset(memory).search(query, 3)
    want = d.topk(3, largest=False).indices
    same = (idx.sort(1).values == want.sort(1).values).all(1).float().mean().item()
    assert same >= 0.95, f"{spec.label()}: {same:.3f}"


def test_bf16_without_rerank_is_within_bfloat16_rounding(data):
    """Tolerance: |d^2 - exact d^2| <= 0.02 for unit rows (bfloat16 keeps 8 mantissa bits of each dot product)."""
    query, memory, d = data
    d2, _ = make_search(SearchSpec("bf16", rerank=0)).reset(memory).search(query, 1)
    err = (d2[:, 0].double() - d.min(1).values ** 2).abs()
    assert err.max() <= 0.02
    assert err.mean() <= 0.005


def test_faiss_ivf_finds_nearest_neighbours():
    pytest.importorskip("faiss", reason="optional: pip install faiss-cpu")
    import torch

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(200, DIM, generator=g), dim=1)
    memory, query = clustered(6000, centres, 0.25, 1), clustered(800, centres, 0.25, 2)
    want = torch.cdist(query, memory).argmin(1)
    d2, idx = make_search(SearchSpec("faiss", nlist=64, nprobe=8)).reset(memory).search(query, 1)
    assert (idx[:, 0] == want).float().mean() >= 0.95
    assert (idx >= 0).all()


@pytest.mark.parametrize("kind", ["exact", "bf16", "projection", "ivf"])
def test_add_equals_building_on_the_concatenation(data, kind):
    import torch

    query, memory, _ = data
    spec = SearchSpec(kind, dim=32, rerank=8)
    grown = make_search(spec).reset(memory[:5000])
    grown.add(memory[5000:])
    assert grown.size == 6000
    full = make_search(spec).reset(memory)
    if kind in ("projection", "ivf"):  # basis / lists fitted on the first rows: compare with exact instead
        _, want = exact_knn(query, memory, 1)
        assert (grown.search(query, 1)[1] == want).float().mean() >= 0.97
    else:
        torch.testing.assert_close(grown.knn_distance(query, 3), full.knn_distance(query, 3))


def test_projection_keeps_its_basis_across_rewrites_of_a_similar_memory(data):
    """A rewrite (compaction, reservoir, reload) of about the same size reuses the fitted basis; a memory of
    another size or width is fitted again. Either way the answers stay those of the exact search."""
    query, memory, d = data
    search = make_search(SearchSpec("projection", dim=32, rerank=8)).reset(memory)
    basis = search.proj
    search.reset(memory[:4000])  # 0.67 x the rows: kept
    assert search.proj is basis and search.memp.shape == (4000, 32)
    _, want = exact_knn(query, memory[:4000], 1)
    assert (search.search(query, 1)[1] == want).float().mean() >= 0.98
    search.reset(memory[:1000])  # < 0.5 x: fitted again
    assert search.proj is not basis
    search.reset(memory[:, :64])
    assert search.proj.shape == (64, 32)


def test_cuda_asked_without_cuda_falls_back_to_cpu_with_a_warning(data, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    query, memory, d = data
    with caplog.at_level(logging.WARNING, logger="workers.memory.search"):
        search = make_search(SearchSpec("bf16", rerank=8, device="cuda")).reset(memory)
    assert search.device == "cpu"
    assert "memory.device=cuda but torch.cuda is not available" in caplog.text
    assert (search.search(query, 1)[1][:, 0] == d.argmin(1)).float().mean() >= 0.99


def test_faiss_missing_names_the_install(monkeypatch):
    from stream.contracts import ModelLoadError

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ModelLoadError, match="pip install faiss-cpu"):
        make_search(SearchSpec("faiss"))


@pytest.mark.parametrize("override, key", [
    ({"memory.search": "hnsw"}, "memory.search"),
    ({"memory.device": "gpu"}, "memory.device"),
    ({"memory.search": "projection", "memory.search_rerank": 0}, "memory.search_rerank"),
    ({"memory.search_dim": 0}, "memory.search_dim"),
    ({"memory.search_basis": "ica"}, "memory.search_basis"),
])
def test_search_settings_are_validated_naming_the_key(override, key):
    with pytest.raises(SettingsError) as err:
        Settings.load(overrides=override)
    assert err.value.key == key


def test_settings_reach_the_mapper_and_memory_show_reports_the_index():
    s = Settings.load(overrides={"memory.search": "projection", "memory.search_dim": 64,
                                 "memory.device": "cuda:1"})
    spec = MemoryParams.from_settings(s.memory).search
    assert (spec.kind, spec.dim, spec.rerank, spec.device) == ("projection", 64, 8, "cuda:1")
    shown = describe(None, "l1", search=spec)
    assert shown["search"] == "projection" and "projection to 64 dims" in shown["index"]


def _embeddings(n: int, seed: int):
    """Constructed SAM-shaped embeddings (64 x 64 grid, 32 channels) of clustered patch features."""
    centres = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    scale = (0.3 / (1 + np.arange(32) / 4.0)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = centres[rng.integers(0, 40, 64 * 64)] + scale * rng.normal(size=(64 * 64, 32)).astype(np.float32)
        out.append(ImageEmbedding(f"e{i}", np.ascontiguousarray(f.T.reshape(32, 64, 64)), (1024, 1024),
                                  (256, 256)))
    return out


def test_mapper_scores_with_its_search_and_keeps_it_in_step_with_the_memory():
    """The mapper's frames are scored by memory.search (bf16 with float32 re-rank: near-exact); the search holds
    the mapper's memory rows, also after rows are appended."""
    import torch

    train, test = _embeddings(6, 0), _embeddings(1, 1)[0]
    exact = MemoryMapper("t", MemoryParams(neighbourhood=1, calibration_frames=4)).build(train)
    fast = MemoryMapper("t", MemoryParams(neighbourhood=1, calibration_frames=4,
                                          search=SearchSpec("bf16", rerank=8))).build(train)
    assert fast.rows.search.describe()["search"] == "bf16" and fast.rows.search.size == fast.size == exact.size
    a, b = exact.map(None, test), fast.map(None, test)
    assert a.image_score == pytest.approx(b.image_score, rel=3e-3)  # a rare candidate missed by the bf16 scan
    assert np.corrcoef(a.pixel.ravel(), b.pixel.ravel())[0, 1] > 0.99
    rows = torch.nn.functional.normalize(torch.randn(10, fast.rows.feats.shape[1]), dim=1).numpy()
    fast.rows.append(rows, np.ones(10, np.float16))
    assert fast.rows.search.size == fast.size == exact.size + 10
    assert fast.rows.search.mem is fast.rows.feats  # shared on the CPU, not copied
