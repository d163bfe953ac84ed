#!/usr/bin/env bash
# Fetch the 3Dmol.js build that py3Dmol expects into static/ (git-ignored; third-party code
# is not committed). Streamlit serves it at /app/static/vendor/3Dmol-min.js, so the structure viewer
# works offline; without it the viewer falls back to the jsDelivr CDN.
# Needs npm and access to the npm registry once, at set-up.
set -euo pipefail
VERSION="${THREEDMOL_VERSION:-2.5.5}"  # the version py3Dmol 2.5.5 loads from its CDN
SHA1="932bff7b1490bf5ef531a36f9af439eae942d7ed"  # of 3dmol-2.5.5.tgz, as npm reports it
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="$repo/static/vendor/3Dmol-min.js"
if [[ -s "$target" && "${1:-}" != "--force" ]]; then
  echo "$target already present (use --force to fetch again)"
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "npm not found: the 3D viewer will load 3Dmol.js from its CDN (needs internet)" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm pack --silent "3dmol@$VERSION" >/dev/null); then
  echo "could not fetch 3dmol@$VERSION from the npm registry: the 3D viewer will use its CDN" >&2
  exit 0
fi
tarball="$work/3dmol-$VERSION.tgz"
if [[ "$VERSION" == "2.5.5" ]]; then
  echo "$SHA1  $tarball" | sha1sum -c --quiet -
fi
tar -xzf "$tarball" -C "$work" package/build/3Dmol-min.js package/LICENSE
mkdir -p "$repo/static/vendor"
cp "$work/package/build/3Dmol-min.js" "$target"
cp "$work/package/LICENSE" "$repo/static/vendor/3Dmol-LICENSE"
echo "3Dmol.js $VERSION -> $target"
