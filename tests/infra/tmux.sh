#!/usr/bin/env bash
# tmux.sh - tmux for the console's terminal tests: installs Debian's tmux if
# missing (as root), then prints its path.
set -euo pipefail
TAG=tmux
. "$(dirname "$(readlink -f "$0")")/common.sh"
if [ "$(id -u)" = 0 ]; then
  install_missing tmux
elif ! command -v tmux >/dev/null 2>&1; then
  echo "tmux.sh: tmux is missing and installing it needs root" >&2; exit 1
fi
command -v tmux
