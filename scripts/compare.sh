#!/usr/bin/env bash
# Measures the three dataplanes side by side and writes a report. As root:
#
#   scripts/compare.sh [--quick] [--out DIR] [switchyard-compare flags]
#       the same cluster state and workload through iptables, IPVS and eBPF: all three
#       in one user-mode Linux guest (one kernel; eBPF interpreted there) and, on this
#       machine's kernel, iptables and eBPF (JIT). Writes DIR/report.md (default
#       compare-report/), SVG charts and results.json beside it, and prints where.
#       The full run (0, 1k and 10k Services, 3 interleaved rounds, release build) is a
#       benchmark and took 45 minutes on 2 cores; --quick (0 and 1k Services, one
#       short round, dev build) takes a few minutes and is part of scripts/test.sh.
#       Exits 1 when the dataplanes disagree on a conformance scenario or a figure could
#       not be taken; timings never fail it. --help: every flag.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$SWITCHYARD_ROOT"

ensure_debian_packages ca-certificates gcc libc6-dev pkg-config
# The controller's etcd client (etcd-client) compiles etcd's protos with protoc at build
# time, with the well-known types from libprotobuf-dev.
ensure_debian_packages protobuf-compiler libprotobuf-dev
# Namespaces, both netfilter dataplanes' tools, conntrack, user-mode Linux (with kmod
# for its modules), nsenter (util-linux); the eBPF programs' compiler and headers.
ensure_debian_packages iproute2 iptables nftables conntrack user-mode-linux kmod ipset ipvsadm \
  util-linux clang libbpf-dev linux-libc-dev
ensure_rust

profile=release
for arg in "$@"; do
  # --help needs no optimised build (the release one takes minutes on 2 cores).
  [[ "$arg" == "--quick" || "$arg" == "--help" || "$arg" == "-h" ]] && profile=dev
done
log "building switchyard-agent, swy-backend, swy-probe, switchyard-compare ($profile)"
build=(cargo build --locked -p switchyard-agent -p switchyard-integration --bin switchyard-agent
  --bin swy-backend --bin swy-probe --bin switchyard-compare)
if [[ "$profile" == release ]]; then
  build+=(--release)
  dir=release
else
  dir=debug
fi
"${build[@]}"
exec "$CARGO_TARGET_DIR/$dir/switchyard-compare" "$@"
