/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of switchyard's programs, pinned by name under the agent's --bpffs
 * directory so that forwarding outlives the agent and a restarted agent reuses them.
 * Sizes are the defaults; the agent may override max_entries when it creates them.
 */
#pragma once

#include "swy.h"

#ifndef LIBBPF_PIN_BY_NAME
#define LIBBPF_PIN_BY_NAME 1
#endif

#define SWY_MAP(map_type, name, key_type, value_type, entries, create_flags) \
	struct {                                                           \
		__uint(type, map_type);                                    \
		__type(key, key_type);                                     \
		__type(value, value_type);                                 \
		__uint(max_entries, entries);                              \
		__uint(map_flags, create_flags);                            \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                       \
	} name SEC(".maps")

/* Written by the agent, read by the programs. Hash maps allocate on update. */
SWY_MAP(BPF_MAP_TYPE_HASH, swy_services, struct swy_svc_key, struct swy_svc_value, 262144,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_HASH, swy_slots, struct swy_slot_key, struct swy_backend, 1048576,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_HASH, swy_maglev, struct swy_maglev_key, struct swy_maglev_chunk, 65536,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_HASH, swy_node_addrs, struct swy_node_addr_key, __u32, 1024,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_LPM_TRIE, swy_ranges, struct swy_range_key, __u8, 65536,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_LPM_TRIE, swy_cidrs, struct swy_cidr_key, __u8, 64, BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_LPM_TRIE, swy_src_addrs, struct swy_src_key, struct swy_src_value, 4096,
	BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_HASH, swy_versions, struct swy_version_key, struct swy_version_value,
	65536, BPF_F_NO_PREALLOC);
SWY_MAP(BPF_MAP_TYPE_ARRAY, swy_config, __u32, struct swy_config, 1, 0);
SWY_MAP(BPF_MAP_TYPE_ARRAY, swy_meta, __u32, struct swy_meta, 1, 0);

/* Written by the programs. */
SWY_MAP(BPF_MAP_TYPE_LRU_HASH, swy_affinity, struct swy_affinity_key,
	struct swy_affinity_value, 65536, 0);
SWY_MAP(BPF_MAP_TYPE_LRU_HASH, swy_sock_rev, struct swy_sock_rev_key,
	struct swy_sock_rev_value, 262144, 0);
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct swy_sock_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} swy_sock_peer SEC(".maps");
SWY_MAP(BPF_MAP_TYPE_LRU_HASH, swy_ct, struct swy_ct_key, struct swy_ct_value, 262144, 0);
