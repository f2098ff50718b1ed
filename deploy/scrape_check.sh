#!/usr/bin/env bash
# Runs a real Prometheus server (Debian package `prometheus`, or any prometheus binary) against a running
# lineinspect process, waits for a scrape and queries one metric through Prometheus' HTTP API.
#
#   bash deploy/scrape_check.sh TARGET [METRIC]
#     TARGET  host:port of the process's metrics endpoint, e.g. a worker started with
#               lineinspect --set metrics.port=9400 worker --line line1 --detector noop
#             -> 127.0.0.1:9400
#     METRIC  the metric (or any PromQL expression) to query; default lineinspect_frames_processed_total
#
# Environment: PROMETHEUS (binary, default: prometheus on PATH), PROM_PORT (default: a free port),
# JOB (scrape job name, default lineinspect-worker), WAIT_S (how long to wait for a sample, default 30).
# Prints Prometheus' answer for `up` and for METRIC; exit 0 when METRIC has at least one sample.
# Everything it starts (one prometheus process, one temporary directory) is removed on exit.
set -euo pipefail

TARGET=${1:?usage: bash deploy/scrape_check.sh HOST:PORT [METRIC]}
METRIC=${2:-lineinspect_frames_processed_total}
PROMETHEUS=${PROMETHEUS:-prometheus}
JOB=${JOB:-lineinspect-worker}
WAIT_S=${WAIT_S:-30}
PY=${PYTHON:-python3}

log() { printf '[scrape_check] %s\n' "$*" >&2; }

command -v "$PROMETHEUS" >/dev/null || { log "no prometheus binary ($PROMETHEUS): apt-get install prometheus"; exit 2; }

http_get() {  # url -> body on stdout; non-zero exit when the request fails
  "$PY" - "$1" <<'PYEOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.read().decode())
PYEOF
}

urlenc() { "$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

if ! http_get "http://$TARGET/metrics" >/dev/null 2>&1; then
  log "nothing answers on http://$TARGET/metrics: start the process first"
  exit 2
fi

PROM_PORT=${PROM_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
WORK=$(mktemp -d -t lineinspect-prom.XXXXXX)
PROM_PID=""
cleanup() {
  if [ -n "$PROM_PID" ] && kill -0 "$PROM_PID" 2>/dev/null; then
    kill "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: $JOB
    static_configs:
      - targets: ["$TARGET"]
YAML

log "$("$PROMETHEUS" --version 2>&1 | head -1)"
log "starting prometheus on 127.0.0.1:$PROM_PORT scraping http://$TARGET/metrics every 1s (job $JOB)"
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

API="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 100); do
  http_get "$API/-/ready" >/dev/null 2>&1 && break
  kill -0 "$PROM_PID" 2>/dev/null || { log "prometheus exited:"; cat "$WORK/prometheus.log" >&2; exit 1; }
  sleep 0.2
done

query() { http_get "$API/api/v1/query?query=$(urlenc "$1")"; }
count() { "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(len(d["data"]["result"]) if d["status"] == "success" else -1)'; }

deadline=$((SECONDS + WAIT_S))
answer=""
while [ $SECONDS -lt $deadline ]; do
  answer=$(query "$METRIC" 2>/dev/null || true)
  if [ -n "$answer" ] && [ "$(printf '%s' "$answer" | count)" -gt 0 ]; then
    break
  fi
  answer=""
  sleep 1
done

echo "# up{job=\"$JOB\"}"
query "up{job=\"$JOB\"}" | "$PY" -m json.tool --compact 2>/dev/null || true
echo "# $METRIC"
if [ -z "$answer" ]; then
  log "no sample of $METRIC within ${WAIT_S}s"
  query "$METRIC" || true
  exit 1
fi
printf '%s' "$answer" | "$PY" -m json.tool --compact
