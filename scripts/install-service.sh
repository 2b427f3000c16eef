#!/usr/bin/env bash
# Install ev-edge-agent as a systemd service on a Raspberry Pi (or any Debian 12 box):
#
#   sudo scripts/install-service.sh --role vehicle      # or --role station
#   sudo -u edge-agent edge-agent keys init --device-id ev-0042
#   sudoedit /etc/edge-agent/agent.toml && sudo systemctl enable --now edge-agent
#
# What it puts where (docs/service.md):
#   /opt/edge-agent/                  its own venv with ev-edge-agent[<role>]
#   /usr/bin/edge-agent               -> /opt/edge-agent/bin/edge-agent (the unit's ExecStart)
#   /etc/systemd/system/edge-agent.service, /usr/lib/sysusers.d/edge-agent.conf,
#   /usr/lib/tmpfiles.d/edge-agent.conf (then the user and the directories are created)
#   /etc/edge-agent/agent.toml        the role's example config, only if there is none yet
#   /usr/share/doc/ev-edge-agent/     the docs the unit's Documentation= points to
#   bash and zsh completion
#
# Idempotent: run it again to upgrade; it never overwrites /etc/edge-agent/agent.toml or
# anything under /var/lib/edge-agent (the keys), and never enables or starts the service.
#
# Options: --root DIR (install into a scratch root, as the test does), --role vehicle|station,
# --python PYTHON (default python3), --pip-args "..." (extra pip arguments, e.g. --no-deps).
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=/ role=vehicle python=python3 pip_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root|--role|--python|--pip-args)
      if [ $# -lt 2 ]; then
        echo "install-service.sh: $1 needs a value (see --help)" >&2; exit 2
      fi ;;
  esac
  case "$1" in
    --root) root=$2; shift 2 ;;
    --role) role=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --pip-args) pip_args=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "install-service.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$role" in vehicle|station) ;; *)
  echo "install-service.sh: --role must be vehicle or station, not $role" >&2; exit 2 ;;
esac
root=${root%/}
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install-service.sh: run as root (sudo), or give --root DIR" >&2; exit 1
fi
step() { echo "install-service.sh: $*"; }

venv="$root/opt/edge-agent"
if [ ! -x "$venv/bin/python" ]; then
  step "creating the venv $venv"
  "$python" -m venv "$venv"
fi
step "installing ev-edge-agent[$role] into $venv (a minute or two on a Pi)"
# shellcheck disable=SC2086  # pip_args is a list of words on purpose
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pip_args "$src[$role]"

install -d -m 0755 "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/sysusers.d" \
  "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/ev-edge-agent" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions"
# Relative, so that it resolves the same under --root.
ln -sfn ../../opt/edge-agent/bin/edge-agent "$root/usr/bin/edge-agent"
install -m 0644 "$src/systemd/edge-agent.service" "$root/etc/systemd/system/edge-agent.service"
install -m 0644 "$src/systemd/edge-agent.sysusers" "$root/usr/lib/sysusers.d/edge-agent.conf"
install -m 0644 "$src/systemd/edge-agent.tmpfiles" "$root/usr/lib/tmpfiles.d/edge-agent.conf"
for doc in service.md configuration.md uplink.md; do
  [ -f "$src/docs/$doc" ] && install -m 0644 "$src/docs/$doc" "$root/usr/share/doc/ev-edge-agent/"
done
install -m 0644 "$src/README.md" "$root/usr/share/doc/ev-edge-agent/README.md"
"$venv/bin/edge-agent" completion bash > "$root/usr/share/bash-completion/completions/edge-agent"
"$venv/bin/edge-agent" completion zsh > "$root/usr/share/zsh/vendor-completions/_edge-agent"

step "creating user edge-agent and its directories (sysusers.d, tmpfiles.d)"
mkdir -p "$root/etc"
if [ -n "$root" ]; then
  systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/edge-agent.conf"
  systemd-tmpfiles --root="$root" --create "$root/usr/lib/tmpfiles.d/edge-agent.conf"
else
  systemd-sysusers edge-agent.conf
  systemd-tmpfiles --create edge-agent.conf
fi
# The group the service runs as, looked up in the (scratch) root's own /etc/group.
gid=$(awk -F: '$1 == "edge-agent" { print $3 }' "$root/etc/group")

if [ ! -e "$root/etc/edge-agent/agent.toml" ]; then
  step "writing /etc/edge-agent/agent.toml from config/$role.toml (edit it: device, sources, broker)"
  install -m 0640 -o 0 -g "$gid" "$src/config/$role.toml" "$root/etc/edge-agent/agent.toml"
else
  step "keeping the existing /etc/edge-agent/agent.toml"
fi

if [ -z "$root" ]; then
  systemctl daemon-reload || true
fi
cat <<EOF
install-service.sh: done. Next:
  sudo -u edge-agent edge-agent keys init --state-dir /var/lib/edge-agent --device-id <ID>
  sudoedit /etc/edge-agent/agent.toml && edge-agent config check /etc/edge-agent/agent.toml
  sudo systemctl enable --now edge-agent && edge-agent status
EOF
