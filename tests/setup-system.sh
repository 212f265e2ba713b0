#!/usr/bin/env bash
# Debian packages some tests need, installed once, quietly (`make test` calls this):
#   chromium        the dashboard's headless browser test (tests/browser)
#   docker-compose  parses infra/deploy/compose.yaml (tests/faults/test_deploy.py); no engine needed
# Exits 0 either way; a test whose tool is still missing says so (and fails when OSMF_REQUIRE_SERVICES is set).
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; } || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo ">> tests/setup-system.sh: apt-get not found; install Debian's ${missing[*]} by hand" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo ">> tests/setup-system.sh: not root and no sudo; run 'apt-get install -y ${missing[*]}' as root" >&2
        exit 0
    fi
fi
echo ">> installing Debian's ${missing[*]} for the tests (once)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
    || echo ">> tests/setup-system.sh: 'apt-get install -y ${missing[*]}' failed; the tests that need them will say so" >&2
exit 0
