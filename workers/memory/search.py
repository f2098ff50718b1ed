"""Nearest-neighbour search over a line's memory of normal patch features (``memory.search``).

Every search answers the same question as the exact one: per query row, the Euclidean distances to its
``k`` nearest memory rows (and their indices). Options:

- ``exact``: float32 matmul (``|q|^2 + |m|^2 - 2 q.m``) in chunks, top-k. The reference.
- ``bf16``: the same matmul with queries and memory in bfloat16 (float32 norms); with ``rerank`` > 0 the
  best ``rerank`` candidates per query are re-ranked with exact float32 distances, so a returned distance
  is an exact distance (to a neighbour that may rarely not be the nearest one).
- ``projection``: queries and memory projected to ``dim`` dimensions (``basis``: ``pca`` of the memory rows,
  or ``random`` Gaussian), the best ``rerank`` candidates there re-ranked with exact float32 distances. The
  scan over the projected rows runs in ``scan`` precision: ``bfloat16`` halves its time where the hardware
  multiplies bfloat16 natively (a GPU; a CPU with AVX512-BF16 or AMX) and only picks the candidates, whose
  distances are then computed exactly; ``auto`` (default) takes bfloat16 on a GPU and, on a CPU, when a
  one-off timing of both (:func:`cpu_bf16_pays`, about 50 ms once per process) shows bfloat16 at most 0.7 x
  the float32 time, else float32.
- ``ivf``: an inverted-file index in torch (no extra package): the memory rows clustered by k-means into
  ``nlist`` lists (at least 39 rows per list), each query compared exactly (float32) with the rows of the
  ``nprobe`` lists whose centres are nearest to it.
- ``faiss``: an inverted-file index (``faiss.IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed), exact
  float32 distances within the probed lists. Needs ``pip install faiss-cpu`` (extra ``faiss``).

``device``: ``cuda`` keeps the memory (and its index) on the GPU and moves each frame's queries there;
when ``torch.cuda`` is not available the search runs on the CPU and says so once (a warning).
Memory rows arrive as torch float32 CPU tensors ``[n, C]``; results are CPU tensors.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.settings import MemorySettings

log = logging.getLogger(__name__)

KINDS = ("exact", "bf16", "projection", "ivf", "faiss")
SCANS = ("auto", "float32", "bfloat16")
BF16_PAYS = 0.7  # auto: bfloat16 when its matmul takes at most this share of float32's
FAISS_HINT = "pip install faiss-cpu (or: pip install 'lineinspect[faiss]')"


def torch_module():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - installed with the package
        raise RuntimeError(f"workers.memory needs torch ({exc}); pip install torch") from exc
    return torch


@dataclass(frozen=True)
class SearchSpec:
    """What ``memory.search`` and its options ask for (validated by ``config.settings.MemorySettings``)."""

    kind: str = "exact"
    rerank: int = 8  # bf16 / projection: candidates re-ranked with exact float32 distances (bf16: 0 = none)
    dim: int = 128  # projection: dimensions
    basis: str = "pca"  # projection: pca (of the memory rows) or random
    nlist: int = 128  # faiss: inverted lists (fewer for small memories: at least 39 rows per list)
    nprobe: int = 8  # faiss: lists searched per query
    device: str = "cpu"
    seed: int = 0
    scan: str = "auto"  # projection: precision of the scan over the projected rows (auto, float32, bfloat16)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown memory search {self.kind!r} (allowed: {', '.join(KINDS)})")
        if self.basis not in ("pca", "random"):
            raise ValueError(f"unknown projection basis {self.basis!r} (allowed: pca, random)")
        if self.scan not in SCANS:
            raise ValueError(f"unknown scan precision {self.scan!r} (allowed: {', '.join(SCANS)})")

    @classmethod
    def from_settings(cls, m: MemorySettings) -> SearchSpec:
        return cls(kind=m.search, rerank=m.search_rerank, dim=m.search_dim, basis=m.search_basis,
                   nlist=m.search_nlist, nprobe=m.search_nprobe, device=m.device,
                   scan=getattr(m, "search_scan", cls.scan))

    def index_bytes(self, n: int, dim: int, scan_bytes: int | None = None) -> int:
        """Bytes the index adds to the float32 memory rows of ``n`` x ``dim`` (estimate). ``scan_bytes``: the
        element size of a projection's scan (default from ``scan``; ``auto``, not yet resolved, counts as
        float32: the upper bound)."""
        if self.kind == "bf16":
            return n * dim * 2
        if self.kind == "projection":
            out = min(self.dim, dim)
            item = scan_bytes if scan_bytes is not None else 2 if self.scan == "bfloat16" else 4
            return n * (out + 1) * item + dim * out * 4  # projected rows and their squared norms, the basis
        if self.kind == "faiss":
            return n * (dim * 4 + 8)
        if self.kind == "ivf":  # rows in list order (a copy) + their indices + the centres
            return n * (dim * 4 + 16) + self.nlist * dim * 4
        return 0

    def label(self) -> str:
        """A short human description (``memory show``, logs, benchmarks)."""
        if self.kind == "bf16":
            return "bf16 matmul" + (f" + float32 re-rank of top {self.rerank}" if self.rerank else "")
        if self.kind == "projection":
            scan = "" if self.scan == "float32" else f", {self.scan} scan"
            return f"{self.basis} projection to {self.dim} dims{scan} + float32 re-rank of top {self.rerank}"
        if self.kind == "faiss":
            return f"faiss IVF-Flat nlist {self.nlist} nprobe {self.nprobe}"
        if self.kind == "ivf":
            return f"torch IVF-Flat nlist {self.nlist} nprobe {self.nprobe}"
        return "exact float32 matmul"


def resolve_device(device: str) -> str:
    """``cuda`` when asked for and available, else ``cpu`` (a warning when cuda was asked for)."""
    if device == "cpu":
        return "cpu"
    torch = torch_module()
    if device.startswith("cuda") and torch.cuda.is_available():
        return device
    log.warning("memory.device=%s but torch.cuda is not available here (torch %s, CUDA build %s): "
                "the memory search runs on cpu", device, torch.__version__, torch.version.cuda)
    return "cpu"


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether a bfloat16 matmul of the projection scan's shape takes at most :data:`BF16_PAYS` of the float32
    one on this CPU (best of 3 each, measured once per process: CPUs without native bfloat16 emulate it and
    run it slower than float32)."""
    torch = torch_module()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 128, generator=g), torch.randn(128, 4096, generator=g)

    def best(x, y) -> float:
        x @ y
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    f32, bf16 = best(a, b), best(a.to(torch.bfloat16), b.to(torch.bfloat16))
    log.info("memory search: bfloat16 matmul %.1f ms vs float32 %.1f ms on this CPU", 1e3 * bf16, 1e3 * f32)
    return bf16 <= BF16_PAYS * f32


def scan_dtype(scan: str, device: str):
    """The torch dtype of a projection scan (``scan`` of :class:`SearchSpec`, see the module doc)."""
    torch = torch_module()
    if scan == "auto":
        scan = "bfloat16" if device.startswith("cuda") or cpu_bf16_pays() else "float32"
    return torch.bfloat16 if scan == "bfloat16" else torch.float32


# ------------------------------------------------------------------------------------------ exact


def exact_knn(query, memory, k: int = 1, memory_sq=None, chunk: int = 8192):
    """Per query row: squared Euclidean distances to its k nearest memory rows and their indices
    (float32 matmul in memory chunks). ``([Q, k], [Q, k])``, ascending.

    A query's own squared norm does not change which rows are nearest, so it is added to the k distances
    kept, not to the whole [Q, chunk] matrix: ``addmm`` broadcasts the rows' norms itself, and one pass over
    the matrix is saved (about 0.7 x the time of the previous form, same neighbours)."""
    torch = torch_module()
    n = memory.shape[0]
    if n == 0:
        raise ValueError("empty memory")
    k = max(1, min(k, n))
    q_sq = (query * query).sum(1, keepdim=True)
    if memory_sq is None:
        memory_sq = (memory * memory).sum(1)
    best_d = best_i = None
    for s in range(0, n, chunk):
        m = memory[s:s + chunk]
        d2 = torch.addmm(memory_sq[s:s + chunk][None], query, m.T, beta=1.0, alpha=-2.0)  # minus |q|^2
        d, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
        i = i + s
        if best_d is not None:
            d, j = torch.topk(torch.cat([best_d, d], 1), k, dim=1, largest=False)
            i = torch.gather(torch.cat([best_i, i], 1), 1, j)
        best_d, best_i = d, i
    return (best_d + q_sq).clamp_min_(0), best_i


def rerank(query, memory, cand, k: int, chunk: int = 1024):
    """Exact float32 squared distances from each query row to its candidate rows ``cand`` [Q, r]; the k
    nearest of them, ascending: ``([Q, k], [Q, k])``."""
    torch = torch_module()
    k = min(k, cand.shape[1])
    out_d, out_i = [], []
    for s in range(0, query.shape[0], chunk):
        c = cand[s:s + chunk]
        diff = memory[c] - query[s:s + chunk, None, :]
        d2 = (diff * diff).sum(-1)
        d, j = torch.topk(d2, k, dim=1, largest=False)
        out_d.append(d)
        out_i.append(torch.gather(c, 1, j))
    return torch.cat(out_d), torch.cat(out_i)


# ------------------------------------------------------------------------------------------ searches


def knn_distance(query, memory, k: int = 1, memory_sq=None, chunk: int = 8192):
    """Per query row: mean Euclidean distance to its k nearest memory rows, exact float32 (torch, chunked:
    :func:`exact_knn`). [Q]."""
    d2, _ = exact_knn(query, memory, k, memory_sq=memory_sq, chunk=chunk)
    return d2.sqrt_().mean(1)



class MemorySearch:
    """Base: holds the memory on ``device``; subclasses keep whatever index they need in step with it."""

    def __init__(self, spec: SearchSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.mem = None  # float32 [n, C] on device
        self.mem_sq = None

    @property
    def size(self) -> int:
        return 0 if self.mem is None else int(self.mem.shape[0])

    def reset(self, memory) -> MemorySearch:
        """Index ``memory`` (float32 CPU tensor [n, C]), replacing what was held."""
        self.mem = memory.to(self.device, dtype=torch_module().float32)
        self.mem_sq = (self.mem * self.mem).sum(1)
        self._rebuild()
        return self

    def add(self, rows, memory=None) -> None:
        """Append memory rows (float32 CPU tensor [m, C]) after the held ones. ``memory``: the whole memory
        after the append when the caller holds it already (shared instead of copied on the CPU)."""
        torch = torch_module()
        if rows.shape[0] == 0:
            return
        if self.mem is None:
            self.reset(rows if memory is None else memory)
            return
        new = rows.to(self.device, dtype=torch.float32)
        if memory is not None and memory.device == self.mem.device and memory.shape[0] == self.size + len(new):
            self.mem = memory
        else:
            self.mem = torch.cat([self.mem, new])
        self.mem_sq = torch.cat([self.mem_sq, (new * new).sum(1)])
        self._added(new)

    def search(self, query, k: int = 1):
        """Squared distances [Q, k] (ascending) and memory indices [Q, k] of each query row's k nearest."""
        if self.size == 0:
            raise ValueError("empty memory")
        d2, idx = self._search(query.to(self.device, dtype=torch_module().float32), max(1, min(k, self.size)))
        return d2.cpu(), idx.cpu()

    def knn_distance(self, query, k: int = 1):
        """Mean Euclidean distance to the k nearest memory rows, per query row: float32 [Q] (CPU)."""
        d2, _ = self.search(query, k)
        return d2.clamp_min(0).sqrt().mean(1)

    def describe(self) -> dict[str, Any]:
        return {"search": self.spec.kind, "index": self.spec.label(), "device": self.device,
                "rows": self.size, "index_bytes": self._index_bytes()}

    # subclass hooks
    def _rebuild(self) -> None:
        pass

    def _added(self, new) -> None:
        pass

    def _index_bytes(self) -> int:
        return 0 if self.mem is None else self.spec.index_bytes(self.size, int(self.mem.shape[1]))

    def _search(self, query, k: int):
        return exact_knn(query, self.mem, k, memory_sq=self.mem_sq)


class ExactSearch(MemorySearch):
    pass


class Bf16Search(MemorySearch):
    def _rebuild(self) -> None:
        self.mem16 = self.mem.to(torch_module().bfloat16)

    def _added(self, new) -> None:
        torch = torch_module()
        self.mem16 = torch.cat([self.mem16, new.to(torch.bfloat16)])

    def _search(self, query, k: int, chunk: int = 8192):
        torch = torch_module()
        r = max(k, self.spec.rerank)
        q16 = query.to(torch.bfloat16)
        q_sq = (query * query).sum(1, keepdim=True)
        best_d = best_i = None
        for s in range(0, self.size, chunk):
            dots = (q16 @ self.mem16[s:s + chunk].T).float()
            d2 = q_sq + self.mem_sq[s:s + chunk][None] - 2.0 * dots
            d, i = torch.topk(d2, min(r, d2.shape[1]), dim=1, largest=False)
            i = i + s
            if best_d is not None:
                d, j = torch.topk(torch.cat([best_d, d], 1), min(r, best_d.shape[1] + d.shape[1]), dim=1,
                                  largest=False)
                i = torch.gather(torch.cat([best_i, i], 1), 1, j)
            best_d, best_i = d, i
        if self.spec.rerank:
            return rerank(query, self.mem, best_i, k)
        return best_d[:, :k].clamp_min(0), best_i[:, :k]


class ProjectionSearch(MemorySearch):
    """The basis is fitted at the first ``reset`` and kept across later ones of the same width and of 0.5-2 x
    the rows (a bounded memory rewritten by compaction or the reservoir, a reload of the line): a refit costs
    a covariance and an eigendecomposition, and the exact re-rank does not need the newest basis."""

    proj = None
    fitted_rows = 0
    dtype = None  # of the scan, resolved at the first reset (scan_dtype)

    def _rebuild(self) -> None:
        torch = torch_module()
        dim = self.mem.shape[1]
        out = min(self.spec.dim, dim)
        keep = (self.proj is not None and self.proj.shape[0] == dim
                and 0.5 * self.fitted_rows <= self.size <= 2 * self.fitted_rows)
        if keep:
            pass
        elif self.spec.basis == "pca":
            mean = self.mem.mean(0, keepdim=True)
            x = self.mem - mean
            cov = (x.T @ x) / max(1, x.shape[0] - 1)
            _, vecs = torch.linalg.eigh(cov.double())
            self.proj = vecs[:, -out:].flip(1).to(torch.float32).contiguous()  # largest variance first
        else:
            g = torch.Generator().manual_seed(self.spec.seed + 7919 * dim)
            self.proj = (torch.randn(dim, out, generator=g) / math.sqrt(out)).to(self.device)
        if not keep:
            self.fitted_rows = self.size
        self.dtype = scan_dtype(self.spec.scan, self.device)
        p = self.mem @ self.proj
        self.memp, self.memp_sq = p.to(self.dtype), (p * p).sum(1).to(self.dtype)

    def _added(self, new) -> None:
        torch = torch_module()
        p = new @ self.proj
        self.memp = torch.cat([self.memp, p.to(self.dtype)])
        self.memp_sq = torch.cat([self.memp_sq, (p * p).sum(1).to(self.dtype)])

    def _search(self, query, k: int):
        r = max(k, self.spec.rerank)
        _, cand = exact_knn((query @ self.proj).to(self.dtype), self.memp, r, memory_sq=self.memp_sq)
        return rerank(query, self.mem, cand, k)

    def _index_bytes(self) -> int:
        if self.mem is None:
            return 0
        item = None if self.dtype is None else int(self.dtype.itemsize)
        return self.spec.index_bytes(self.size, int(self.mem.shape[1]), item)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.dtype is not None:  # the precision auto resolved to, in place of "auto"
            scan = str(self.dtype).removeprefix("torch.")
            out.update(scan=scan, index=replace(self.spec, scan=scan).label())
        else:
            out["scan"] = None
        return out


class IvfSearch(MemorySearch):
    """Inverted lists in torch: k-means centres, the rows stored contiguously per list (a copy in list order)."""

    kmeans_iters = 8

    def _rebuild(self) -> None:
        torch = torch_module()
        n = self.size
        nlist = max(1, min(self.spec.nlist, n // 39))
        g = torch.Generator().manual_seed(self.spec.seed)
        sample = self.mem[torch.randperm(n, generator=g)[:max(nlist * 64, 1)].to(self.device)]
        centres = sample[torch.randperm(sample.shape[0], generator=g)[:nlist].to(self.device)].clone()
        for _ in range(self.kmeans_iters):  # Lloyd on a sample of up to 64 rows per list
            _, a = exact_knn(sample, centres, 1)
            a = a[:, 0]
            sums = torch.zeros_like(centres).index_add_(0, a, sample)
            counts = torch.bincount(a, minlength=nlist).to(sample.dtype)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None]
        self.centres = centres
        self.centres_sq = (centres * centres).sum(1)
        self.assign = self._assign(self.mem)
        self._lists()

    def _assign(self, rows):
        return exact_knn(rows, self.centres, 1, memory_sq=self.centres_sq)[1][:, 0]

    def _lists(self) -> None:
        torch = torch_module()
        self.order = torch.argsort(self.assign, stable=True)
        self.sorted_mem = self.mem[self.order]
        self.sorted_sq = self.mem_sq[self.order]
        counts = torch.bincount(self.assign, minlength=self.centres.shape[0])
        self.starts = (torch.cumsum(counts, 0) - counts).tolist()
        self.counts = counts.tolist()

    def _added(self, new) -> None:
        torch = torch_module()
        self.assign = torch.cat([self.assign, self._assign(new)])
        self._lists()

    def _search(self, query, k: int):
        torch = torch_module()
        nq = query.shape[0]
        nprobe = min(self.spec.nprobe, self.centres.shape[0])
        _, probes = exact_knn(query, self.centres, nprobe, memory_sq=self.centres_sq)
        q_sq = (query * query).sum(1)
        buf_d = torch.full((nq, nprobe * k), float("inf"), device=query.device)
        buf_i = torch.zeros((nq, nprobe * k), dtype=torch.long, device=query.device)
        flat = probes.flatten()
        by_list = torch.argsort(flat, stable=True)
        per_list = torch.bincount(flat, minlength=self.centres.shape[0]).tolist()
        pos = 0
        for c, m in enumerate(per_list):
            if m == 0:
                continue
            sel = by_list[pos:pos + m]
            pos += m
            size = self.counts[c]
            if size == 0:
                continue
            qi, slot = sel // nprobe, sel % nprobe
            s0 = self.starts[c]
            d2 = torch.addmm(q_sq[qi, None] + self.sorted_sq[s0:s0 + size][None], query[qi],
                             self.sorted_mem[s0:s0 + size].T, beta=1.0, alpha=-2.0)
            kk = min(k, size)
            d, j = torch.topk(d2, kk, dim=1, largest=False)
            cols = slot[:, None] * k + torch.arange(kk, device=query.device)[None]
            buf_d[qi[:, None], cols] = d
            buf_i[qi[:, None], cols] = self.order[s0 + j]
        d2, j = torch.topk(buf_d, k, dim=1, largest=False)
        idx = torch.gather(buf_i, 1, j)
        short = torch.isinf(d2).any(1)  # fewer than k rows in the probed lists: exact search for those
        if bool(short.any()):
            rows = short.nonzero().flatten()
            d2[rows], idx[rows] = exact_knn(query[rows], self.mem, k, memory_sq=self.mem_sq)
        return d2.clamp_min(0), idx


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        from stream.contracts import ModelLoadError

        raise ModelLoadError(f"memory.search=faiss needs the faiss package ({exc}); {FAISS_HINT}") from exc
    return faiss


class FaissSearch(MemorySearch):
    def __init__(self, spec: SearchSpec):
        self.faiss = _faiss()
        super().__init__(spec)
        if self.device != "cpu":
            log.warning("memory.search=faiss runs on cpu here (faiss-cpu); memory.device=%s is ignored", self.device)
            self.device = "cpu"
        self.index = None

    def _rebuild(self) -> None:
        faiss = self.faiss
        faiss.omp_set_num_threads(torch_module().get_num_threads())
        x = self.mem.numpy()
        n, dim = x.shape
        nlist = max(1, min(self.spec.nlist, n // 39))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        index.cp.seed = self.spec.seed
        index.train(x)
        index.add(x)
        index.nprobe = min(self.spec.nprobe, nlist)
        self.index, self.quantizer = index, quantizer  # the quantizer must outlive the index

    def _added(self, new) -> None:
        self.index.add(new.numpy())

    def _search(self, query, k: int):
        torch = torch_module()
        d2, idx = self.index.search(query.contiguous().numpy(), k)
        d2, idx = torch.from_numpy(d2), torch.from_numpy(idx)
        missing = idx < 0  # fewer than k rows in the probed lists: fall back to the exact search for those
        if bool(missing.any()):
            rows = missing.any(1).nonzero().flatten()
            ed, ei = exact_knn(query[rows], self.mem, k, memory_sq=self.mem_sq)
            d2[rows], idx[rows] = ed, ei
        return d2.clamp_min(0), idx


def make_search(spec: SearchSpec | None = None) -> MemorySearch:
    """The search ``spec`` asks for (faiss imported here, with an install hint when missing)."""
    spec = spec or SearchSpec()
    cls = {"exact": ExactSearch, "bf16": Bf16Search, "projection": ProjectionSearch, "ivf": IvfSearch,
           "faiss": FaissSearch}
    return cls[spec.kind](spec)
