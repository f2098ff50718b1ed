"""redis.key_layout (plain | line_tag), redis.cluster, line id validation, and ``lineinspect redis migrate-keys``
on the shared Redis (keys under a unique test prefix)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

from config.settings import RedisSettings, Settings, SettingsError
from stream.keys import key_slot, line_keys, lines_index, slot_groups
from stream.migrate import migrate, target_key
from tests.conftest import ROOT


def test_plain_layout_keeps_the_keys_of_earlier_versions():
    k = line_keys("li", "L1")
    assert (k.frames, k.results, k.done("f1"), k.memory("feats")) == (
        "li:L1:frames", "li:L1:results", "li:L1:done:f1", "li:L1:memory:feats")


def test_line_tag_puts_every_key_of_a_line_in_one_slot_and_lines_apart():
    k = line_keys("li", "L1", "line_tag")
    assert k.frames == "li:{L1}:frames"
    names = [k.frames, k.results, k.results_channel, k.dead_letter, k.alerts, k.done("a:b"), k.memory("header"),
             k.failures, k.identity, k.heartbeat]
    assert {key_slot(n) for n in names} == {key_slot("L1")}
    slots = {key_slot(line_keys("li", f"line{i}", "line_tag").frames) for i in range(20)}
    assert len(slots) == 20  # different lines, different slots
    assert len(slot_groups([line_keys("li", f"line{i}", "line_tag").results for i in range(5)], True)) == 5
    assert len(slot_groups(["a", "b"], False)) == 1


@pytest.mark.parametrize("data, key", [
    ({"redis": {"cluster": True}}, "redis.key_layout"),  # a cluster needs line_tag
    ({"redis": {"url": "redis+cluster://127.0.0.1:7000"}}, "redis.key_layout"),
    ({"redis": {"url": "unix:///tmp/r.sock", "cluster": True, "key_layout": "line_tag"}}, "redis.cluster"),
    ({"redis": {"key_layout": "sharded"}}, "redis.key_layout"),
    ({"redis": {"key_prefix": "a{b}"}}, "redis.key_prefix"),
    ({"cameras": [{"id": "c", "line": "L{1}"}]}, "cameras[0].line"),
    ({"cameras": [{"id": "c", "line": "a b"}]}, "cameras[0].line"),
    ({"cameras": [{"id": "c", "line": "x" * 65}]}, "cameras[0].line"),
])
def test_wrong_cluster_settings_and_line_ids_exit_2_naming_the_key(tmp_path, data, key):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SettingsError) as err:
        Settings.load(path)
    assert err.value.key.replace("cameras.0", "cameras[0]").startswith(key.split("[")[0])
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(path), "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and key.split("[")[0] in proc.stderr, proc.stderr


def test_cluster_url_forms():
    rs = RedisSettings(url="redis+cluster://:pw@10.0.0.1:7000", key_layout="line_tag")
    assert rs.is_cluster and rs.node_url == "redis://:pw@10.0.0.1:7000"
    assert RedisSettings(cluster=True, key_layout="line_tag").is_cluster
    assert not RedisSettings(key_layout="line_tag").is_cluster  # line_tag on a single node is fine too


@pytest.mark.parametrize("line", ["a{b}", "a:b", "a b", "x" * 65, ""])
def test_cli_refuses_a_line_id_the_layout_cannot_hold(line):
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "worker", "--line", line, "--detector", "noop"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--line" in proc.stderr, proc.stderr


def test_target_key_both_ways():
    assert target_key("li:L1:frames", "li", "line_tag") == "li:{L1}:frames"
    assert target_key("li:L1:done:cam-1-7", "li", "line_tag") == "li:{L1}:done:cam-1-7"
    assert target_key("li:{L1}:frames", "li", "line_tag") is None
    assert target_key("li:lines", "li", "line_tag") is None
    assert target_key("li:{L1}:memory:feats", "li", "plain") == "li:L1:memory:feats"
    assert target_key("other:L1:frames", "li", "line_tag") is None


def test_migrate_keys_renames_a_deployment_and_back(redis_client, key_prefix):
    plain, tagged = line_keys(key_prefix, "L1"), line_keys(key_prefix, "L1", "line_tag")
    redis_client.xadd(plain.frames, {"p": b"x"})
    redis_client.set(plain.memory("header"), b"{}")
    redis_client.sadd(lines_index(key_prefix), "L1")
    redis_client.set(tagged.identity, b"already")  # a target that exists: a conflict, never overwritten
    redis_client.set(plain.identity, b"old")
    out = io.StringIO()
    counts = migrate(redis_client, key_prefix, "line_tag", out=out)
    assert counts == {"renamed": 2, "conflicts": 1, "skipped": 2}, out.getvalue()
    assert redis_client.xlen(tagged.frames) == 1 and redis_client.get(tagged.memory("header")) == b"{}"
    assert not redis_client.exists(plain.frames) and redis_client.get(tagged.identity) == b"already"
    assert redis_client.get(plain.identity) == b"old" and "CONFLICT" in out.getvalue()
    assert redis_client.sismember(lines_index(key_prefix), "L1")
    redis_client.delete(plain.identity)
    assert migrate(redis_client, key_prefix, "plain", out=io.StringIO())["renamed"] == 3
    assert redis_client.xlen(plain.frames) == 1 and redis_client.get(plain.identity) == b"already"


def test_migrate_keys_command_dry_run(redis_url, redis_client, key_prefix, tmp_path):
    redis_client.xadd(line_keys(key_prefix, "L9").frames, {"p": b"x"})
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"redis": {"url": redis_url, "key_prefix": key_prefix}}))
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(cfg), "redis", "migrate-keys",
                           "--to", "line_tag", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"would rename {key_prefix}:L9:frames -> {key_prefix}:{{L9}}:frames" in proc.stdout
    assert redis_client.exists(line_keys(key_prefix, "L9").frames)  # dry run: nothing renamed
