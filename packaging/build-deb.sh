#!/usr/bin/env bash
# Builds the Debian package: the release binary, then the man page and the
# completions it generates, then `cargo deb` (needs `cargo install cargo-deb`).
# Output: target/debian/linkgate_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p linkgate
out=target/packaging
mkdir -p "$out"
target/release/linkgate man | gzip -9n > "$out/linkgate.1.gz"
target/release/linkgate completions bash > "$out/linkgate.bash"
target/release/linkgate completions zsh > "$out/_linkgate"
target/release/linkgate completions fish > "$out/linkgate.fish"
cargo deb -p linkgate --no-build "$@"
