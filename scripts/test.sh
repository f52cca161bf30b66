#!/usr/bin/env bash
# Runs every switchyard test: formatting, lints, the Rust unit and integration tests
# (including real packets through iptables rules in network namespaces, so it runs as
# root), the quick side-by-side comparison (scripts/compare.sh --quick: its conformance
# matrix must hold), the Python reflection-client checks against the real controller
# binary, and the deploy checks (every kustomization rendered and validated offline
# against the Kubernetes schemas, flags against the binaries' --help, the Containerfile).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$SWITCHYARD_ROOT"

ensure_debian_packages ca-certificates gcc libc6-dev pkg-config
# The controller's etcd client (etcd-client) compiles etcd's protos with protoc at build
# time, with the well-known types from libprotobuf-dev.
ensure_debian_packages protobuf-compiler libprotobuf-dev
# Controller replicas are tested against a real etcd started on loopback.
ensure_debian_packages etcd-server
# Real-kernel tests: namespaces, iptables (nft and legacy), nft to inspect rule handles,
# conntrack, a socat backend, IPVS and ipset in user-mode Linux; nsenter (util-linux)
# starts agents and probes in a namespace without hiding the cgroup2 mount.
ensure_debian_packages iproute2 iptables nftables conntrack socat user-mode-linux kmod ipset ipvsadm util-linux
# The eBPF agent's programs are C compiled by its build script: clang for -target bpf,
# libbpf's bpf_helpers.h, the kernel UAPI headers.
ensure_debian_packages clang libbpf-dev linux-libc-dev
ensure_rust
ensure_python_clients
# `kubectl kustomize` renders deploy/kubernetes for the deploy tests (Rust and Python).
ensure_kubectl

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
log "cargo test"
cargo test --locked --workspace
log "side by side, quick: the conformance matrix across iptables, IPVS and eBPF must hold (timings only reported)"
"$SWITCHYARD_ROOT/scripts/compare.sh" --quick --out "$SWITCHYARD_CACHE/compare-quick"
log "Python: reflection clients (grpcio) against the controller binary; the deploy manifests and Containerfile"
SWITCHYARD_CONTROLLER="$CARGO_TARGET_DIR/debug/switchyard-controller" \
SWITCHYARD_AGENT="$CARGO_TARGET_DIR/debug/switchyard-agent" \
SWITCHYARD_EXAMPLES="$SWITCHYARD_ROOT/deploy/examples" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider integration/python
