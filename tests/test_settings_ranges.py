"""Every numeric setting is range-checked at start-up (exit 2 naming the key); metrics bind 127.0.0.1 by
default; TLS files reach redis-py; a Redis user without a needed permission is refused at worker start-up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings, SettingsError
from stream import cli
from stream.redisclient import make_client
from tests.conftest import ROOT
from workers.worker import EXIT_MODEL, Worker, _redis_client

BAD = [
    ("queue.result_ttl_s", 0), ("queue.results_maxlen", -1), ("queue.dead_letter_maxlen", -1),
    ("queue.block_ms", 0), ("queue.block_ms", 5), ("queue.claim_interval_s", 0), ("queue.batch", 0),
    ("queue.max_frame_pixels", 0), ("metrics.port", 99999), ("metrics.port", -1), ("preview.port", 70000),
    ("redis.socket_timeout_s", 0), ("redis.socket_timeout_s", ".nan"), ("alerts.max_retries", -1),
    ("alerts.retry_initial_s", 0), ("alerts.debounce_count", 0), ("memory.warmup_frames", -1),
    ("detector.ppg.kernel_size", 0), ("detector.ppg.min_region_area", 2), ("detector.mask_boost", -1),
    ("detector.mask.extent", "everything"),
    ("clip.image_size", 0), ("cameras", "[{id: c1, reconnect_max_s: 0.1}]"),
    ("cameras", "[{id: c1, max_reconnects: -2}]"), ("cameras", "[{id: c1, down_grace_s: 0}]"),
]


@pytest.mark.parametrize("key, value", BAD)
def test_out_of_range_setting_exits_2_naming_the_key(key, value, capsys):
    assert cli.main(["--set", f"{key}={value}", "config"]) == 2
    err = capsys.readouterr().err
    named = key if key != "cameras" else "cameras[0]."
    assert named in err and "Traceback" not in err, err


def test_bad_metrics_port_is_exit_2_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "--set", "metrics.port=99999", "worker",
                           "--line", "L1", "--detector", "noop"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "metrics.port" in proc.stderr and "0..65535" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_bind_localhost_unless_the_image_says_otherwise():
    assert Settings.load(env={}).metrics.host == "127.0.0.1"
    assert Settings.load(env={"LINEINSPECT__METRICS__HOST": "0.0.0.0"}).metrics.host == "0.0.0.0"
    assert "LINEINSPECT__METRICS__HOST=0.0.0.0" in (ROOT / "deploy" / "Dockerfile").read_text()


def test_tls_files_are_settings_passed_to_redis_py(tmp_path):
    s = Settings.load(env={}, overrides={
        "redis.url": "rediss://:pw@redis.example:6380/0", "redis.tls_ca_file": str(tmp_path / "ca.pem"),
        "redis.tls_cert_file": str(tmp_path / "c.pem"), "redis.tls_key_file": str(tmp_path / "k.pem")})
    kwargs = make_client(s.redis).connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    with pytest.raises(SettingsError, match="redis.tls_ca_file: TLS files need a rediss://"):
        Settings.load(env={}, overrides={"redis.tls_ca_file": "ca.pem"})
    with pytest.raises(SettingsError, match="redis.tls_key_file"):
        Settings.load(env={}, overrides={"redis.url": "rediss://h:6380/0", "redis.tls_cert_file": "c.pem"})


def _worker(url: str) -> tuple[Worker, Settings]:
    settings = Settings.load(env={}, overrides={
        "redis.url": url, "redis.key_prefix": "acl", "redis.socket_timeout_s": 1, "metrics.enabled": False,
        "queue.block_ms": 100})
    return Worker(settings, "L1", "w1", "noop", CollectorRegistry(), _redis_client(settings)), settings


@pytest.mark.timeout(60)
def test_worker_without_scripting_permission_refuses_to_start(own_redis):
    admin = redis.Redis.from_url(own_redis.url)
    admin.acl_setuser("noscript", enabled=True, passwords=["+pw1"], keys=["*"], channels=["*"],
                      commands=["+@all", "-@scripting"])
    worker, _ = _worker(f"redis://noscript:pw1@127.0.0.1:{own_redis.port}/0")
    assert worker.run(threading.Event()) == EXIT_MODEL
    ok, text = worker.health()
    assert not ok and "lacks a permission" in text and "@scripting" in text


@pytest.mark.timeout(60)
def test_healthz_names_the_redis_error_not_the_model(own_redis):
    admin = redis.Redis.from_url(own_redis.url)
    admin.acl_setuser("app", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    worker, _ = _worker(f"redis://app:wrong@127.0.0.1:{own_redis.port}/0")
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while worker.link.error == "not connected yet" and time.monotonic() < deadline:
            stop.wait(0.05)
        ok, text = worker.health()
    finally:
        stop.set()
        t.join(20)
    assert not ok and text.startswith("redis unreachable:") and "password" in text, text
    assert "wrong" not in text
