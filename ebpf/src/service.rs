//! Service lookup and the two socket translations every hook is built from: forward
//! (service → backend, at connect/sendmsg) and reverse (backend → service, at
//! recvmsg/getpeername). Addresses stay in network byte order throughout.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use weir_ebpf_common::{
    Affinity4Key, Affinity4Value, Backend4Value, MAGLEV_TABLE_SIZE, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
    SERVICE_FLAG_MAGLEV, Service4Key, Service4Value, SockRevNat4Key, SockRevNat4Value, maglev_key,
};

use crate::maps::{AFFINITY4, BACKENDS4, MAGLEV4, REV_NAT4, SERVICES4, SOCK_REV_NAT4};

/// Return codes of cgroup/sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// errno values handed to `bpf_set_retval` (negated) when a hook rejects.
pub const ECONNREFUSED: i32 = 111;
pub const ENOMEM: i32 = 12;

pub enum Selection {
    /// A service with nothing to send to, or a slot that vanished under a concurrent update.
    NoBackend,
    Backend {
        backend: Backend4Value,
        backend_id: u32,
        rev_nat_id: u32,
    },
}

/// The frontend (slot 0) of `address:port/proto`, if it is a service.
#[inline(always)]
pub fn lookup_frontend(address: u32, port: u16, proto: u8) -> Option<(Service4Key, Service4Value)> {
    let key = Service4Key {
        address,
        port,
        slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        pad: [0; 2],
    };
    let frontend = SERVICES4.get_ptr(key)?;
    // SAFETY: a map value pointer from a successful lookup; copied out at once.
    Some((key, unsafe { *frontend }))
}

/// Slot 0 holds the frontend; a random slot in `1..=backend_count` names the backend, or,
/// for a Maglev service, the table slot `hash` falls on (random when that slot is not
/// written yet or names a backend already gone). With sessionAffinity, `client` (a netns
/// cookie, or [`weir_ebpf_common::AFFINITY_CLIENT_IP`] | an IPv4 address) keeps its last backend.
#[inline(always)]
pub fn select_backend(key: Service4Key, frontend: Service4Value, client: u64, hash: u64) -> Selection {
    if frontend.affinity_timeout == 0 || frontend.backend_count == 0 {
        return choose_backend(key, frontend, hash);
    }
    // sessionAffinity ClientIP: the client's last backend while it is younger than the
    // timeout and still exists; otherwise a fresh choice, remembered.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity_key = Affinity4Key {
        netns_cookie: client,
        rev_nat_id: frontend.rev_nat_id,
        pad: 0,
    };
    let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
    if let Some(entry) = AFFINITY4.get_ptr(affinity_key) {
        // SAFETY: a map value pointer from a successful lookup; copied out at once.
        let entry = unsafe { *entry };
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns
            && let Some(backend) = BACKENDS4.get_ptr(entry.backend_id)
        {
            // SAFETY: as above.
            let backend = unsafe { *backend };
            let _ = AFFINITY4.insert(
                affinity_key,
                Affinity4Value {
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
        let value = Affinity4Value {
            last_used_ns: now,
            backend_id,
            pad: 0,
        };
        let _ = AFFINITY4.insert(affinity_key, value, 0);
    }
    selection
}

/// Random or Maglev choice among the selectable slots of `frontend`.
#[inline(always)]
fn choose_backend(mut key: Service4Key, frontend: Service4Value, hash: u64) -> Selection {
    let count = u32::from(frontend.backend_count);
    if count == 0 {
        return Selection::NoBackend;
    }
    if frontend.flags & SERVICE_FLAG_MAGLEV != 0 {
        let slot = (hash % u64::from(MAGLEV_TABLE_SIZE)) as u32;
        if let Some(id) = MAGLEV4.get_ptr(maglev_key(frontend.rev_nat_id, slot)) {
            // SAFETY: a map value pointer from a successful lookup; copied out at once.
            let backend_id = unsafe { *id };
            if let Some(backend) = BACKENDS4.get_ptr(backend_id) {
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
    let Some(slot) = SERVICES4.get_ptr(key) else {
        return Selection::NoBackend;
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(backend) = BACKENDS4.get_ptr(backend_id) else {
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

/// Rewrites the destination of a connect/sendmsg to a service into one of its backends,
/// and remembers the service for replies and getpeername. `Err(errno)`: reject the call.
#[inline(always)]
pub fn translate_forward(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let (protocol, address, port) = unsafe {
        (
            (*sock_addr).protocol,
            (*sock_addr).user_ip4,
            (*sock_addr).user_port as u16,
        )
    };
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Ok(ALLOW),
    };
    let Some((key, frontend)) = lookup_frontend(address, port, proto) else {
        return Ok(ALLOW);
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
    let key = SockRevNat4Key {
        cookie,
        address: backend.address,
        port: backend.port,
        pad: [0; 2],
    };
    let value = SockRevNat4Value {
        address,
        port,
        pad: [0; 2],
        rev_nat_id,
    };
    // UDP replies cannot be recognised without this entry; a TCP socket only loses the
    // service address in getpeername, which is no reason to fail its connect.
    if SOCK_REV_NAT4.insert(key, value, 0).is_err() && proto == PROTO_UDP {
        return Err(ENOMEM);
    }

    // SAFETY: as above; these fields are writable in connect4 and sendmsg4.
    unsafe {
        (*sock_addr).user_ip4 = backend.address;
        (*sock_addr).user_port = u32::from(backend.port);
    }
    Ok(ALLOW)
}

/// Makes a backend address seen by recvmsg/getpeername read as the service it stands
/// for. Entries whose service has gone (or changed) are dropped instead of applied.
#[inline(always)]
pub fn translate_reverse(ctx: &SockAddrContext) {
    let sock_addr = ctx.sock_addr;
    // SAFETY: see translate_forward; both helpers accept a sock_addr context.
    let key = unsafe {
        SockRevNat4Key {
            cookie: bpf_get_socket_cookie(ctx.as_ptr()),
            address: (*sock_addr).user_ip4,
            port: (*sock_addr).user_port as u16,
            pad: [0; 2],
        }
    };
    let Some(entry) = SOCK_REV_NAT4.get_ptr(key) else {
        return;
    };
    // SAFETY: a map value pointer from a successful lookup; copied out at once.
    let entry = unsafe { *entry };
    let current = REV_NAT4.get_ptr(entry.rev_nat_id);
    // SAFETY: as above.
    let still_valid =
        current.is_some_and(|rev| unsafe { (*rev).address == entry.address && (*rev).port == entry.port });
    if !still_valid {
        let _ = SOCK_REV_NAT4.remove(key);
        return;
    }
    // SAFETY: these fields are writable in recvmsg4 and getpeername4.
    unsafe {
        (*sock_addr).user_ip4 = entry.address;
        (*sock_addr).user_port = u32::from(entry.port);
    }
}
