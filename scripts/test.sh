#!/usr/bin/env bash
# Quick start, command 2: install what the tests need (Python packages into .venv, and the
# Debian packages the real-peer tests talk to), then run the test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m slow`, `scripts/test.sh tests/agent`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
need=()
for pair in mosquitto:mosquitto socat:socat systemd-analyze:systemd zbarimg:zbar-tools zsh:zsh; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# PostgreSQL for the fleet tests (hil/postgres.py runs a throwaway cluster); Debian keeps
# initdb off PATH, under /usr/lib/postgresql/<version>/bin.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${need[*]} ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: run as root, or: sudo apt-get install ${need[*]}" >&2; exit 1
  fi
fi
"$root/scripts/bootstrap.sh" test
# anvil, the real Ethereum node the settlement tests also run against (npm package; the
# tests fail, never skip, when it is missing).
anvil="$root/.venv/npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
if [ ! -x "$anvil" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing Debian packages: npm ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  echo "installing anvil (npm @foundry-rs/anvil-linux-amd64) into .venv/npm ..." >&2
  npm install --prefix "$root/.venv/npm" --no-save --no-audit --no-fund --silent \
    @foundry-rs/anvil-linux-amd64@1.7.1 >/dev/null
fi
cd "$root"
# Types are checked too (mypy --strict on agent/ and firmware_adapters/, pyproject.toml).
echo "mypy --strict agent firmware_adapters ..." >&2
"$root/.venv/bin/python" -m mypy
set +e
"$root/.venv/bin/python" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, say so plainly.
if [ $rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $rc
