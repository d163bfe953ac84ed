#!/usr/bin/env bash
# Test prerequisites beyond requirements.txt: Debian's Chromium for the browser test (never a
# downloaded browser) and the local 3Dmol.js copy (from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/chromium ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
bash scripts/fetch_3dmol.sh || echo "3Dmol.js not fetched: the viewer will use the CDN"
