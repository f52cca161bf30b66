/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The map layout switchyard's eBPF agent shares with its programs: every key and value
 * the agent writes, mirrored field for field by agent-ebpf/src/abi.rs (sizes checked on
 * both sides). Addresses are 16 bytes in network order; IPv4 ones are IPv4-mapped
 * (::ffff:a.b.c.d), so one set of maps serves both families.
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Which path a service entry decides for. */
#define SWY_SCOPE_SOCK 0    /* connect()/sendmsg() of processes in the cgroup */
#define SWY_SCOPE_EXT 1     /* packets arriving on a --devices device (tc) */
#define SWY_SCOPE_EXT_POD 2 /* the same from a cluster CIDR, externalTrafficPolicy Local */

/* What a service entry does. */
#define SWY_ACT_FORWARD 0
#define SWY_ACT_REJECT 1 /* no usable endpoint: ECONNREFUSED / ICMP port unreachable */
#define SWY_ACT_DROP 2   /* usable endpoints exist, none for this traffic policy */

#define SWY_F_AFFINITY (1 << 0)     /* ClientIP affinity, timeout in affinity_timeout */
#define SWY_F_MAGLEV (1 << 1)       /* pick through the Maglev table of `rev` */
#define SWY_F_SNAT (1 << 2)         /* source-NAT every flow to the node (tc) */
#define SWY_F_SNAT_NON_POD (1 << 3) /* source-NAT unless the source is in a cluster CIDR */
#define SWY_F_SRC_RANGES (1 << 4)   /* load-balancer source ranges of res_id apply */
#define SWY_F_POD_SET (1 << 5)      /* cluster-CIDR sources use the SWY_SCOPE_EXT_POD entry */

struct swy_svc_key {
	__be32 addr[4]; /* the VIP; all zero (IPv6) or ::ffff:0.0.0.0 (IPv4) for a node port */
	__be16 port;
	__u8 proto; /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 scope;
};

struct swy_svc_value {
	__u32 rev;   /* the backend range: slots (rev, 0..count) and its Maglev table */
	__u16 count; /* backends in the range; 0 unless action is SWY_ACT_FORWARD */
	__u8 action;
	__u8 flags;
	__u32 res_id; /* the Service (swy_versions) the entry belongs to */
	__u32 affinity_timeout; /* seconds */
	__u32 affinity_id;      /* the service port, shared by all its entries */
	__u32 maglev_size;      /* entries in the Maglev table (a prime), 0 without one */
};

struct swy_slot_key {
	__u32 rev;
	__u32 slot;
};

struct swy_backend {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

#define SWY_MAGLEV_CHUNK 1024
struct swy_maglev_key {
	__u32 rev;
	__u32 chunk; /* table index / SWY_MAGLEV_CHUNK */
};

struct swy_maglev_chunk {
	__u16 slot[SWY_MAGLEV_CHUNK];
};

struct swy_affinity_key {
	__be32 client[4]; /* the client address (tc) or its network namespace cookie (socket) */
	__u32 affinity_id;
	__u32 pad;
};

struct swy_affinity_value {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 rev;
	__u32 slot;
	__u32 pad2;
	__u64 last_ns;
};

struct swy_sock_rev_key {
	__u64 cookie; /* socket cookie */
	__be32 addr[4]; /* the backend the socket was sent to */
	__be16 port;
	__u16 pad;
	__u32 pad2;
};

/*
 * Per unconnected UDP socket, both ways: (cookie, backend) -> the VIP the application
 * sent to, for recvmsg; (cookie, VIP) -> the backend the socket sends that VIP's
 * datagrams to, with the range it was chosen from (a flow, as conntrack keeps one for
 * iptables). A backend address is never a VIP, so the two never meet. Connected sockets
 * keep theirs in socket-local storage (struct swy_sock_peer).
 */
struct swy_sock_rev_value {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 rev;
};

/* Per connected socket (socket-local storage, freed with the socket): the Service
 * address the application asked for and the backend it was sent to, for getpeername and
 * recvmsg. */
struct swy_sock_peer {
	__be32 vip[4];
	__be32 backend[4];
	__be16 vip_port;
	__be16 backend_port;
	__u32 valid;
};

/*
 * Connection tracking of traffic from outside: one entry per direction, each keyed by
 * the tuple its packets carry, so one lookup finds either (a forward tuple ends at a
 * Service address, a reply tuple starts at a backend: they never meet).
 */
#define SWY_CT_FORWARD 0
#define SWY_CT_REPLY 1
struct swy_ct_key {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

#define SWY_CT_F_SNAT (1 << 0)
struct swy_ct_value {
	/* forward: the backend (new destination); reply: the VIP (new source) */
	__be32 addr[4];
	/* forward: the node address (new source) with SNAT; reply: the client (new
	 * destination) with SNAT */
	__be32 addr2[4];
	__be16 port;
	__be16 port2;
	__u8 flags;
	__u8 dir;
	__u8 pad[2];
	__u64 last_ns;
};

#define SWY_NODE_F_NODEPORT (1 << 0)
struct swy_node_addr_key {
	__be32 addr[4];
};

struct swy_range_key {
	__u32 prefixlen; /* 32 + prefix of the address part */
	__u32 res_id;    /* always covered whole by the prefix */
	__be32 addr[4];
};

struct swy_cidr_key {
	__u32 prefixlen;
	__be32 addr[4];
};

#define SWY_NAME_LEN 128
struct swy_version_key {
	char name[SWY_NAME_LEN]; /* namespace/name, NUL-padded (validated DNS labels) */
};

#define SWY_VERSION_F_DIRTY (1 << 0) /* an apply started and did not finish */
struct swy_version_value {
	__u64 version;
	__u32 res_id;
	__u32 flags;
};

/* bpf_fib_lookup names the source address of source-NATed flows (BPF_FIB_LOOKUP_SRC,
 * Linux 6.7); without it, swy_src_addrs does. */
#define SWY_CFG_F_FIB_SRC (1 << 0)

struct swy_config {
	__u32 sock_blackholes; /* socket-scope entries that reject or drop */
	__u16 snat_port_min;
	__u16 snat_port_max;
	__u32 flags; /* SWY_CFG_F_* */
	__u32 pad;
};

/*
 * The source address of source-NATed flows where bpf_fib_lookup cannot name one (before
 * Linux 6.7), as the kernel picks one for a route without a preferred source: by the
 * device the route leaves through and its next hop, the device's address whose subnet
 * holds the next hop (prefix 32 + 96 + p for IPv4, 32 + p for IPv6), else the device's
 * first address of the family (prefix 32 + 96 for IPv4, 32 for IPv6), else the node's
 * first one (the same under ifindex SWY_SRC_ANY_DEVICE).
 */
#define SWY_SRC_ANY_DEVICE 0
struct swy_src_key {
	__u32 prefixlen; /* 32 (the ifindex, always whole) + bits of addr */
	__u32 ifindex;
	__be32 addr[4];
};

struct swy_src_value {
	__be32 addr[4];
};

struct swy_meta {
	__u64 object_hash; /* which build of the programs the pinned links run */
	__u64 cgroup_id;   /* the cgroup the socket programs are attached to */
};

_Static_assert(sizeof(struct swy_svc_key) == 20, "svc key");
_Static_assert(sizeof(struct swy_svc_value) == 24, "svc value");
_Static_assert(sizeof(struct swy_backend) == 20, "backend");
_Static_assert(sizeof(struct swy_affinity_key) == 24, "affinity key");
_Static_assert(sizeof(struct swy_affinity_value) == 40, "affinity value");
_Static_assert(sizeof(struct swy_sock_rev_key) == 32, "sock rev key");
_Static_assert(sizeof(struct swy_sock_rev_value) == 24, "sock rev value");
_Static_assert(sizeof(struct swy_sock_peer) == 40, "sock peer");
_Static_assert(sizeof(struct swy_ct_key) == 40, "ct key");
_Static_assert(sizeof(struct swy_ct_value) == 48, "ct value");
_Static_assert(sizeof(struct swy_range_key) == 24, "range key");
_Static_assert(sizeof(struct swy_cidr_key) == 20, "cidr key");
_Static_assert(sizeof(struct swy_version_value) == 16, "version value");
_Static_assert(sizeof(struct swy_config) == 16, "config");
_Static_assert(sizeof(struct swy_src_key) == 24, "src key");
_Static_assert(sizeof(struct swy_src_value) == 16, "src value");
_Static_assert(sizeof(struct swy_meta) == 16, "meta");
