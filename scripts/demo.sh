#!/usr/bin/env bash
# Quick start, command 1: install what the demo needs, then run a whole charging session.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh" demo
exec "$root/.venv/bin/edge-agent" demo "$@"
