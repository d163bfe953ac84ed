#!/usr/bin/env bash
# Test prerequisites beyond requirements.txt: Debian's Chromium for the browser test (never a
# downloaded browser), a C++ compiler for the native attention kernel (the tests exercise it),
# and the local 3Dmol.js copy (from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/chromium ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v g++ >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -qq g++ >/dev/null || echo "g++ not installed: attention uses its slower fallback"
fi
bash scripts/fetch_3dmol.sh || echo "3Dmol.js not fetched: the viewer will use the CDN"
