//! The contract between Weir's kernel programs (`ebpf/`) and the agent: map names, program
//! names, and the `#[repr(C)]` keys and values both sides read and write. No logic here.
//!
//! Addresses and ports are stored in network byte order, exactly as the kernel presents
//! them in `bpf_sock_addr` (`user_ip4`, `user_ip6` as four 32-bit words, and the low 16
//! bits of `user_port`), so the programs never convert. Every struct spells out its
//! padding so no byte is left uninitialised between the two sides.
//!
//! The service maps come in two families: `*4` maps keyed by an IPv4 address (`u32`) and
//! `*6` maps keyed by an IPv6 address ([`Ipv6Words`]). Where the layouts differ only in the
//! address, one generic struct serves both ([`ServiceMapKey<A>`] as [`Service4Key`] and
//! [`Service6Key`], ...). Backend ids and reverse-NAT ids are one id space over both
//! families, so [`AFFINITY`] and [`MAGLEV`], keyed by those ids, are shared.
#![no_std]

/// Pins live under `<pin root>/<DATAPATH_VERSION>/`: a program or map layout change bumps
/// it, and the agent of a new version loads beside the old pins instead of misreading them.
pub const DATAPATH_VERSION: &str = "v6";

/// Service frontends and their backend slots: [`Service4Key`] → [`Service4Value`].
pub const SERVICES4: &str = "SERVICES4";
/// Backends by id: `u32` → [`Backend4Value`].
pub const BACKENDS4: &str = "BACKENDS4";
/// Reverse NAT by id: `u32` → [`RevNat4Value`].
pub const REV_NAT4: &str = "REV_NAT4";
/// LRU of translated sockets, for replies and getpeername: [`SockRevNat4Key`] → [`SockRevNat4Value`].
pub const SOCK_REV_NAT4: &str = "SOCK_REV_NAT4";
/// IPv6 service frontends and their backend slots: [`Service6Key`] → [`Service6Value`].
pub const SERVICES6: &str = "SERVICES6";
/// IPv6 backends by id: `u32` → [`Backend6Value`]. Ids never repeat across BACKENDS4 and BACKENDS6.
pub const BACKENDS6: &str = "BACKENDS6";
/// IPv6 reverse NAT by id: `u32` → [`RevNat6Value`]. Ids never repeat across REV_NAT4 and REV_NAT6.
pub const REV_NAT6: &str = "REV_NAT6";
/// LRU of sockets translated to IPv6 backends: [`SockRevNat6Key`] → [`SockRevNat6Value`].
pub const SOCK_REV_NAT6: &str = "SOCK_REV_NAT6";
/// sessionAffinity ClientIP of both families: [`AffinityKey`] → [`AffinityValue`], LRU.
pub const AFFINITY: &str = "AFFINITY";
/// Maglev lookup tables of both families: [`maglev_key`]`(rev_nat_id, slot)` (`u64`) →
/// backend id (`u32`).
pub const MAGLEV: &str = "MAGLEV";
/// Connection tracking of NodePort/LoadBalancer flows translated by TC or XDP, one entry
/// per direction: [`Ct4Key`] → [`Ct4Value`], LRU.
pub const CT4: &str = "CT4";
/// The node's settings for TC and XDP: index 0 → [`Node4Config`].
pub const NODE4: &str = "NODE4";
/// Per-CPU packet counters of TC and XDP: `STAT_*` → `u64`.
pub const STATS: &str = "STATS";

/// Default sizes of the service maps; the agent sizes them at load (`datapath::Capacity`).
/// SERVICES4 holds a frontend and one slot per backend of every service.
pub const SERVICES4_MAX_ENTRIES: u32 = 262144;
pub const BACKENDS4_MAX_ENTRIES: u32 = 65536;
/// One reverse-NAT id per service frontend.
pub const REV_NAT4_MAX_ENTRIES: u32 = 65536;
pub const SOCK_REV_NAT4_MAX_ENTRIES: u32 = 131072;
/// The IPv6 maps default to a quarter of the IPv4 ones: most clusters are IPv4 first.
pub const SERVICES6_MAX_ENTRIES: u32 = SERVICES4_MAX_ENTRIES / 4;
pub const BACKENDS6_MAX_ENTRIES: u32 = BACKENDS4_MAX_ENTRIES / 4;
pub const REV_NAT6_MAX_ENTRIES: u32 = REV_NAT4_MAX_ENTRIES / 4;
pub const SOCK_REV_NAT6_MAX_ENTRIES: u32 = SOCK_REV_NAT4_MAX_ENTRIES / 4;
pub const AFFINITY_MAX_ENTRIES: u32 = 65536;
/// Slots of one service's Maglev table: a prime below 2^14.
pub const MAGLEV_TABLE_SIZE: u32 = 16381;
/// Room for the tables of 64 Maglev services (allocated on use, not preallocated).
pub const MAGLEV_MAX_ENTRIES: u32 = 64 * MAGLEV_TABLE_SIZE;
/// Two entries per flow: room for 131072 flows before LRU eviction starts.
pub const CT4_MAX_ENTRIES: u32 = 262144;
pub const STATS_MAX_ENTRIES: u32 = 16;

/// Frontend flag (slot 0 `flags`): choose the backend from the service's Maglev table by
/// a hash of the client's network namespace instead of at random.
pub const SERVICE_FLAG_MAGLEV: u8 = 1;
/// Frontend flag: a NodePort or LoadBalancer frontend, which TC and XDP translate for
/// packets from outside the node (they leave every other frontend alone).
pub const SERVICE_FLAG_EXTERNAL: u8 = 2;
/// Frontend flag: externalTrafficPolicy Local. Its backends are this node's only, the
/// client address is kept (no SNAT), and with no backend the packet is dropped.
pub const SERVICE_FLAG_LOCAL: u8 = 4;

/// Backend flag: the backend runs on another node. External traffic to it gets its
/// source rewritten to the node's SNAT address, so replies come back through this node.
pub const BACKEND_FLAG_REMOTE: u8 = 1;

/// Node flag ([`Node4Config::flags`]): flows to backends on other nodes use direct server
/// return (DSR) instead of SNAT: the client's address is kept, the service address travels
/// to the backend's node in an IPv4 option ([`DSR_OPTION_TYPE`]) and that node's TC egress
/// gives the backend's replies the service address as their source.
pub const NODE_FLAG_DSR: u8 = 1;

/// The IPv4 option carrying a DSR flow's service address to the backend's node: type 158
/// (copied flag set, class 0, number 30), the value RFC 4727 reserves for experiments
/// ("RFC3692-style Experiment"), so it meets no standard option. Layout, 8 bytes, right
/// after the fixed 20-byte IPv4 header: type, length (8), service port, service address
/// (both network byte order).
pub const DSR_OPTION_TYPE: u8 = 0x9e;
/// Length of the DSR option, type and length bytes included.
pub const DSR_OPTION_LEN: u8 = 8;

/// Affinity keys of TC/XDP clients carry `AFFINITY_CLIENT_IP | client IPv4` in
/// `netns_cookie`: netns cookies are small counters, so the two never meet.
pub const AFFINITY_CLIENT_IP: u64 = 1 << 63;

/// Conntrack flag: the entry is the reply direction of a flow.
pub const CT_FLAG_REPLY: u8 = 1;
/// Conntrack flag: the flow's source was rewritten to the node's SNAT address.
pub const CT_FLAG_SNAT: u8 = 2;
/// Conntrack flag: a FIN or RST went through in this direction.
pub const CT_FLAG_CLOSING: u8 = 4;
/// Conntrack flag: the entry applies at egress (TC egress), not at ingress (XDP, TC ingress).
pub const CT_FLAG_EGRESS: u8 = 8;
/// Conntrack flag (forward direction): the last packet through the entry was a TCP SYN, so
/// a SYN-ACK in the reply direction belongs to this flow.
pub const CT_FLAG_SYN: u8 = 16;
/// Conntrack flag (forward direction, on the node that balanced the flow): a DSR flow to a
/// backend on another node. Packets that need it (every UDP datagram, a TCP SYN) get the
/// DSR option; there are no reply entries here, since replies do not come back this way.
pub const CT_FLAG_DSR: u8 = 32;
/// Conntrack flag (on the backend's node): recorded from a DSR option. The forward entry
/// rewrites nothing; the reply entry gives replies the service address as their source.
pub const CT_FLAG_DSR_BACKEND: u8 = 64;

/// STATS indices.
pub const STAT_XDP_NEW: u32 = 0;
pub const STAT_XDP_TRACKED: u32 = 1;
pub const STAT_TC_INGRESS_NEW: u32 = 2;
pub const STAT_TC_INGRESS_TRACKED: u32 = 3;
pub const STAT_TC_EGRESS_TRACKED: u32 = 4;
/// Dropped: a frontend with no backend to send to (eTP Local on a node without one).
pub const STAT_DROP_NO_BACKEND: u32 = 5;
/// Dropped: no free SNAT port, no SNAT address, or a conntrack insert failed.
pub const STAT_DROP_NO_SNAT: u32 = 6;
/// ICMP errors about a translated flow, rewritten for the client (TC).
pub const STAT_ICMP_REV_NAT: u32 = 7;
/// Packets that left for a backend on another node with the DSR option added (TC ingress).
pub const STAT_DSR_OPTION_ADDED: u32 = 8;
/// Packets that arrived with a DSR option for a known frontend and were recorded (TC ingress).
pub const STAT_DSR_RECORDED: u32 = 9;
/// Dropped: the DSR option could not be added (say, a UDP GSO packet).
pub const STAT_DROP_DSR: u32 = 10;

/// The MAGLEV key of `slot` (< [`MAGLEV_TABLE_SIZE`]) in the table of the service with
/// reverse-NAT id `rev_nat_id`.
#[inline(always)]
pub const fn maglev_key(rev_nat_id: u32, slot: u32) -> u64 {
    ((rev_nat_id as u64) << 14) | slot as u64
}

/// cgroup/connect4: translates a ClusterIP:port to a backend when a socket connects.
pub const PROG_CONNECT4: &str = "sock_connect4";
/// cgroup/sendmsg4: the same for unconnected UDP datagrams.
pub const PROG_SENDMSG4: &str = "sock_sendmsg4";
/// cgroup/recvmsg4: makes UDP replies appear to come from the service address.
pub const PROG_RECVMSG4: &str = "sock_recvmsg4";
/// cgroup/getpeername4: reports the service address as the peer of a translated socket.
pub const PROG_GETPEERNAME4: &str = "sock_getpeername4";
/// cgroup/connect6: [`PROG_CONNECT4`] for IPv6 sockets (and IPv4-mapped addresses).
pub const PROG_CONNECT6: &str = "sock_connect6";
/// cgroup/sendmsg6: [`PROG_SENDMSG4`] for IPv6 sockets.
pub const PROG_SENDMSG6: &str = "sock_sendmsg6";
/// cgroup/recvmsg6: [`PROG_RECVMSG4`] for IPv6 sockets.
pub const PROG_RECVMSG6: &str = "sock_recvmsg6";
/// cgroup/getpeername6: [`PROG_GETPEERNAME4`] for IPv6 sockets.
pub const PROG_GETPEERNAME6: &str = "sock_getpeername6";

/// TC (clsact/TCX) ingress on an external interface: NodePort/LoadBalancer DNAT (and SNAT
/// for remote backends), reverse NAT of replies that come back from other nodes.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// TC egress on an external interface: reverse NAT of replies from local backends.
pub const PROG_TC_EGRESS: &str = "tc_egress";
/// XDP on an external interface: the same translation as tc_ingress, earlier.
pub const PROG_XDP: &str = "xdp_ingress";

/// Every socket-LB program, in the order the agent attaches them.
pub const SOCK_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_SENDMSG4,
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
    PROG_CONNECT6,
    PROG_SENDMSG6,
    PROG_RECVMSG6,
    PROG_GETPEERNAME6,
];

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Traffic from anywhere (ClusterIP, and NodePort/LoadBalancer frontends flagged
/// [`SERVICE_FLAG_EXTERNAL`]). Node-local scopes (internalTrafficPolicy) come later.
pub const SCOPE_EXTERNAL: u8 = 0;

pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// Being drained: chosen only when a service has no active backend left.
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// An IPv6 address as the kernel's `user_ip6`: four 32-bit words, each in network byte order.
pub type Ipv6Words = [u32; 4];

/// A service frontend (`slot == 0`) or one of its backend slots (`slot >= 1`), at an
/// address of type `A` (`u32` or [`Ipv6Words`], network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceMapKey<A> {
    pub address: A,
    /// Network byte order.
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

pub type Service4Key = ServiceMapKey<u32>;
pub type Service6Key = ServiceMapKey<Ipv6Words>;

/// At slot 0: `backend_count` selectable backends sit in slots `1..=backend_count`, then
/// `draining_count` more (terminating, kept for the record and for draining) after them;
/// `backend_id` is 0. At slot n ≥ 1: `backend_id` is set and the rest is 0. The same for
/// both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub backend_count: u16,
    pub draining_count: u16,
    pub rev_nat_id: u32,
    pub flags: u8,
    pub pad: [u8; 3],
    /// At slot 0: sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
}

pub type Service4Value = ServiceValue;
pub type Service6Value = ServiceValue;

/// One client (its network namespace, as Cilium's socket-LB does) of one service, of
/// either family: reverse-NAT ids are unique over both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub rev_nat_id: u32,
    pub pad: u32,
}

/// The backend a client was last sent to, and when (bpf_ktime_get_ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue<A> {
    /// Network byte order.
    pub address: A,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// `BACKEND_FLAG_*`.
    pub flags: u8,
    pub pad: [u8; 3],
}

pub type Backend4Value = BackendValue<u32>;
pub type Backend6Value = BackendValue<Ipv6Words>;

/// The frontend a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue<A> {
    /// Network byte order.
    pub address: A,
    /// Network byte order.
    pub port: u16,
    pub pad: [u8; 2],
}

pub type RevNat4Value = RevNatValue<u32>;
pub type RevNat6Value = RevNatValue<Ipv6Words>;

/// One translated socket talking to one backend: a single unconnected UDP socket may
/// reach several services, so the backend address is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub address: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub pad: [u8; 2],
}

/// [`SockRevNat4Key`] for IPv6 backends (its own struct: the padding differs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub address: Ipv6Words,
    /// Backend port, network byte order.
    pub port: u16,
    pub pad: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue<A> {
    /// Service address, network byte order.
    pub address: A,
    /// Service port, network byte order.
    pub port: u16,
    pub pad: [u8; 2],
    pub rev_nat_id: u32,
}

pub type SockRevNat4Value = SockRevNatValue<u32>;
pub type SockRevNat6Value = SockRevNatValue<Ipv6Words>;

/// One direction of a flow as it appears on the wire. Addresses and ports in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// What to do with a packet matching the key at the hook `CT_FLAG_EGRESS` names: rewrite
/// its source to `saddr:sport` when `saddr` is not 0, its destination to `daddr:dport`
/// when `daddr` is not 0. A flow has two entries (DNAT at ingress, reverse at egress) or,
/// with SNAT, four (plus SNAT at egress, reverse SNAT at ingress). `peer` is the entry of
/// the other direction at the other hook, so a pair is aged and removed together. A DSR
/// flow has one entry on the node that balanced it (DNAT, `CT_FLAG_DSR`, its own key as
/// `peer`) and two on the backend's node (`CT_FLAG_DSR_BACKEND`: a forward entry that
/// rewrites nothing, and the reply's source rewrite at egress).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct4Value {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last packet in this direction.
    pub last_seen_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub peer: Ct4Key,
    pub rev_nat_id: u32,
    /// `CT_FLAG_*`.
    pub flags: u8,
    pub pad: [u8; 3],
    /// The flow's backend: a DNAT entry whose backend left BACKENDS4 (or whose id now
    /// names another backend) is dropped, and the packet balanced again.
    pub backend_id: u32,
}

/// The node's TC/XDP settings, written by the agent when it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node4Config {
    /// The address remote backends see as the source, network byte order; 0 = unset
    /// (flows to remote backends are dropped).
    pub snat_address: u32,
    /// SNAT source ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `NODE_FLAG_*`.
    pub flags: u8,
    pub pad: [u8; 3],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, and have no implicit padding (every
    // byte is a named field; the size test below checks each instance of the generic
    // ones), so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service6Key {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend4Value {}
    unsafe impl aya::Pod for Backend6Value {}
    unsafe impl aya::Pod for RevNat4Value {}
    unsafe impl aya::Pod for RevNat6Value {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat6Key {}
    unsafe impl aya::Pod for SockRevNat4Value {}
    unsafe impl aya::Pod for SockRevNat6Value {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for Node4Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<Service4Key>(), 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Service4Value>(), 4 + 2 + 2 + 4 + 1 + 3 + 4);
        assert_eq!(size_of::<Service6Key>(), 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<AffinityKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<AffinityValue>(), 8 + 4 + 4);
        assert_eq!(size_of::<Backend6Value>(), 16 + 2 + 1 + 1 + 1 + 3);
        assert_eq!(size_of::<RevNat6Value>(), 16 + 2 + 2);
        assert_eq!(size_of::<SockRevNat6Key>(), 8 + 16 + 2 + 6);
        assert_eq!(size_of::<SockRevNat6Value>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<Backend4Value>(), 4 + 2 + 1 + 1 + 1 + 3);
        assert_eq!(size_of::<Ct4Key>(), 4 + 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<Ct4Value>(), 8 + 4 + 4 + 2 + 2 + 16 + 4 + 1 + 3 + 4);
        assert_eq!(size_of::<Node4Config>(), 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<RevNat4Value>(), 4 + 2 + 2);
        assert_eq!(size_of::<SockRevNat4Key>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SockRevNat4Value>(), 4 + 2 + 2 + 4);
    }
}
