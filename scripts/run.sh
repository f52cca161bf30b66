#!/usr/bin/env bash
# Runs switchyard on the embedded default, no cluster needed. As root:
#
#   scripts/run.sh [--dataplane iptables|ipvs] [--keep] [demo flags]
#       the demo: the controller on the example cluster in deploy/examples (plus the
#       demo's own Service in deploy/demo), the agent of the dataplane (iptables by
#       default) as node-a in a throwaway node network namespace with three backend
#       namespaces and a client namespace; prints the controller's and the agent's state
#       and requests through a ClusterIP, then removes everything (--keep: stays up until
#       Ctrl-C; --help: the flags). With ipvs on a kernel without IPVS, the demo runs in
#       user-mode Linux.
#
#   scripts/run.sh --controller-only [controller flags]
#       the controller alone on deploy/examples, on 127.0.0.1:9740 (Ctrl-C stops it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$SWITCHYARD_ROOT"

ensure_debian_packages ca-certificates gcc libc6-dev pkg-config
# The controller's etcd client (etcd-client) compiles etcd's protos with protoc at build
# time, with the well-known types from libprotobuf-dev.
ensure_debian_packages protobuf-compiler libprotobuf-dev
# Building the eBPF agent (cargo build -p switchyard-agent-ebpf) compiles its programs
# with clang (-target bpf) against libbpf's and the kernel's headers.
ensure_debian_packages clang libbpf-dev linux-libc-dev
ensure_rust

if [[ "${1:-}" == "--controller-only" ]]; then
  shift
  log "building switchyard-controller"
  cargo build --release --locked -p switchyard-controller
  exec "$CARGO_TARGET_DIR/release/switchyard-controller" --manifests deploy/examples "$@"
fi

# The demo: namespaces (iproute2), the agents' iptables-restore / iptables-save and
# UDP conntrack cleanup (iptables, conntrack); the IPVS agent's sets (ipset), and
# user-mode Linux for it where the kernel has no IPVS (user-mode-linux, kmod, ipvsadm).
ensure_debian_packages iproute2 iptables conntrack
if [[ " $* " == *" ipvs "* || " $* " == *"--dataplane=ipvs"* ]]; then
  ensure_debian_packages ipset ipvsadm user-mode-linux kmod
fi
log "building switchyard-controller, the agents, swy-backend, switchyard-demo"
cargo build --release --locked -p switchyard-controller -p switchyard-agent-iptables \
  -p switchyard-agent-ipvs -p switchyard-integration --bin switchyard-controller \
  --bin switchyard-agent-iptables --bin switchyard-agent-ipvs --bin swy-backend \
  --bin switchyard-demo
exec "$CARGO_TARGET_DIR/release/switchyard-demo" "$@"
