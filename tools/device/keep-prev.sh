#!/usr/bin/env bash
# Keeps the release binary of the last tools/device/build.sh as the build to compare against
# (.device/prev.tar.xz, carried beside .device/bin.tar.xz): run it before building a change,
# then `tools/device/run.sh ab N ARGS` on the GPU machine alternates the two.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .device/bin.tar.xz ] || { echo "no .device/bin.tar.xz: run tools/device/build.sh first" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -C "$tmp" -xJf .device/bin.tar.xz bin/hadal
mkdir -p "$tmp/prev"
mv "$tmp/bin/hadal" "$tmp/prev/hadal"
tar -C "$tmp" -cJf .device/prev.tar.xz prev
echo "kept $(du -h .device/prev.tar.xz | cut -f1) as .device/prev.tar.xz"
