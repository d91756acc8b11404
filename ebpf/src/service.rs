//! Service lookup and the two socket translations every hook is built from: forward
//! (service → backend, at connect/sendmsg) and reverse (backend → service, at
//! recvmsg/getpeername), written once over the address type ([`Family`]: `u32` for IPv4,
//! [`Ipv6Words`] for IPv6). Addresses stay in network byte order throughout.
//!
//! An IPv6 socket may reach an IPv4 service through its IPv4-mapped address
//! (`::ffff:a.b.c.d`, a dual-stack socket): the IPv6 hooks translate those through the
//! IPv4 maps and hand back the backend as an IPv4-mapped address.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use weir_ebpf_common::{
    AffinityKey, AffinityValue, BackendValue, Ipv6Words, MAGLEV_TABLE_SIZE, PROTO_TCP, PROTO_UDP, RevNatValue,
    SCOPE_EXTERNAL, SERVICE_FLAG_MAGLEV, ServiceMapKey, ServiceValue, SockRevNat4Key, SockRevNat6Key, SockRevNatValue,
    maglev_key,
};

use crate::maps::{
    AFFINITY, BACKENDS4, BACKENDS6, MAGLEV, REV_NAT4, REV_NAT6, SERVICES4, SERVICES6, SOCK_REV_NAT4, SOCK_REV_NAT6,
};

/// Return codes of cgroup/sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// errno values handed to `bpf_set_retval` (negated) when a hook rejects.
pub const ECONNREFUSED: i32 = 111;
pub const ENOMEM: i32 = 12;

/// An address family, named by its address type: which maps hold its services.
pub trait Family: Copy + PartialEq + 'static {
    type SockKey: Copy + 'static;

    fn services() -> &'static HashMap<ServiceMapKey<Self>, ServiceValue>;
    fn backends() -> &'static HashMap<u32, BackendValue<Self>>;
    fn rev_nats() -> &'static HashMap<u32, RevNatValue<Self>>;
    fn sock_rev_nats() -> &'static LruHashMap<Self::SockKey, SockRevNatValue<Self>>;
    /// The SOCK_REV_NAT key of a socket (`cookie`) talking to a backend.
    fn sock_key(cookie: u64, address: Self, port: u16) -> Self::SockKey;
}

impl Family for u32 {
    type SockKey = SockRevNat4Key;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceMapKey<u32>, ServiceValue> {
        &SERVICES4
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendValue<u32>> {
        &BACKENDS4
    }

    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, RevNatValue<u32>> {
        &REV_NAT4
    }

    #[inline(always)]
    fn sock_rev_nats() -> &'static LruHashMap<SockRevNat4Key, SockRevNatValue<u32>> {
        &SOCK_REV_NAT4
    }

    #[inline(always)]
    fn sock_key(cookie: u64, address: u32, port: u16) -> SockRevNat4Key {
        SockRevNat4Key {
            cookie,
            address,
            port,
            pad: [0; 2],
        }
    }
}

impl Family for Ipv6Words {
    type SockKey = SockRevNat6Key;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceMapKey<Ipv6Words>, ServiceValue> {
        &SERVICES6
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendValue<Ipv6Words>> {
        &BACKENDS6
    }

    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u32, RevNatValue<Ipv6Words>> {
        &REV_NAT6
    }

    #[inline(always)]
    fn sock_rev_nats() -> &'static LruHashMap<SockRevNat6Key, SockRevNatValue<Ipv6Words>> {
        &SOCK_REV_NAT6
    }

    #[inline(always)]
    fn sock_key(cookie: u64, address: Ipv6Words, port: u16) -> SockRevNat6Key {
        SockRevNat6Key {
            cookie,
            address,
            port,
            pad: [0; 6],
        }
    }
}

pub enum Selection<A> {
    /// A service with nothing to send to, or a slot that vanished under a concurrent update.
    NoBackend,
    Backend {
        backend: BackendValue<A>,
        backend_id: u32,
        rev_nat_id: u32,
    },
}

/// The frontend (slot 0) of `address:port/proto`, if it is a service.
#[inline(always)]
pub fn lookup_frontend<A: Family>(address: A, port: u16, proto: u8) -> Option<(ServiceMapKey<A>, ServiceValue)> {
    let key = ServiceMapKey {
        address,
        port,
        slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        pad: [0; 2],
    };
    let frontend = A::services().get_ptr(key)?;
    // SAFETY: a map value pointer from a successful lookup; copied out at once.
    Some((key, unsafe { *frontend }))
}

/// Slot 0 holds the frontend; a random slot in `1..=backend_count` names the backend, or,
/// for a Maglev service, the table slot `hash` falls on (random when that slot is not
/// written yet or names a backend already gone). With sessionAffinity, `client` (a netns
/// cookie, or [`weir_ebpf_common::AFFINITY_CLIENT_IP`] | an IPv4 address) keeps its last backend.
#[inline(always)]
pub fn select_backend<A: Family>(
    key: ServiceMapKey<A>,
    frontend: ServiceValue,
    client: u64,
    hash: u64,
) -> Selection<A> {
    if frontend.affinity_timeout == 0 || frontend.backend_count == 0 {
        return choose_backend(key, frontend, hash);
    }
    // sessionAffinity ClientIP: the client's last backend while it is younger than the
    // timeout and still exists; otherwise a fresh choice, remembered.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity_key = AffinityKey {
        netns_cookie: client,
        rev_nat_id: frontend.rev_nat_id,
        pad: 0,
    };
    let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr(affinity_key) {
        // SAFETY: a map value pointer from a successful lookup; copied out at once.
        let entry = unsafe { *entry };
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns
            && let Some(backend) = A::backends().get_ptr(entry.backend_id)
        {
            // SAFETY: as above.
            let backend = unsafe { *backend };
            let _ = AFFINITY.insert(
                affinity_key,
                AffinityValue {
                    last_used_ns: now,
                    ..entry
                },
                0,
            );
            return Selection::Backend {
                backend,
                backend_id: entry.backend_id,
                rev_nat_id: frontend.rev_nat_id,
            };
        }
    }
    let selection = choose_backend(key, frontend, hash);
    if let Selection::Backend { backend_id, .. } = selection {
        let value = AffinityValue {
            last_used_ns: now,
            backend_id,
            pad: 0,
        };
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    selection
}

/// Random or Maglev choice among the selectable slots of `frontend`.
#[inline(always)]
fn choose_backend<A: Family>(mut key: ServiceMapKey<A>, frontend: ServiceValue, hash: u64) -> Selection<A> {
    let count = u32::from(frontend.backend_count);
    if count == 0 {
        return Selection::NoBackend;
    }
    if frontend.flags & SERVICE_FLAG_MAGLEV != 0 {
        let slot = (hash % u64::from(MAGLEV_TABLE_SIZE)) as u32;
        if let Some(id) = MAGLEV.get_ptr(maglev_key(frontend.rev_nat_id, slot)) {
            // SAFETY: a map value pointer from a successful lookup; copied out at once.
            let backend_id = unsafe { *id };
            if let Some(backend) = A::backends().get_ptr(backend_id) {
                return Selection::Backend {
                    // SAFETY: as above.
                    backend: unsafe { *backend },
                    backend_id,
                    rev_nat_id: frontend.rev_nat_id,
                };
            }
        }
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    key.slot = (random % count) as u16 + 1;
    let Some(slot) = A::services().get_ptr(key) else {
        return Selection::NoBackend;
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(backend) = A::backends().get_ptr(backend_id) else {
        return Selection::NoBackend;
    };
    Selection::Backend {
        // SAFETY: as above.
        backend: unsafe { *backend },
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
    }
}

/// splitmix64's finalizer: netns cookies are small consecutive numbers.
#[inline(always)]
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The backend a connect/sendmsg of `protocol` to `address:port` must go to instead, if
/// that is a service, after remembering the service for replies and getpeername.
/// `Err(errno)`: reject the call.
#[inline(always)]
fn forward<A: Family>(ctx: &SockAddrContext, protocol: u32, address: A, port: u16) -> Result<Option<(A, u16)>, i32> {
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Ok(None),
    };
    let Some((key, frontend)) = lookup_frontend(address, port, proto) else {
        return Ok(None);
    };
    // SAFETY: the helper accepts a sock_addr context. The client is its netns: Maglev and
    // affinity keep one pod on one backend.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (backend, rev_nat_id) = match select_backend(key, frontend, netns, mix64(netns)) {
        Selection::NoBackend => return Err(ECONNREFUSED),
        Selection::Backend {
            backend, rev_nat_id, ..
        } => (backend, rev_nat_id),
    };

    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let value = SockRevNatValue {
        address,
        port,
        pad: [0; 2],
        rev_nat_id,
    };
    // UDP replies cannot be recognised without this entry; a TCP socket only loses the
    // service address in getpeername, which is no reason to fail its connect.
    let sock_key = A::sock_key(cookie, backend.address, backend.port);
    if A::sock_rev_nats().insert(sock_key, value, 0).is_err() && proto == PROTO_UDP {
        return Err(ENOMEM);
    }
    Ok(Some((backend.address, backend.port)))
}

/// The service a backend address seen by recvmsg/getpeername stands for, if the socket
/// was translated to it. Entries whose service has gone (or changed) are dropped instead.
#[inline(always)]
fn reverse<A: Family>(ctx: &SockAddrContext, address: A, port: u16) -> Option<(A, u16)> {
    // SAFETY: the helper accepts a sock_addr context.
    let key = A::sock_key(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, address, port);
    let map = A::sock_rev_nats();
    // SAFETY: a map value pointer from a successful lookup; copied out at once.
    let entry = unsafe { *map.get_ptr(key)? };
    let current = A::rev_nats().get_ptr(entry.rev_nat_id);
    // SAFETY: as above.
    let still_valid =
        current.is_some_and(|rev| unsafe { (*rev).address == entry.address && (*rev).port == entry.port });
    if !still_valid {
        let _ = map.remove(key);
        return None;
    }
    Some((entry.address, entry.port))
}

/// `::ffff:0:0/96` in network byte order: the third word of an IPv4-mapped address.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address inside an IPv4-mapped IPv6 address.
#[inline(always)]
fn unmap_v4(address: Ipv6Words) -> Option<u32> {
    (address[0] == 0 && address[1] == 0 && address[2] == V4_MAPPED_WORD).then_some(address[3])
}

#[inline(always)]
fn map_v4(address: u32) -> Ipv6Words {
    [0, 0, V4_MAPPED_WORD, address]
}

/// `user_ip6`, read one word at a time at fixed offsets from the context: a copy of the
/// whole array may compile to loads through a pointer moved off the context, which the
/// verifier refuses ("dereference of modified ctx ptr").
///
/// # Safety
/// `sock_addr` is the context of a cgroup/sock_addr program.
#[inline(always)]
unsafe fn read_user_ip6(sock_addr: *const bpf_sock_addr) -> Ipv6Words {
    // SAFETY: fields of the valid context, read in place.
    unsafe {
        [
            read_volatile(&raw const (*sock_addr).user_ip6[0]),
            read_volatile(&raw const (*sock_addr).user_ip6[1]),
            read_volatile(&raw const (*sock_addr).user_ip6[2]),
            read_volatile(&raw const (*sock_addr).user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time, for the reason given at [`read_user_ip6`].
///
/// # Safety
/// `sock_addr` is the context of a cgroup/sock_addr program whose hook may write `user_ip6`.
#[inline(always)]
unsafe fn write_user_ip6(sock_addr: *mut bpf_sock_addr, address: Ipv6Words) {
    // SAFETY: fields of the valid context, written in place.
    unsafe {
        write_volatile(&raw mut (*sock_addr).user_ip6[0], address[0]);
        write_volatile(&raw mut (*sock_addr).user_ip6[1], address[1]);
        write_volatile(&raw mut (*sock_addr).user_ip6[2], address[2]);
        write_volatile(&raw mut (*sock_addr).user_ip6[3], address[3]);
    }
}

/// connect4/sendmsg4: rewrites the destination of a call to a service into one of its
/// backends. `Err(errno)`: reject the call.
#[inline(always)]
pub fn translate_forward4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let (protocol, address, port) = unsafe {
        (
            (*sock_addr).protocol,
            (*sock_addr).user_ip4,
            (*sock_addr).user_port as u16,
        )
    };
    if let Some((address, port)) = forward(ctx, protocol, address, port)? {
        // SAFETY: as above; these fields are writable in connect4 and sendmsg4.
        unsafe {
            (*sock_addr).user_ip4 = address;
            (*sock_addr).user_port = u32::from(port);
        }
    }
    Ok(ALLOW)
}

/// connect6/sendmsg6: [`translate_forward4`] for IPv6 sockets; an IPv4-mapped destination
/// is translated through the IPv4 maps.
#[inline(always)]
pub fn translate_forward6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let (protocol, address, port) = unsafe {
        (
            (*sock_addr).protocol,
            read_user_ip6(sock_addr),
            (*sock_addr).user_port as u16,
        )
    };
    let backend = match unmap_v4(address) {
        Some(v4) => forward(ctx, protocol, v4, port)?.map(|(v4, port)| (map_v4(v4), port)),
        None => forward(ctx, protocol, address, port)?,
    };
    if let Some((address, port)) = backend {
        // SAFETY: as above; these fields are writable in connect6 and sendmsg6.
        unsafe {
            write_user_ip6(sock_addr, address);
            (*sock_addr).user_port = u32::from(port);
        }
    }
    Ok(ALLOW)
}

/// recvmsg4/getpeername4: makes a backend address read as the service it stands for.
#[inline(always)]
pub fn translate_reverse4(ctx: &SockAddrContext) {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let (address, port) = unsafe { ((*sock_addr).user_ip4, (*sock_addr).user_port as u16) };
    if let Some((address, port)) = reverse(ctx, address, port) {
        // SAFETY: these fields are writable in recvmsg4 and getpeername4.
        unsafe {
            (*sock_addr).user_ip4 = address;
            (*sock_addr).user_port = u32::from(port);
        }
    }
}

/// recvmsg6/getpeername6: [`translate_reverse4`] for IPv6 sockets, IPv4-mapped peers included.
#[inline(always)]
pub fn translate_reverse6(ctx: &SockAddrContext) {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let (address, port) = unsafe { (read_user_ip6(sock_addr), (*sock_addr).user_port as u16) };
    let service = match unmap_v4(address) {
        Some(v4) => reverse(ctx, v4, port).map(|(v4, port)| (map_v4(v4), port)),
        None => reverse(ctx, address, port),
    };
    if let Some((address, port)) = service {
        // SAFETY: these fields are writable in recvmsg6 and getpeername6.
        unsafe {
            write_user_ip6(sock_addr, address);
            (*sock_addr).user_port = u32::from(port);
        }
    }
}
