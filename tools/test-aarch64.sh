#!/usr/bin/env bash
# The CPU kernels on aarch64 (NEON): lints the crate for that target, cross-compiles the
# library's unit tests and runs them under qemu-user, installing the cross compiler, qemu and
# the Rust target where they are missing (Debian/Ubuntu). Extra arguments go to the test binary
# (default: the CPU backend's tests; `-- --skip nothing` for all).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  sudo=
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu ||
  rustup target add aarch64-unknown-linux-gnu
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --locked --lib --target $target -- -D warnings
if [ $# -eq 0 ]; then set -- backend::cpu; fi
cargo test --locked --lib --target $target -- "$@"
