"""Settings: one typed object from YAML + environment, validated at start-up with messages naming the key."""

import subprocess
import sys

import pytest

from config.settings import Settings, SettingsError


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_and_are_typed():
    s = Settings.load(env={})
    assert s.queue.maxlen == 2000 and isinstance(s.queue.maxlen, int)
    assert s.detector.map_source == "memory"
    assert s.clip.layers == (6, 12, 18, 24)


def test_yaml_files_deep_merge_in_order_and_env_wins(tmp_path):
    a = write(tmp_path, "queue:\n  maxlen: 10\n  batch: 2\n", "a.yaml")
    b = write(tmp_path, "queue:\n  maxlen: 20\n", "b.yaml")
    s = Settings.load(a, b, env={"LINEINSPECT__QUEUE__BATCH": "5", "LINEINSPECT__DETECTOR__PPG__TOP_K": "7"})
    assert s.queue.maxlen == 20  # b over a
    assert s.queue.batch == 5  # env over files, parsed as YAML -> int
    assert s.detector.ppg.top_k == 7  # nested section through double underscores


def test_cameras_list_is_validated_with_index_in_key(tmp_path):
    p = write(tmp_path, "cameras:\n  - id: cam1\n    line: l1\n    path: /x\n  - id: 'bad id'\n    line: l1\n")
    with pytest.raises(SettingsError) as err:
        Settings.load(p, env={})
    assert err.value.key == "cameras[1].id"


@pytest.mark.parametrize("text, key, words", [
    ("queue:\n  trim: sometimes\n", "queue.trim", ["'approximate'", "'exact'"]),
    ("queue:\n  maxlen: many\n", "queue.maxlen", ["expected an integer"]),
    ("queue:\n  maxlen: 0\n", "queue.maxlen", ["must be > 0"]),
    ("detector:\n  cps_stages: 4\n", "detector.cps_stages", ["allowed 0, 1, 2, 3"]),
    ("redis:\n  url: http://localhost:6379\n", "redis.url", ["redis://", "rediss://"]),
    ("queue:\n  maxlenn: 3\n", "queue.maxlenn", ["unknown key", "maxlen"]),
    ("detector:\n  ppg:\n    kernel_shape: star\n", "detector.ppg.kernel_shape", ["'ellipse'"]),
])
def test_wrong_values_fail_fast_naming_the_key_and_allowed_values(tmp_path, text, key, words):
    with pytest.raises(SettingsError) as err:
        Settings.load(write(tmp_path, text), env={})
    assert err.value.key == key
    for w in words:
        assert w in str(err.value)


def test_redis_url_forms_accepted():
    for url in ("redis://127.0.0.1:6379/0", "rediss://:secret@redis.example:6380/1", "redis://user:pw@h:1/2"):
        assert Settings.load(env={}, overrides={"redis.url": url}).redis.url == url


def test_with_overrides_revalidates():
    s = Settings.load(env={})
    assert s.with_overrides(**{"queue.maxlen": 5}).queue.maxlen == 5
    with pytest.raises(SettingsError):
        s.with_overrides(**{"queue.maxlen": -5})


def test_cli_reports_bad_settings_file_with_key_and_exit_code_2(tmp_path):
    p = write(tmp_path, "queue:\n  trim: sometimes\n")
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(p), "config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "queue.trim" in proc.stderr and "'approximate'" in proc.stderr


def test_cli_missing_file_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(tmp_path / "nope.yaml"), "config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "file not found" in proc.stderr
