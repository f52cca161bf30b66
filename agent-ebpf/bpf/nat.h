/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Traffic from outside the node (tc on the --devices): node ports, external IPs,
 * load-balancer IPs (and cluster IPs routed through the node) are translated to a
 * backend, with connection tracking in an LRU map and the reverse translation of replies.
 *
 * Ingress, per packet: a reply of a tracked flow is translated back (source: the Service
 * address; destination: the client, when the flow was source-NATed) and sent on; a later
 * packet of a tracked flow follows its entry; a new flow to a Service address gets a
 * backend, source NAT to the node unless the entry keeps the source (eTP Local), and two
 * entries (forward and reply). Translated packets are routed with bpf_fib_lookup and
 * sent with bpf_redirect_neigh, except to a local destination, which goes up the stack.
 * Egress translates back replies that went through the stack (a backend on the node
 * itself, or behind a device without this program).
 *
 * Rejecting entries answer ICMP port unreachable; dropping ones and load-balancer source
 * ranges drop. TCP and UDP over IPv4 and IPv6 without extension headers; fragments and
 * SCTP pass untouched (SCTP is balanced at the socket level only).
 */
#pragma once

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>

#include "lb.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef BPF_FIB_LOOKUP_SRC
#define BPF_FIB_LOOKUP_SRC (1U << 4)
#endif

#define SWY_EINVAL 22

#define SWY_TCP_SYN 0x02
#define SWY_TCP_ACK 0x10
/* Not a verdict: the packet goes on to the next step. */
#define SWY_CONTINUE (-2)
/* Not a verdict: the entry program answers with reject(). Called from there, not from
 * new_flow, so the two frames never stack: the three of them would pass the 512 bytes
 * the verifier allows a call chain. */
#define SWY_REJECT (-3)
/* Ports tried for one source-NATed flow before it is dropped. */
#define SWY_SNAT_TRIES 8

/* Room for building an ICMP answer, off the 512-byte stack. */
struct swy_reject_buf {
	__u8 quote[48];
	__u8 head[48];
	__be32 pseudo[10];
	__u8 macs[12];
	__u8 swapped[12];
};

/* A new flow's lookup and conntrack entries, off the stack. */
struct swy_new_flow {
	struct swy_svc_key key;
	struct swy_choice c;
	struct swy_ct_value fwd;
	struct swy_ct_value rev;
	struct swy_ct_key fkey;
	struct swy_ct_key rkey;
	struct swy_src_key src;
};

struct swy_scratch {
	struct swy_reject_buf reject;
	struct swy_new_flow flow;
};

/* Per-CPU scratch space: programs run to completion on one CPU, without preemption. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct swy_scratch);
	__uint(max_entries, 1);
} swy_scratch SEC(".maps");

struct swy_flow {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 v6;
	__u8 tcp_flags;
	__u8 pad;
	__u32 l3off;
	__u32 l4off;
};

static __always_inline int flow_parse(struct __sk_buff *skb, struct swy_flow *f)
{
	f->l3off = ETH_HLEN;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct swy_ip4 ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		if ((ip.vihl >> 4) != 4 || (ip.vihl & 0xf) < 5)
			return -1;
		/* A fragment (MF set or an offset) carries no usable ports. */
		if (ip.frag & bpf_htons(0x3fff))
			return -1;
		addr_set_v4(f->src, ip.saddr);
		addr_set_v4(f->dst, ip.daddr);
		f->proto = ip.proto;
		f->v6 = 0;
		f->l4off = ETH_HLEN + (ip.vihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct swy_ip6 ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		addr_copy(f->src, ip6.saddr);
		addr_copy(f->dst, ip6.daddr);
		f->proto = ip6.next;
		f->v6 = 1;
		f->l4off = ETH_HLEN + sizeof(ip6);
	} else {
		return -1;
	}
	if (f->proto == IPPROTO_TCP) {
		__u8 tcp[14];
		if (bpf_skb_load_bytes(skb, f->l4off, tcp, sizeof(tcp)))
			return -1;
		f->sport = *(__be16 *)&tcp[0];
		f->dport = *(__be16 *)&tcp[2];
		f->tcp_flags = tcp[13];
	} else if (f->proto == IPPROTO_UDP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, f->l4off, ports, sizeof(ports)))
			return -1;
		f->sport = ports[0];
		f->dport = ports[1];
		f->tcp_flags = 0;
	} else {
		return -1;
	}
	return 0;
}

static __always_inline __u32 csum_off(const struct swy_flow *f)
{
	return f->l4off + (f->proto == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u64 l4_flags(const struct swy_flow *f)
{
	return f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrites the source (dst = 0) or destination address and port, checksums included. */
static __always_inline int flow_set(struct __sk_buff *skb, struct swy_flow *f, int dst,
				    const __be32 addr[4], __be16 port)
{
	__be32 *old = dst ? f->dst : f->src;
	__be16 *old_port = dst ? &f->dport : &f->sport;

	if (!f->v6) {
		__be32 from = old[3], to = addr[3];
		if (from != to) {
			if (bpf_l4_csum_replace(skb, csum_off(f), from, to,
						BPF_F_PSEUDO_HDR | l4_flags(f) | sizeof(to)))
				return -1;
			if (bpf_l3_csum_replace(skb, f->l3off + 10, from, to, sizeof(to)))
				return -1;
			if (bpf_skb_store_bytes(skb, f->l3off + (dst ? 16 : 12), &to, sizeof(to), 0))
				return -1;
		}
	} else if (!addr_eq(old, addr)) {
		__be32 from[4], to[4];
		addr_copy(from, old);
		addr_copy(to, addr);
		__s64 diff = bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);
		if (bpf_l4_csum_replace(skb, csum_off(f), 0, diff, BPF_F_PSEUDO_HDR | l4_flags(f)))
			return -1;
		if (bpf_skb_store_bytes(skb, f->l3off + (dst ? 24 : 8), to, sizeof(to), 0))
			return -1;
	}
	if (*old_port != port) {
		if (bpf_l4_csum_replace(skb, csum_off(f), *old_port, port,
					l4_flags(f) | sizeof(port)))
			return -1;
		if (bpf_skb_store_bytes(skb, f->l4off + (dst ? 2 : 0), &port, sizeof(port), 0))
			return -1;
	}
	addr_copy(old, addr);
	*old_port = port;
	return 0;
}

/* Routes the (translated) flow with bpf_fib_lookup(flags): afterwards p->ifindex is the
 * way out, the destination field the next hop, and with BPF_FIB_LOOKUP_SRC the source
 * field the node's address for the way there. Returns the lookup's result. */
static __always_inline int flow_route(struct __sk_buff *skb, const struct swy_flow *f,
				      struct bpf_fib_lookup *p, __u32 flags)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	p->l4_protocol = f->proto;
	p->sport = f->sport;
	p->dport = f->dport;
	if (!f->v6) {
		p->family = AF_INET;
		p->ipv4_src = f->src[3];
		p->ipv4_dst = f->dst[3];
	} else {
		p->family = AF_INET6;
		addr_copy(p->ipv6_src, f->src);
		addr_copy(p->ipv6_dst, f->dst);
	}
	return bpf_fib_lookup(skb, p, sizeof(*p), flags);
}

static __always_inline int route_found(int rc)
{
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
}

/* Sends a translated packet on its way: redirected to the device the route names, or
 * up the stack when the destination is local or the route is not a plain forward. */
static __always_inline int flow_send(struct __sk_buff *skb, const struct swy_flow *f)
{
	struct bpf_fib_lookup p;

	if (route_found(flow_route(skb, f, &p, 0)))
		return bpf_redirect_neigh(p.ifindex, 0, 0, 0);
	return TC_ACT_OK;
}

/* swy_src_addrs' entry for `key`, if it is of the family (a device's IPv6 default, at
 * prefix 32, also covers IPv4-mapped next hops). */
static __always_inline struct swy_src_value *src_lookup(const struct swy_src_key *key, int v6)
{
	struct swy_src_value *src = bpf_map_lookup_elem(&swy_src_addrs, key);

	return src && addr_is_v4(src->addr) != v6 ? src : 0;
}

/* The node address a source-NATed flow (already translated to its backend) leaves
 * with: bpf_fib_lookup's (SWY_CFG_F_FIB_SRC, Linux 6.7), else swy_src_addrs' for the
 * device and next hop of its route. 0, or -1 when there is none (the flow is dropped). */
static __always_inline int snat_source(struct __sk_buff *skb, const struct swy_flow *f,
				       __u32 config_flags, struct swy_src_key *key,
				       __be32 node[4])
{
	struct bpf_fib_lookup p;
	int fib_src = config_flags & SWY_CFG_F_FIB_SRC;

	if (!route_found(flow_route(skb, f, &p, fib_src ? BPF_FIB_LOOKUP_SRC : 0)))
		return -1;
	if (fib_src) {
		if (!f->v6)
			addr_set_v4(node, p.ipv4_src);
		else
			addr_copy(node, p.ipv6_src);
		return 0;
	}
	key->prefixlen = 32 + 128;
	key->ifindex = p.ifindex;
	if (!f->v6)
		addr_set_v4(key->addr, p.ipv4_dst);
	else
		addr_copy(key->addr, p.ipv6_dst);
	struct swy_src_value *src = src_lookup(key, f->v6);
	if (!src) {
		/* The device has no address of the family: the node's first one. */
		key->ifindex = SWY_SRC_ANY_DEVICE;
		src = src_lookup(key, f->v6);
	}
	if (!src)
		return -1;
	addr_copy(node, src->addr);
	return 0;
}

static __always_inline void ct_key_of(struct swy_ct_key *key, const __be32 src[4], const __be32 dst[4],
				      __be16 sport, __be16 dport, __u8 proto)
{
	addr_copy(key->src, src);
	addr_copy(key->dst, dst);
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->pad[0] = 0;
	key->pad[1] = 0;
	key->pad[2] = 0;
}

static __always_inline void ct_key(struct swy_ct_key *key, const struct swy_flow *f)
{
	ct_key_of(key, f->src, f->dst, f->sport, f->dport, f->proto);
}

static __always_inline __u16 csum_fold(__u64 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return ~csum;
}

struct swy_icmp4 {
	struct swy_ip4 ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
};

struct swy_icmp6 {
	struct swy_ip6 ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
};

struct swy_quote4 {
	struct swy_ip4 ip;
	__u8 l4[8];
};

struct swy_quote6 {
	struct swy_ip6 ip;
	__u8 l4[8];
};

struct swy_pseudo6 {
	__be32 src[4];
	__be32 dst[4];
	__be32 len;
	__be32 next;
};

/* Turns the packet into an ICMP (v4) or ICMPv6 port unreachable for its sender and
 * sends it back out the device it came from: a rejecting entry's answer, as iptables
 * REJECT gives. The quoted header keeps what the sender sent. */
static __noinline int reject(struct __sk_buff *skb, const struct swy_flow *f)
{
	__u32 zero = 0;
	struct swy_scratch *scratch = bpf_map_lookup_elem(&swy_scratch, &zero);
	__u32 head_len, quote_len;
	__s64 sum;

	if (!scratch)
		return TC_ACT_SHOT;
	struct swy_reject_buf *b = &scratch->reject;
	if (bpf_skb_load_bytes(skb, 0, b->macs, sizeof(b->macs)))
		return TC_ACT_SHOT;
	if (!f->v6) {
		struct swy_quote4 *quote = (void *)b->quote;
		struct swy_icmp4 *head = (void *)b->head;
		if (f->l4off != ETH_HLEN + sizeof(struct swy_ip4))
			return TC_ACT_SHOT;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(*quote)))
			return TC_ACT_SHOT;
		__builtin_memset(head, 0, sizeof(*head));
		head->ip.vihl = 0x45;
		head->ip.len = bpf_htons(sizeof(*head) + sizeof(*quote));
		head->ip.ttl = 64;
		head->ip.proto = IPPROTO_ICMP;
		head->ip.saddr = quote->ip.daddr;
		head->ip.daddr = quote->ip.saddr;
		head->ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&head->ip, sizeof(head->ip), 0));
		head->type = 3; /* destination unreachable */
		head->code = 3; /* port unreachable */
		sum = bpf_csum_diff(0, 0, (__be32 *)&head->type, 8, 0);
		sum = bpf_csum_diff(0, 0, (__be32 *)quote, sizeof(*quote), sum);
		head->check = csum_fold(sum);
		head_len = sizeof(*head);
		quote_len = sizeof(*quote);
	} else {
		struct swy_quote6 *quote = (void *)b->quote;
		struct swy_icmp6 *head = (void *)b->head;
		struct swy_pseudo6 *pseudo = (void *)b->pseudo;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(*quote)))
			return TC_ACT_SHOT;
		__u32 len = 8 + sizeof(*quote);
		__builtin_memset(head, 0, sizeof(*head));
		head->ip.flow = bpf_htonl(0x60000000);
		head->ip.len = bpf_htons(len);
		head->ip.next = 58; /* ICMPv6 */
		head->ip.hop = 64;
		addr_copy(head->ip.saddr, quote->ip.daddr);
		addr_copy(head->ip.daddr, quote->ip.saddr);
		head->type = 1; /* destination unreachable */
		head->code = 4; /* port unreachable */
		addr_copy(pseudo->src, head->ip.saddr);
		addr_copy(pseudo->dst, head->ip.daddr);
		pseudo->len = bpf_htonl(len);
		pseudo->next = bpf_htonl(58);
		sum = bpf_csum_diff(0, 0, (__be32 *)pseudo, sizeof(*pseudo), 0);
		sum = bpf_csum_diff(0, 0, (__be32 *)&head->type, 8, sum);
		sum = bpf_csum_diff(0, 0, (__be32 *)quote, sizeof(*quote), sum);
		head->check = csum_fold(sum);
		head_len = sizeof(*head);
		quote_len = sizeof(*quote);
	}
	for (int i = 0; i < 6; i++) {
		b->swapped[i] = b->macs[6 + i];
		b->swapped[6 + i] = b->macs[i];
	}
	if (bpf_skb_change_tail(skb, ETH_HLEN + head_len + quote_len, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, b->swapped, sizeof(b->swapped), 0))
		return TC_ACT_SHOT;
	if (!f->v6) {
		if (bpf_skb_store_bytes(skb, ETH_HLEN, b->head, sizeof(struct swy_icmp4), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct swy_icmp4), b->quote,
					sizeof(struct swy_quote4), 0))
			return TC_ACT_SHOT;
	} else {
		if (bpf_skb_store_bytes(skb, ETH_HLEN, b->head, sizeof(struct swy_icmp6), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct swy_icmp6), b->quote,
					sizeof(struct swy_quote6), 0))
			return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* Whether `addr` is inside one of the cluster CIDRs (--cluster-cidr). */
static __always_inline int in_cluster_cidr(const __be32 addr[4])
{
	struct swy_cidr_key key = { .prefixlen = 128 };

	addr_copy(key.addr, addr);
	return bpf_map_lookup_elem(&swy_cidrs, &key) != 0;
}

/* Whether a load-balancer source range of Service `res_id` admits `addr`. */
static __always_inline int in_source_ranges(__u32 res_id, const __be32 addr[4])
{
	struct swy_range_key key = { .prefixlen = 32 + 128, .res_id = res_id };

	addr_copy(key.addr, addr);
	return bpf_map_lookup_elem(&swy_ranges, &key) != 0;
}

/* Translates a reply of a tracked flow back; `route` sends it on from ingress. */
static __always_inline int reply_xlate(struct __sk_buff *skb, struct swy_flow *f,
				       const struct swy_ct_value *ct, int route)
{
	struct swy_ct_value v = *ct;

	if (flow_set(skb, f, 0, v.addr, v.port))
		return TC_ACT_SHOT;
	if ((v.flags & SWY_CT_F_SNAT) && flow_set(skb, f, 1, v.addr2, v.port2))
		return TC_ACT_SHOT;
	return route ? flow_send(skb, f) : TC_ACT_OK;
}

/* Sends a later packet of a tracked flow where its first one went. */
static __always_inline int forward_xlate(struct __sk_buff *skb, struct swy_flow *f,
					 const struct swy_ct_value *ct)
{
	struct swy_ct_value v = *ct;

	if (flow_set(skb, f, 1, v.addr, v.port))
		return TC_ACT_SHOT;
	if ((v.flags & SWY_CT_F_SNAT) && flow_set(skb, f, 0, v.addr2, v.port2))
		return TC_ACT_SHOT;
	return flow_send(skb, f);
}

/* A new flow to a Service address: choose, track, translate, send. TC_ACT_UNSPEC (-1)
 * when the packet is no Service's, SWY_REJECT when it is to be answered with reject(). */
static __noinline int new_flow(struct __sk_buff *skb, struct swy_flow *f)
{
	__u32 zero = 0;
	struct swy_scratch *scratch = bpf_map_lookup_elem(&swy_scratch, &zero);
	struct swy_config *config = bpf_map_lookup_elem(&swy_config, &zero);

	struct swy_svc_key probe = { .port = f->dport, .proto = f->proto, .scope = SWY_SCOPE_EXT };

	/* Most packets are no Service's: tell them apart with one lookup on the stack. */
	addr_copy(probe.addr, f->dst);
	if (!bpf_map_lookup_elem(&swy_services, &probe) && !is_nodeport_addr(f->dst))
		return TC_ACT_UNSPEC;
	if (!scratch || !config)
		return TC_ACT_UNSPEC;
	struct swy_new_flow *n = &scratch->flow;
	/* The flow's hash: what Maglev picks by and where source ports are tried from. */
	__u32 hash = hash_addr(hash_addr(hash_add(hash_add(0, f->proto), ((__u32)f->sport << 16) | f->dport),
					 f->src), f->dst);

	__builtin_memset(&n->fwd, 0, sizeof(n->fwd));
	__builtin_memset(&n->rev, 0, sizeof(n->rev));
	addr_copy(n->key.addr, f->dst);
	n->key.port = f->dport;
	n->key.proto = f->proto;
	n->key.scope = SWY_SCOPE_EXT;
	int outcome = lb_lookup_vip(&n->key, f->src, hash, &n->c);
	if (outcome == SWY_MISS)
		return TC_ACT_UNSPEC;
	if ((n->c.svc.flags & SWY_F_SRC_RANGES) && !in_source_ranges(n->c.svc.res_id, f->src))
		return TC_ACT_SHOT;
	int from_pod = in_cluster_cidr(f->src);
	if ((n->c.svc.flags & SWY_F_POD_SET) && from_pod) {
		n->key.scope = SWY_SCOPE_EXT_POD;
		outcome = lb_lookup(&n->key, f->src, hash, &n->c);
		if (outcome == SWY_MISS)
			return TC_ACT_SHOT;
	}
	if (outcome == SWY_VERDICT && n->c.svc.action == SWY_ACT_REJECT)
		return SWY_REJECT;
	if (outcome != SWY_CHOSEN)
		return TC_ACT_SHOT;

	int snat = (n->c.svc.flags & SWY_F_SNAT) ||
		   ((n->c.svc.flags & SWY_F_SNAT_NON_POD) && !from_pod) ||
		   addr_eq(n->c.backend.addr, f->src);
	addr_copy(n->fwd.addr, n->c.backend.addr);
	n->fwd.port = n->c.backend.port;
	n->fwd.dir = SWY_CT_FORWARD;
	n->rev.dir = SWY_CT_REPLY;
	addr_copy(n->rev.addr, f->dst);
	n->rev.port = f->dport;
	addr_copy(n->rev.addr2, f->src);
	n->rev.port2 = f->sport;
	ct_key(&n->fkey, f);
	if (flow_set(skb, f, 1, n->c.backend.addr, n->c.backend.port))
		return TC_ACT_SHOT;
	if (snat) {
		__be32 node[4] = {};
		if (config->snat_port_max <= config->snat_port_min)
			return TC_ACT_SHOT;
		if (snat_source(skb, f, config->flags, &n->src, node))
			return TC_ACT_SHOT;
		__u32 span = config->snat_port_max - config->snat_port_min + 1;
		__be16 snat_port = 0;
		n->rev.flags = SWY_CT_F_SNAT;
		/* Unrolled: Linux 6.1's verifier refuses a loop whose back-edge clang lays out
		 * as a fall-through into the loop head ("back-edge from insn N to N+1"). */
#pragma unroll
		for (int i = 0; i < SWY_SNAT_TRIES; i++) {
			__be16 candidate = bpf_htons(config->snat_port_min + (mix32(hash + i) % span));
			ct_key_of(&n->rkey, n->c.backend.addr, node, n->c.backend.port, candidate,
				  f->proto);
			if (bpf_map_update_elem(&swy_ct, &n->rkey, &n->rev, BPF_NOEXIST) == 0) {
				snat_port = candidate;
				break;
			}
		}
		if (!snat_port)
			return TC_ACT_SHOT;
		n->fwd.flags = SWY_CT_F_SNAT;
		addr_copy(n->fwd.addr2, node);
		n->fwd.port2 = snat_port;
		if (flow_set(skb, f, 0, node, snat_port))
			return TC_ACT_SHOT;
	} else {
		ct_key_of(&n->rkey, n->c.backend.addr, f->src, n->c.backend.port, f->sport, f->proto);
		bpf_map_update_elem(&swy_ct, &n->rkey, &n->rev, BPF_ANY);
	}
	bpf_map_update_elem(&swy_ct, &n->fkey, &n->fwd, BPF_ANY);
	return flow_send(skb, f);
}

/* What both directions do first: parse, and translate a reply of a tracked flow back
 * (routing it on at ingress). Returns the verdict, or SWY_CONTINUE to go on with `*ct`
 * (the flow's forward entry, if any); TC_ACT_OK for what cannot be a flow of ours. */
static __always_inline int tc_reply(struct __sk_buff *skb, struct swy_flow *f,
				    struct swy_ct_value **ct, int ingress)
{
	struct swy_ct_key key;

	*ct = 0;
	if (flow_parse(skb, f))
		return TC_ACT_OK;
	/* A connection arriving on the reverse of a tracked reply tuple (a client that
	 * talked to a Service keeping its address now connecting to the backend itself
	 * from the same port) ends the old flow: its reply entry would turn this
	 * connection's answers into the Service's. Entries live until the LRU evicts them,
	 * so without this a reused port meets a flow long closed. Only at ingress: on the
	 * way out, a SYN with that tuple is the translated first packet of the very flow
	 * the entry was just made for. */
	if (ingress && f->proto == IPPROTO_TCP &&
	    (f->tcp_flags & (SWY_TCP_SYN | SWY_TCP_ACK)) == SWY_TCP_SYN) {
		ct_key_of(&key, f->dst, f->src, f->dport, f->sport, f->proto);
		struct swy_ct_value *stale = bpf_map_lookup_elem(&swy_ct, &key);
		if (stale && stale->dir == SWY_CT_REPLY)
			bpf_map_delete_elem(&swy_ct, &key);
	}
	ct_key(&key, f);
	*ct = bpf_map_lookup_elem(&swy_ct, &key);
	if (*ct && (*ct)->dir == SWY_CT_REPLY)
		return reply_xlate(skb, f, *ct, ingress);
	return SWY_CONTINUE;
}

SEC("classifier")
int swy_tc_ingress(struct __sk_buff *skb)
{
	struct swy_flow f = {};
	struct swy_ct_value *ct;
	int verdict = tc_reply(skb, &f, &ct, 1);

	if (verdict != SWY_CONTINUE)
		return verdict;
	/* A new connection on a tracked tuple (a client reusing its port) is a new flow. */
	int syn = f.proto == IPPROTO_TCP && (f.tcp_flags & (SWY_TCP_SYN | SWY_TCP_ACK)) == SWY_TCP_SYN;
	if (ct && !syn)
		return forward_xlate(skb, &f, ct);
	/* Mid-stream TCP that no entry here tracks is a flow someone else translated: one
	 * netfilter or IPVS took before this node switched to eBPF, whose conntrack or IPVS
	 * entry still holds its endpoint. Balancing it afresh would send the rest of the
	 * connection to an endpoint that never saw its SYN (a reset); passing it on keeps
	 * it where it is. */
	if (!ct && f.proto == IPPROTO_TCP && !(f.tcp_flags & SWY_TCP_SYN))
		return TC_ACT_OK;
	verdict = new_flow(skb, &f);
	if (verdict == SWY_REJECT)
		return reject(skb, &f);
	return verdict == TC_ACT_UNSPEC ? TC_ACT_OK : verdict;
}

SEC("classifier")
int swy_tc_egress(struct __sk_buff *skb)
{
	struct swy_flow f = {};
	struct swy_ct_value *ct;
	int verdict = tc_reply(skb, &f, &ct, 0);

	return verdict == SWY_CONTINUE ? TC_ACT_OK : verdict;
}

/* Never attached: the agent runs it once (BPF_PROG_TEST_RUN) to learn whether
 * bpf_fib_lookup knows BPF_FIB_LOOKUP_SRC (Linux 6.7; older kernels refuse the unknown
 * flag with -EINVAL before looking anything up). 1 when it does. */
SEC("classifier")
int swy_probe_fib_src(struct __sk_buff *skb)
{
	struct bpf_fib_lookup p = {};

	p.family = AF_INET;
	p.ifindex = 1; /* loopback, in every network namespace */
	return bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_SRC) != -SWY_EINVAL;
}
