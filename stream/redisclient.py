"""The one way processes build a Redis client from settings: url, timeouts and the TLS files of ``redis.*``.

TLS to a private CA: ``redis.url: rediss://host:6380/0`` and ``redis.tls_ca_file`` (CA bundle); mutual TLS
adds ``redis.tls_cert_file`` and ``redis.tls_key_file``. They are passed to redis-py as ``ssl_ca_certs``,
``ssl_certfile`` and ``ssl_keyfile``.
"""

from __future__ import annotations

from typing import Any

from config.settings import RedisSettings


def tls_kwargs(rs: RedisSettings) -> dict[str, Any]:
    """redis-py keyword arguments for the TLS files set in ``redis.*`` (none for a plain connection)."""
    out: dict[str, Any] = {}
    if rs.tls_ca_file:
        out["ssl_ca_certs"] = rs.tls_ca_file
    if rs.tls_cert_file:
        out["ssl_certfile"] = rs.tls_cert_file
        out["ssl_keyfile"] = rs.tls_key_file
    return out


def make_client(rs: RedisSettings, *, socket_timeout: float | None = None,
                connect_timeout: float | None = None, asyncio: bool = False, **extra: Any):
    """A (sync or asyncio) redis-py client for ``rs.url``; timeouts default to ``redis.socket_timeout_s``."""
    if asyncio:
        import redis.asyncio as module
    else:
        import redis as module

    timeout = rs.socket_timeout_s
    return module.Redis.from_url(
        rs.url, socket_timeout=timeout if socket_timeout is None else socket_timeout,
        socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
        **tls_kwargs(rs), **extra)
