"""The one way a Redis client is built: :func:`make_client` from settings (url, timeouts and the TLS files of
``redis.*``), :func:`connect` from a url alone (a private or local server); both construct it in :func:`connect`.

TLS to a private CA: ``redis.url: rediss://host:6380/0`` and ``redis.tls_ca_file`` (CA bundle); mutual TLS
adds ``redis.tls_cert_file`` and ``redis.tls_key_file``. They are passed to redis-py as ``ssl_ca_certs``,
``ssl_certfile`` and ``ssl_keyfile``.

Redis Cluster (``redis.cluster: true`` or a ``redis+cluster://host:port`` url naming any node): redis-py's
``RedisCluster`` (sync or asyncio), which discovers the other nodes and follows MOVED/ASK. The settings then
require ``redis.key_layout: line_tag`` (see :mod:`stream.keys`). What differs on a cluster:

- multi-key reads over several lines (the alert service's XREADGROUP, its frame tail's XREAD) are split per
  slot (:func:`stream.keys.slot_groups`);
- the result notification is ``SPUBLISH`` to the line's shard channel (subscribe with ``SSUBSCRIBE``);
  a single node keeps ``PUBLISH``;
- ``SCAN`` (demo/bench clean-up, ``redis migrate-keys``) runs on every master (redis-py's cluster
  ``scan_iter``); the lines index ``<prefix>:lines`` is written with its own SADD.
"""

from __future__ import annotations

from typing import Any

from config.settings import RedisSettings
from stream.backoff import Backoff


def tls_kwargs(rs: RedisSettings) -> dict[str, Any]:
    """redis-py keyword arguments for the TLS files set in ``redis.*`` (none for a plain connection)."""
    out: dict[str, Any] = {}
    if rs.tls_ca_file:
        out["ssl_ca_certs"] = rs.tls_ca_file
    if rs.tls_cert_file:
        out["ssl_certfile"] = rs.tls_cert_file
        out["ssl_keyfile"] = rs.tls_key_file
    return out


# retry waits while Redis is unreachable (ingest, workers): capped at 0.1 s so that work resumes within 1 s of
# Redis answering again (a refused connection costs nothing; a frozen Redis is bounded by
# redis.socket_timeout_s instead)
REDIS_RETRY_INITIAL_S = 0.05
REDIS_RETRY_MAX_S = 0.1


# retries inside one cluster command (CLUSTERDOWN, an unserved slot, a lost node): redis-py's default (10, with
# a 0.25 s pause and up to 1 s of backoff each) holds one command for several seconds, and the camera with it.
# Two bounded retries ride over a topology refresh; a longer outage reaches the caller within about a second,
# as on a single Redis, and ingest counts the frames it drops meanwhile (redis_error) instead of stalling.
CLUSTER_RETRIES = 2


def redis_backoff() -> Backoff:
    """The backoff between attempts to reach an unreachable Redis (ingest, workers)."""
    return Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)


def connect(url: str, *, cluster: bool = False, asyncio: bool = False, **kwargs: Any):
    """A redis-py client for ``url`` (sync or asyncio; ``RedisCluster`` when ``cluster``): the one place a
    client is constructed. ``kwargs`` go to redis-py (timeouts, TLS files)."""
    if not cluster:
        if asyncio:
            import redis.asyncio as module
        else:
            import redis as module
        return module.Redis.from_url(url, **kwargs)
    from redis.backoff import ConstantBackoff

    if asyncio:
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
    else:
        from redis.cluster import RedisCluster
        from redis.retry import Retry
    scheme, _, rest = url.partition("://")
    host, _, _db = rest.partition("/")  # a cluster has database 0 only
    kwargs.setdefault("retry", Retry(ConstantBackoff(REDIS_RETRY_MAX_S), CLUSTER_RETRIES))
    # a line's keys live in one slot: a client must start, and go on, while another line's slot has no master
    # (redis-py's default refuses to build its slot table then, with an error that is not even a RedisError);
    # a command on an unserved slot raises SlotNotCoveredError / CLUSTERDOWN, which callers treat as Redis down
    kwargs.setdefault("require_full_coverage", False)
    return RedisCluster.from_url(f"{scheme}://{host}", **kwargs)


def make_client(rs: RedisSettings, *, socket_timeout: float | None = None,
                connect_timeout: float | None = None, asyncio: bool = False, **extra: Any):
    """A (sync or asyncio) redis-py client for ``rs.url``; timeouts default to ``redis.socket_timeout_s``."""
    timeout = rs.socket_timeout_s
    client = connect(rs.node_url, cluster=rs.is_cluster, asyncio=asyncio,
                     socket_timeout=timeout if socket_timeout is None else socket_timeout,
                     socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
                     **tls_kwargs(rs), **extra)
    client.lineinspect_key_layout = rs.key_layout  # read by workers.memory.store (built from a client only)
    return client


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "Redis cannot answer now: count, back off, retry": connection loss and timeouts,
    and on a cluster CLUSTERDOWN (a master restarting, a slot without a master), TRYAGAIN (resharding) and an
    uncovered slot. Ingest and workers treat them all as Redis being down."""
    import redis
    from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

    return (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is redis-py's (sync or asyncio) cluster client."""
    return type(client).__name__ in ("RedisCluster", "ClusterPipeline")
