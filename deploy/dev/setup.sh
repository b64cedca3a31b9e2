#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: the servers the demo and the tests use, and a .venv
# with the package. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v influxd >/dev/null 2>&1 || need+=(influxdb)
command -v influx >/dev/null 2>&1 || need+=(influxdb-client)
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# systemd-analyze checks the shipped units (tests/unit/test_systemd.py).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
"${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
# Node.js runs the Sparkplug edge node of the integration tests (Eclipse Tahu's JavaScript client).
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# The operator's page is tested in a real browser: Debian's chromium driven by Selenium (tests/integration/test_web_page.py).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts these as system services; the project runs its own copies on loopback instead.
    for svc in mosquitto influxdb victoria-metrics; do
        $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing the package and its test tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >.venv/pip.log 2>&1 || true
    if ! .venv/bin/python -m pip install -q -e ".[test]" >>.venv/pip.log 2>&1; then
        cat .venv/pip.log; echo "setup: pip install failed" >&2; exit 1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# The detectors' kernels compiled ahead of time with numba.pycc (no library ships them precompiled): a
# gateway running them never loads numba + LLVM (~100 MB RSS). Rebuilt only when their sources changed;
# without the extension (a failed build) the gateway JIT-compiles them as before.
if ! .venv/bin/python -m gateway.detect.aot >.venv/aot.log 2>&1; then
    cat .venv/aot.log; echo "setup: warning: the AOT kernel build failed; the gateway will JIT-compile them" >&2
fi
# tests/node: sparkplug-client + sparkplug-payload at the versions of the committed package-lock.json.
lock_stamp="tests/node/node_modules/.installed-$(sha256sum tests/node/package-lock.json | cut -c1-16)"
if [ ! -f "$lock_stamp" ]; then
    echo "setup: installing the Sparkplug test edge node's npm packages into tests/node"
    if ! (cd tests/node && npm ci --no-audit --no-fund --loglevel=error >../../.venv/npm.log 2>&1); then
        cat .venv/npm.log; echo "setup: npm ci in tests/node failed" >&2; exit 1
    fi
    rm -f tests/node/node_modules/.installed-*
    touch "$lock_stamp"
fi
export PATH="/usr/sbin:$PATH"
echo "setup: ok ($(mosquitto -h 2>/dev/null | head -1 | cut -c1-40), influxd $(influxd version 2>/dev/null | awk '{print $2}'), victoria-metrics, node $(node --version), .venv)"
