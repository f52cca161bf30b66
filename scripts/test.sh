#!/usr/bin/env bash
# Runs every switchyard test: formatting, lints, the Rust unit and integration tests
# (including real packets through iptables rules in network namespaces, so it runs as
# root), and the Python reflection-client checks against the real controller binary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$SWITCHYARD_ROOT"

ensure_debian_packages ca-certificates gcc libc6-dev pkg-config
# Real-kernel tests: namespaces, iptables (nft and legacy), nft to inspect rule handles,
# conntrack, a socat backend.
ensure_debian_packages iproute2 iptables nftables conntrack socat user-mode-linux kmod ipset ipvsadm
ensure_rust
ensure_python_clients

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
log "cargo test"
cargo test --locked --workspace
log "reflection clients (Python grpcio) against the controller binary"
SWITCHYARD_CONTROLLER="$CARGO_TARGET_DIR/debug/switchyard-controller" \
SWITCHYARD_EXAMPLES="$SWITCHYARD_ROOT/deploy/examples" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider integration/python
