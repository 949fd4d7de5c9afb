#!/usr/bin/env bash
# Builds, on this machine, what a run on the GPU machine needs (which has no Rust): the release
# binary and the GPU test binaries, stripped and packed, and the Python wheels the server test
# needs there, into .device/ (git-ignored; name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.device
cargo build --release --locked
rm -rf "$out/bin" "$out/bin.tar.xz"
mkdir -p "$out/bin"
cp target/release/hadal "$out/bin/"
for t in cuda golden cuda_compile; do
  exe=$(cargo test --release --locked --no-run --test "$t" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m.get("target", {}).get("kind") == ["test"]: print(m["executable"])')
  cp "$exe" "$out/bin/$t"
done
# The library's unit tests (the CPU kernels' checks, e.g. on the GPU machine's own CPU).
exe=$(cargo test --release --locked --no-run --lib --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m.get("target", {}).get("kind") == ["lib"]: print(m["executable"])')
cp "$exe" "$out/bin/unit"
strip "$out"/bin/*
tar -C "$out" -cJf "$out/bin.tar.xz" bin
rm -rf "$out/bin"
# tests/openai_client.py needs the openai client and its dependencies (the versions it passes
# with here), as wheels for the GPU machine's Python 3.12.
if [ ! -d "$out/wheels" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out/wheels" openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 pydantic==2.13.4 \
    pydantic-core==2.46.4 jiter==0.19.0 anyio==4.16.0 typing-extensions==4.16.0 sniffio \
    annotated-types typing-inspection truststore idna h11
fi
python3 tools/device/tokens.py "$out/tokens2500.safetensors" 2500 1024
du -sh "$out"
