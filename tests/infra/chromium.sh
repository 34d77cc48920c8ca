#!/usr/bin/env bash
# chromium.sh - headless Chromium for the dashboard's browser tests: installs
# Debian's chromium (and a font) if missing, then prints the browser's path.
# Needs root to install; a machine that has chromium needs nothing.
set -euo pipefail
TAG=chromium
. "$(dirname "$(readlink -f "$0")")/common.sh"
if [ "$(id -u)" = 0 ]; then
  install_missing chromium fonts-dejavu-core
elif ! command -v chromium >/dev/null 2>&1; then
  echo "chromium.sh: chromium is missing and installing it needs root" >&2; exit 1
fi
command -v chromium
