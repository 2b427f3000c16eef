#!/usr/bin/env bash
# Shared by scripts/demo.sh and scripts/test.sh: make .venv and install the project into it.
# Debian's system Python refuses `pip install` (PEP 668), so everything goes into a venv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extra=${1:-demo}
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "edge-agent needs Python >= 3.11 (found: $("$python" --version 2>&1))" >&2; exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (Debian) ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$root/.venv/bin/python" ]; then
  echo "creating virtual environment in $root/.venv ..." >&2
  "$python" -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed-$extra"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "installing ev-edge-agent[$extra] into .venv ..." >&2
  "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extra]"
  touch "$stamp"
fi
