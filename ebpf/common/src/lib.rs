//! The contract between Weir's kernel programs (`ebpf/`) and the agent: map names, program
//! names, and the `#[repr(C)]` keys and values both sides read and write. No logic here.
//!
//! Addresses and ports are stored in network byte order, exactly as the kernel presents
//! them in `bpf_sock_addr` (`user_ip4`, and the low 16 bits of `user_port`), so the
//! programs never convert. Every struct spells out its padding so no byte is left
//! uninitialised between the two sides.
#![no_std]

/// Pins live under `<pin root>/<DATAPATH_VERSION>/`: a program or map layout change bumps
/// it, and the agent of a new version loads beside the old pins instead of misreading them.
pub const DATAPATH_VERSION: &str = "v2";

/// Service frontends and their backend slots: [`Service4Key`] → [`Service4Value`].
pub const SERVICES4: &str = "SERVICES4";
/// Backends by id: `u32` → [`Backend4Value`].
pub const BACKENDS4: &str = "BACKENDS4";
/// Reverse NAT by id: `u16` → [`RevNat4Value`].
pub const REV_NAT4: &str = "REV_NAT4";
/// LRU of translated sockets, for replies and getpeername: [`SockRevNat4Key`] → [`SockRevNat4Value`].
pub const SOCK_REV_NAT4: &str = "SOCK_REV_NAT4";
/// sessionAffinity ClientIP: [`Affinity4Key`] → [`Affinity4Value`], LRU.
pub const AFFINITY4: &str = "AFFINITY4";
/// Maglev lookup tables: [`maglev_key`]`(rev_nat_id, slot)` → backend id (`u32`).
pub const MAGLEV4: &str = "MAGLEV4";

pub const SERVICES4_MAX_ENTRIES: u32 = 65536;
pub const BACKENDS4_MAX_ENTRIES: u32 = 65536;
pub const REV_NAT4_MAX_ENTRIES: u32 = 65536;
pub const SOCK_REV_NAT4_MAX_ENTRIES: u32 = 131072;
pub const AFFINITY4_MAX_ENTRIES: u32 = 65536;
/// Slots of one service's Maglev table: a prime below 2^14.
pub const MAGLEV_TABLE_SIZE: u32 = 16381;
/// Room for the tables of 64 Maglev services (allocated on use, not preallocated).
pub const MAGLEV4_MAX_ENTRIES: u32 = 64 * MAGLEV_TABLE_SIZE;

/// Frontend flag (slot 0 `flags`): choose the backend from the service's Maglev table by
/// a hash of the client's network namespace instead of at random.
pub const SERVICE_FLAG_MAGLEV: u8 = 1;

/// The MAGLEV4 key of `slot` (< [`MAGLEV_TABLE_SIZE`]) in the table of the service with
/// reverse-NAT id `rev_nat_id`.
#[inline(always)]
pub const fn maglev_key(rev_nat_id: u16, slot: u32) -> u32 {
    ((rev_nat_id as u32) << 14) | slot
}

/// cgroup/connect4: translates a ClusterIP:port to a backend when a socket connects.
pub const PROG_CONNECT4: &str = "sock_connect4";
/// cgroup/sendmsg4: the same for unconnected UDP datagrams.
pub const PROG_SENDMSG4: &str = "sock_sendmsg4";
/// cgroup/recvmsg4: makes UDP replies appear to come from the service address.
pub const PROG_RECVMSG4: &str = "sock_recvmsg4";
/// cgroup/getpeername4: reports the service address as the peer of a translated socket.
pub const PROG_GETPEERNAME4: &str = "sock_getpeername4";

/// Every socket-LB program, in the order the agent attaches them.
pub const SOCK_PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_SENDMSG4, PROG_RECVMSG4, PROG_GETPEERNAME4];

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Traffic from anywhere (ClusterIP). Node-local scopes (internalTrafficPolicy) come later.
pub const SCOPE_EXTERNAL: u8 = 0;

pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// Being drained: chosen only when a service has no active backend left.
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// A service frontend (`slot == 0`) or one of its backend slots (`slot >= 1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

/// At slot 0: `backend_count` selectable backends sit in slots `1..=backend_count`, then
/// `draining_count` more (terminating, kept for the record and for draining) after them;
/// `backend_id` is 0. At slot n ≥ 1: `backend_id` is set and the rest is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service4Value {
    pub backend_id: u32,
    pub backend_count: u16,
    pub rev_nat_id: u16,
    pub draining_count: u16,
    pub flags: u8,
    pub pad: u8,
    /// At slot 0: sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
}

/// One client (its network namespace, as Cilium's socket-LB does) of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity4Key {
    pub netns_cookie: u64,
    pub rev_nat_id: u16,
    pub pad: [u8; 6],
}

/// The backend a client was last sent to, and when (bpf_ktime_get_ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity4Value {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend4Value {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
}

/// The frontend a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat4Value {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub pad: [u8; 2],
}

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

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat4Value {
    /// Service address, network byte order.
    pub address: u32,
    /// Service port, network byte order.
    pub port: u16,
    pub rev_nat_id: u16,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, and have no implicit padding (every
    // byte is a named field), so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Backend4Value {}
    unsafe impl aya::Pod for RevNat4Value {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat4Value {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity4Value {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<Service4Key>(), 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Service4Value>(), 4 + 2 + 2 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<Affinity4Key>(), 8 + 2 + 6);
        assert_eq!(size_of::<Affinity4Value>(), 8 + 4 + 4);
        assert_eq!(size_of::<Backend4Value>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<RevNat4Value>(), 4 + 2 + 2);
        assert_eq!(size_of::<SockRevNat4Key>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SockRevNat4Value>(), 4 + 2 + 2);
    }
}
