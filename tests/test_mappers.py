"""workers.mappers: one registry builds the map source for the worker and the offline tools alike."""

from __future__ import annotations

from config.settings import Settings
from workers.mappers import ZeroMapper, build_mapper, clip_thresholds


def _settings(**dotted) -> Settings:
    return Settings.load(env={}, overrides=dotted)


def test_uses_memory_and_clip_follow_the_map_source():
    seen = {s: (_settings(**{"detector.map_source": s}).detector.uses_memory,
                _settings(**{"detector.map_source": s}).detector.uses_clip)
            for s in ("memory", "clip", "fusion", "none")}
    assert seen == {"memory": (True, False), "clip": (False, True), "fusion": (True, True), "none": (False, False)}


def test_sam_taps_are_the_memory_layers_besides_the_neck_only_when_the_memory_runs_on_sam():
    s = _settings(**{"memory.layers": ["neck", "stage2", "stage3"]})
    assert s.sam_taps == ("stage2", "stage3")
    assert _settings(**{"detector.map_source": "clip"}).sam_taps == ()
    assert _settings(**{"memory.features": "clip"}).sam_taps == ()


def test_clip_takes_the_raw_threshold_overrides_only_as_the_one_map():
    over = {"detector.image_threshold": 0.7, "detector.pixel_threshold": 0.4}
    assert clip_thresholds(_settings(**{"detector.map_source": "clip"}, **over).detector) == {
        "pixel_threshold": 0.4, "image_threshold": 0.7}
    assert clip_thresholds(_settings(**{"detector.map_source": "clip"}).detector) == {}
    assert clip_thresholds(_settings(**{"detector.map_source": "fusion"}, **over).detector) == {}


def test_the_memory_is_built_only_when_the_source_uses_it():
    calls = []
    memory = ZeroMapper()

    def build_memory():
        calls.append(1)
        return memory

    assert build_mapper(_settings(**{"detector.map_source": "memory"}), build_memory) is memory
    assert isinstance(build_mapper(_settings(**{"detector.map_source": "none"}), build_memory), ZeroMapper)
    assert calls == [1]
