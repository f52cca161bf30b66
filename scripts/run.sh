#!/usr/bin/env bash
# Runs the switchyard controller on the embedded default: the example manifests in
# deploy/examples, no cluster needed. Extra arguments go to the controller
# (try --help). Stop it with Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$SWITCHYARD_ROOT"

ensure_debian_packages ca-certificates gcc libc6-dev pkg-config
ensure_rust
log "building switchyard-controller"
cargo build --release --locked -p switchyard-controller
exec "$CARGO_TARGET_DIR/release/switchyard-controller" --manifests deploy/examples "$@"
