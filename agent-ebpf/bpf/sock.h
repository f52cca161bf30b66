/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level load balancing (cgroup sock_addr hooks): a Service address is replaced
 * by a backend once, at connect() or at an unconnected sendmsg(), so no packet of the
 * connection is ever translated. recvmsg() and getpeername() give the application the
 * Service address back.
 *
 * A Service without usable endpoints fails connect() with ECONNREFUSED. Otherwise a
 * rejecting or dropping entry leaves the address alone and the egress program drops
 * what the socket sends there, as iptables would: a connect() times out and an
 * unconnected datagram is lost.
 */
#pragma once

#include <linux/in.h>

#include "lb.h"

/* The affinity key of a socket's client: its network namespace (a pod, or the node). */
static __always_inline void sock_client(void *ctx, __be32 client[4])
{
	__u64 netns = bpf_get_netns_cookie(ctx);

	client[0] = (__u32)netns;
	client[1] = (__u32)(netns >> 32);
	client[2] = 0;
	client[3] = bpf_htonl(1);
}

static __always_inline void sock_remember(__u64 cookie, const __be32 from[4], __be16 from_port,
					  const __be32 to[4], __be16 to_port, __u32 rev)
{
	struct swy_sock_rev_key key = { .cookie = cookie, .port = from_port };
	struct swy_sock_rev_value value = { .port = to_port, .rev = rev };

	addr_copy(key.addr, from);
	addr_copy(value.addr, to);
	bpf_map_update_elem(&swy_sock_rev, &key, &value, BPF_ANY);
}

/* The backend an unconnected socket already sends `vip` to, if it is still in the range
 * the entry points at now. */
static __always_inline int sock_flow(__u64 cookie, const __be32 vip[4], __be16 vport,
				     struct swy_choice *c)
{
	struct swy_sock_rev_key key = { .cookie = cookie, .port = vport };

	addr_copy(key.addr, vip);
	struct swy_sock_rev_value *flow = bpf_map_lookup_elem(&swy_sock_rev, &key);
	if (!flow)
		return -1;
	int slot = flow->rev == c->svc.rev ? 0 : find_in_range(&c->svc, flow->addr, flow->port);
	if (slot < 0)
		return -1;
	addr_copy(c->backend.addr, flow->addr);
	c->backend.port = flow->port;
	flow->rev = c->svc.rev;
	return 0;
}

/* The peer record of a connected socket; created when `create`. */
static __always_inline struct swy_sock_peer *sock_peer(struct bpf_sock_addr *ctx, int create)
{
	return bpf_sk_storage_get(&swy_sock_peer, ctx->sk, 0,
				  create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

/* Translates a destination in place. Returns 1 to let the call proceed, 0 to fail it
 * (with the errno set through bpf_set_retval). */
static __always_inline int sock_xlate(struct bpf_sock_addr *ctx, __be32 addr[4], __be16 *port,
				      __u32 protocol, int connect)
{
	struct swy_svc_key key = { .port = *port, .proto = protocol, .scope = SWY_SCOPE_SOCK };
	struct swy_choice c = {};
	__be32 client[4];

	addr_copy(key.addr, addr);
	sock_client(ctx, client);
	/* A connect has no packet to hash yet: a Maglev set is drawn from at random here (its
	 * consistency is for flows from outside, and a connected socket never moves). */
	int outcome = lb_lookup_vip(&key, client, bpf_get_prandom_u32(), &c);
	if (outcome == SWY_VERDICT && connect && c.svc.action == SWY_ACT_REJECT) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	if (outcome != SWY_CHOSEN) {
		/* A socket connected again, elsewhere, forgets the Service it had. */
		struct swy_sock_peer *old = connect ? sock_peer(ctx, 0) : 0;
		if (old)
			old->valid = 0;
		return 1;
	}
	if (connect) {
		struct swy_sock_peer *peer = sock_peer(ctx, 1);
		if (peer) {
			addr_copy(peer->vip, addr);
			addr_copy(peer->backend, c.backend.addr);
			peer->vip_port = *port;
			peer->backend_port = c.backend.port;
			peer->valid = 1;
		}
	} else {
		__u64 cookie = bpf_get_socket_cookie(ctx);
		sock_flow(cookie, addr, *port, &c);
		sock_remember(cookie, c.backend.addr, c.backend.port, addr, *port, 0);
		sock_remember(cookie, addr, *port, c.backend.addr, c.backend.port, c.svc.rev);
	}
	addr_copy(addr, c.backend.addr);
	*port = c.backend.port;
	return 1;
}

/* Gives the application the Service address back for a backend it talks to. */
static __always_inline void sock_reverse(struct bpf_sock_addr *ctx, __be32 addr[4], __be16 *port)
{
	struct swy_sock_peer *peer = sock_peer(ctx, 0);

	if (peer && peer->valid && peer->backend_port == *port && addr_eq(peer->backend, addr)) {
		addr_copy(addr, peer->vip);
		*port = peer->vip_port;
		return;
	}
	struct swy_sock_rev_key key = { .cookie = bpf_get_socket_cookie(ctx), .port = *port };

	addr_copy(key.addr, addr);
	struct swy_sock_rev_value *vip = bpf_map_lookup_elem(&swy_sock_rev, &key);
	if (!vip)
		return;
	addr_copy(addr, vip->addr);
	*port = vip->port;
}

static __always_inline int sock4(struct bpf_sock_addr *ctx, int connect)
{
	__be32 addr[4];
	__be16 port = (__be16)ctx->user_port;

	addr_set_v4(addr, ctx->user_ip4);
	int proceed = sock_xlate(ctx, addr, &port, ctx->protocol, connect);
	if (proceed && addr_is_v4(addr)) {
		ctx->user_ip4 = addr[3];
		ctx->user_port = (__u32)port;
	}
	return proceed;
}

static __always_inline int sock6(struct bpf_sock_addr *ctx, int connect)
{
	__be32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	__be16 port = (__be16)ctx->user_port;

	int proceed = sock_xlate(ctx, addr, &port, ctx->protocol, connect);
	if (proceed) {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
		ctx->user_port = (__u32)port;
	}
	return proceed;
}

static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	__be32 addr[4];
	__be16 port = (__be16)ctx->user_port;

	addr_set_v4(addr, ctx->user_ip4);
	sock_reverse(ctx, addr, &port);
	if (addr_is_v4(addr)) {
		ctx->user_ip4 = addr[3];
		ctx->user_port = (__u32)port;
	}
	return 1;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	__be32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	__be16 port = (__be16)ctx->user_port;

	sock_reverse(ctx, addr, &port);
	ctx->user_ip6[0] = addr[0];
	ctx->user_ip6[1] = addr[1];
	ctx->user_ip6[2] = addr[2];
	ctx->user_ip6[3] = addr[3];
	ctx->user_port = (__u32)port;
	return 1;
}

SEC("cgroup/connect4")
int swy_connect4(struct bpf_sock_addr *ctx)
{
	return sock4(ctx, 1);
}

SEC("cgroup/connect6")
int swy_connect6(struct bpf_sock_addr *ctx)
{
	return sock6(ctx, 1);
}

SEC("cgroup/sendmsg4")
int swy_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4(ctx, 0);
}

SEC("cgroup/sendmsg6")
int swy_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6(ctx, 0);
}

SEC("cgroup/recvmsg4")
int swy_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/recvmsg6")
int swy_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

SEC("cgroup/getpeername4")
int swy_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername6")
int swy_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

/* Drops, as iptables would, what a socket sends to a Service address whose entry
 * rejects or drops (connect() of a rejecting one already failed). Returning 2 drops with
 * NET_XMIT_CN: the sender sees success, so TCP retransmits until it times out and an
 * unconnected datagram is silently lost. Costs one array read per packet while no such
 * entry exists. */
SEC("cgroup_skb/egress")
int swy_sock_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct swy_config *config = bpf_map_lookup_elem(&swy_config, &zero);
	struct swy_svc_key key = { .scope = SWY_SCOPE_SOCK };
	__u32 l4 = 0;

	if (!config || config->sock_blackholes == 0)
		return 1;
	if (skb->protocol == bpf_htons(0x0800)) {
		struct swy_ip4 ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 1;
		if (ip.frag & bpf_htons(0x1fff))
			return 1;
		addr_set_v4(key.addr, ip.daddr);
		key.proto = ip.proto;
		l4 = (ip.vihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		struct swy_ip6 ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 1;
		addr_copy(key.addr, ip6.daddr);
		key.proto = ip6.next;
		l4 = 40;
	} else {
		return 1;
	}
	if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP && key.proto != IPPROTO_SCTP)
		return 1;
	__be16 ports[2];
	if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
		return 1;
	key.port = ports[1];
	struct swy_svc_value *svc = bpf_map_lookup_elem(&swy_services, &key);
	if (!svc && is_nodeport_addr(key.addr)) {
		addr_any_like(key.addr);
		svc = bpf_map_lookup_elem(&swy_services, &key);
	}
	if (svc && svc->action != SWY_ACT_FORWARD)
		return 2;
	return 1;
}
