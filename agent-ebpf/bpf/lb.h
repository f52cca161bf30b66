/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup and backend choice, shared by the socket and the tc programs: one
 * service entry read, then one slot of its range (random, or through its Maglev table),
 * with ClientIP affinity first when the entry asks for it.
 *
 * Make-before-break: the agent writes a new range (slots, Maglev table) under a fresh
 * `rev`, then replaces the service entry in one map update, then deletes the old range.
 * A reader that loaded the old entry just before the swap may find its slot gone; it
 * reads the entry again and retries once, so it never sees a half-written Service.
 */
#pragma once

#include <bpf/bpf_endian.h>

#include "maps.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* How far a range is searched for a backend remembered by affinity or a UDP flow. */
#define SWY_SCAN_MAX 64

static __always_inline void addr_set_v4(__be32 out[4], __be32 ip)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0xffff);
	out[3] = ip;
}

static __always_inline int addr_is_v4(const __be32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_eq(const __be32 a[4], const __be32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr_copy(__be32 dst[4], const __be32 src[4])
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* The node-port form of an address: the family's "any" (IPv4-mapped for IPv4). */
static __always_inline void addr_any_like(__be32 a[4])
{
	if (addr_is_v4(a)) {
		a[3] = 0;
	} else {
		a[0] = 0;
		a[1] = 0;
		a[2] = 0;
		a[3] = 0;
	}
}

/* The murmur3 finalizer: spreads every input bit over the result. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 hash_add(__u32 h, __u32 v)
{
	return mix32(h ^ (v * 0x9e3779b1));
}

static __always_inline __u32 hash_addr(__u32 h, const __be32 a[4])
{
	h = hash_add(h, a[0]);
	h = hash_add(h, a[1]);
	h = hash_add(h, a[2]);
	return hash_add(h, a[3]);
}

/* The IPv4 and IPv6 headers, as far as the programs read them. */
struct swy_ip4 {
	__u8 vihl;
	__u8 tos;
	__be16 len;
	__be16 id;
	__be16 frag;
	__u8 ttl;
	__u8 proto;
	__u16 check;
	__be32 saddr;
	__be32 daddr;
};

struct swy_ip6 {
	__be32 flow;
	__be16 len;
	__u8 next;
	__u8 hop;
	__be32 saddr[4];
	__be32 daddr[4];
};

struct swy_choice {
	struct swy_svc_value svc;
	struct swy_backend backend;
	__u32 slot;
};

/* Outcomes of lb_lookup. */
#define SWY_MISS 0       /* not a Service address */
#define SWY_CHOSEN 1     /* forward to choice->backend */
#define SWY_VERDICT 2    /* reject or drop, as choice->svc.action says */
#define SWY_NO_BACKEND 3 /* the range changed twice under the reader; never seen in practice */

static __always_inline struct swy_backend *slot_backend(__u32 rev, __u32 slot)
{
	struct swy_slot_key key = { .rev = rev, .slot = slot };

	return bpf_map_lookup_elem(&swy_slots, &key);
}

/* The slot of `svc`'s range holding addr:port, or -1 (searching SWY_SCAN_MAX slots). */
static __always_inline int find_in_range(const struct swy_svc_value *svc, const __be32 addr[4],
					 __be16 port)
{
	for (__u32 i = 0; i < SWY_SCAN_MAX; i++) {
		if (i >= svc->count)
			break;
		struct swy_backend *b = slot_backend(svc->rev, i);
		if (b && b->port == port && addr_eq(b->addr, addr))
			return i;
	}
	return -1;
}

/* A slot of the range: through the Maglev table by `hash`, or uniformly at random. */
static __always_inline int pick_slot(const struct swy_svc_value *svc, __u32 hash)
{
	if (svc->flags & SWY_F_MAGLEV) {
		__u32 m = svc->maglev_size;
		if (m == 0)
			return -1;
		__u32 idx = hash % m;
		struct swy_maglev_key key = { .rev = svc->rev, .chunk = idx / SWY_MAGLEV_CHUNK };
		struct swy_maglev_chunk *chunk = bpf_map_lookup_elem(&swy_maglev, &key);
		if (!chunk)
			return -1;
		__u32 slot = chunk->slot[idx & (SWY_MAGLEV_CHUNK - 1)];
		if (slot >= svc->count)
			return -1;
		return slot;
	}
	return bpf_get_prandom_u32() % svc->count;
}

/* Chooses a backend of c->svc's range for `client`: its affinity if still valid, else a
 * fresh pick (remembered for affinity). Returns 0, or -1 when the range is gone. */
static __always_inline int choose(struct swy_choice *c, const __be32 client[4], __u32 hash)
{
	struct swy_affinity_key akey = {};
	__u64 now = 0;
	int affinity = c->svc.flags & SWY_F_AFFINITY;

	if (affinity) {
		addr_copy(akey.client, client);
		akey.affinity_id = c->svc.affinity_id;
		now = bpf_ktime_get_ns();
		struct swy_affinity_value *a = bpf_map_lookup_elem(&swy_affinity, &akey);
		if (a && now - a->last_ns <= (__u64)c->svc.affinity_timeout * 1000000000ULL) {
			int slot = -1;
			if (a->rev == c->svc.rev && a->slot < c->svc.count)
				slot = a->slot;
			else
				slot = find_in_range(&c->svc, a->addr, a->port);
			if (slot >= 0) {
				struct swy_backend *b = slot_backend(c->svc.rev, slot);
				if (b && b->port == a->port && addr_eq(b->addr, a->addr)) {
					c->backend = *b;
					c->slot = slot;
					a->rev = c->svc.rev;
					a->slot = slot;
					a->last_ns = now;
					return 0;
				}
			}
		}
	}
	int slot = pick_slot(&c->svc, hash);
	if (slot < 0)
		return -1;
	struct swy_backend *b = slot_backend(c->svc.rev, slot);
	if (!b)
		return -1;
	c->backend = *b;
	c->slot = slot;
	if (affinity) {
		struct swy_affinity_value value = {
			.port = b->port,
			.rev = c->svc.rev,
			.slot = slot,
			.last_ns = now,
		};
		addr_copy(value.addr, b->addr);
		bpf_map_update_elem(&swy_affinity, &akey, &value, BPF_ANY);
	}
	return 0;
}

/* Looks `key` up and chooses a backend; see the SWY_* outcomes. */
static __always_inline int lb_lookup(const struct swy_svc_key *key, const __be32 client[4],
				     __u32 hash, struct swy_choice *c)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		struct swy_svc_value *svc = bpf_map_lookup_elem(&swy_services, key);
		if (!svc)
			return SWY_MISS;
		c->svc = *svc;
		if (c->svc.action != SWY_ACT_FORWARD || c->svc.count == 0)
			return SWY_VERDICT;
		if (choose(c, client, hash) == 0)
			return SWY_CHOSEN;
	}
	return SWY_NO_BACKEND;
}

/* Whether `addr` is one of the node's addresses that answer node ports. */
static __always_inline int is_nodeport_addr(const __be32 addr[4])
{
	struct swy_node_addr_key key = {};

	addr_copy(key.addr, addr);
	__u32 *flags = bpf_map_lookup_elem(&swy_node_addrs, &key);
	return flags && (*flags & SWY_NODE_F_NODEPORT);
}

/* lb_lookup on the exact address, then on the node-port entry when the address is the
 * node's. `key` is left as the entry that matched. */
static __always_inline int lb_lookup_vip(struct swy_svc_key *key, const __be32 client[4],
					 __u32 hash, struct swy_choice *c)
{
	int outcome = lb_lookup(key, client, hash, c);

	if (outcome != SWY_MISS || !is_nodeport_addr(key->addr))
		return outcome;
	addr_any_like(key->addr);
	return lb_lookup(key, client, hash, c);
}
