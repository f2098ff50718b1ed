"""No password printed: the redaction helper, and every subcommand's error paths run as real processes with a
password in the Redis URL, the camera URL and the alert URLs; the password appears in none of their output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from stream.redact import redact_settings, redact_text, redact_url
from tests.conftest import ROOT, free_port

REDIS_PW = "RedisPw-s3cr3t"
CAM_PW = "CamPw-s3cr3t"
HOOK_PW = "HookPw-s3cr3t"
TOKEN = "PreviewTok-s3cr3t"
SECRETS = (REDIS_PW, CAM_PW, HOOK_PW, TOKEN)


@pytest.mark.parametrize("text, want", [
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rtsp://admin:p@ss@cam:554/s?x=1&token=abc", "rtsp://admin:***@cam:554/s?x=1&token=***"),
    ("rediss://user:pw@h/0", "rediss://user:***@h/0"),
    ("see https://TOKEN@api.example/hook?b=2&api_key=k now", "see https://***@api.example/hook?b=2&api_key=*** now"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("key=value, no url", "key=value, no url"),
])
def test_redact_text(text, want):
    assert redact_text(text) == want == redact_url(text)


def test_redact_settings_masks_urls_and_secret_keys_only():
    out = redact_settings({"redis": {"url": "redis://:pw@h/0", "key_prefix": "li", "tls_key_file": "/k.pem"},
                           "preview": {"token": "t0k"}, "memory": {"k": 1}})
    assert out == {"redis": {"url": "redis://:***@h/0", "key_prefix": "li", "tls_key_file": "/k.pem"},
                   "preview": {"token": "***"}, "memory": {"k": 1}}


def _config(tmp_path):
    dead = free_port()  # nothing listens here: every Redis call fails
    cfg = {
        "redis": {"url": f"redis://default:{REDIS_PW}@127.0.0.1:{dead}/0", "socket_timeout_s": 0.3},
        "metrics": {"enabled": False},
        "cameras": [{"id": "cam1", "line": "L1", "source": "url", "max_reconnects": 1,
                     "reconnect_initial_s": 0.05, "reconnect_max_s": 0.1,
                     "path": f"rtsp://admin:{CAM_PW}@127.0.0.1:{free_port()}/stream"}],
        "alerts": {"webhook_url": f"http://hook:{HOOK_PW}@127.0.0.1:{free_port()}/x?token={HOOK_PW}"},
        "preview": {"token": TOKEN, "port": 0},
    }
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# (arguments, seconds before SIGTERM for a process that retries forever, or None)
COMMANDS = [
    (["config"], None),
    (["results", "--line", "L1"], None),
    (["bench", "--frames", "2", "--width", "64", "--height", "48"], None),
    (["ingest", "--camera", "cam1"], None),
    (["worker", "--line", "L1", "--detector", "noop"], 4),
    (["alerts", "--line", "L1"], 4),
    (["preview"], 6),
    (["memory", "show", "L1"], None),
    (["--set", "redis.url=redis+x://u:" + REDIS_PW + "@h/0", "config"], None),
    (["--set", "camera.bogus=1", "config"], None),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, stop_after", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_no_subcommand_prints_a_password(argv, stop_after, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LINEINSPECT__LOG_LEVEL": "DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(_config(tmp_path)), *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=stop_after or 90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert out.strip(), "the command printed nothing: the test would prove nothing"
    for secret in SECRETS:
        assert secret not in out, f"{secret} printed by {argv}:\n{out}"
    if argv == ["config"]:
        assert "redis://default:***@127.0.0.1" in out and "rtsp://admin:***@127.0.0.1" in out
