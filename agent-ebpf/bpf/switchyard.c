/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * switchyard's eBPF dataplane: socket-level load balancing for processes in the
 * agent's cgroup (sock.h) and tc translation of traffic from outside the node (nat.h),
 * over the maps the agent writes (maps.h, layout in swy.h).
 */
#include "sock.h"
#include "nat.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
