//! NodePort and LoadBalancer traffic from outside the node, per packet: the logic TC and
//! XDP share, written once over [`Packet`] (TC edits through the skb helpers, which also
//! fix checksums; XDP edits the packet memory and updates checksums itself).
//!
//! A packet whose 5-tuple is in CT4 gets that entry's rewrite. Otherwise, at ingress, a
//! packet to a frontend flagged `SERVICE_FLAG_EXTERNAL` starts a flow: a backend is chosen
//! as for socket-LB (random, Maglev over the flow, affinity by client IP) and the entries
//! go into CT4:
//!
//! ```text
//!  ingress  client:cp  → frontend:fp   DNAT to backend:bp
//!  egress   backend:bp → client:cp     source back to frontend:fp
//!  and for a remote backend (SNAT):
//!  egress   client:cp  → backend:bp    source to snat:sp (sp free in the range)
//!  ingress  backend:bp → snat:sp       destination back to client:cp
//! ```
//!
//! With DSR (the node's `NODE_FLAG_DSR`), a flow to a remote backend is DNATed only: the
//! client's address is kept, there are no reply entries on this node, and the packets that
//! need it (every UDP datagram, a TCP SYN) carry the service's address:port to the backend's
//! node in an IPv4 option (`DSR_OPTION_TYPE`, 8 bytes after the fixed header; XDP and TC
//! both add it). That node's TC ingress, seeing the option for a frontend it knows, records
//! the flow:
//!
//! ```text
//!  ingress  client:cp  → backend:bp    nothing (tracks the connection after its SYN)
//!  egress   backend:bp → client:cp     source to frontend:fp, straight to the client
//! ```
//!
//! The option makes packets 8 bytes longer. A UDP datagram within 8 bytes of the path MTU
//! to the backend's node is, with DF, answered with "fragmentation needed", which goes back
//! to the client reverse-NATed and with the MTU lowered by 8 (path MTU discovery then makes
//! room); without DF it is fragmented, and fragments are not read for the option, so its
//! replies would leave untranslated. TCP carries the option on the SYN only. The option
//! stays in the packet the backend receives (the kernel ignores unknown options).
//!
//! ICMP errors (destination unreachable, time exceeded, parameter problem) about a flow
//! are found by the header they quote and rewritten as that flow's replies are, so the
//! client's socket learns of them (ECONNREFUSED, a smaller path MTU): see [`icmp_error`].
//!
//! Only destinations change at ingress and only sources at egress, so after every rewrite
//! the kernel routes the packet as any router would (routes, neighbours, TTL, ICMP stay
//! its business). A source rewritten at ingress to a node address (SNAT, or the frontend
//! on a reply) would be dropped by the kernel as a martian source; sending such packets out
//! from the program needs bpf_fib_lookup, which is GPL-only, and these programs are
//! Apache-2.0. The price: the interfaces towards other nodes must carry TC egress too.
//!
//! Not handled (passed to the kernel untouched): IPv6, IP fragments, protocols other than
//! TCP, UDP and ICMP errors, and (XDP only) IPv4 headers with options and ICMP errors,
//! which TC then translates.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use weir_ebpf_common::{
    AFFINITY_CLIENT_IP, BACKEND_FLAG_REMOTE, CT_FLAG_CLOSING, CT_FLAG_DSR, CT_FLAG_DSR_BACKEND, CT_FLAG_EGRESS,
    CT_FLAG_REPLY, CT_FLAG_SNAT, CT_FLAG_SYN, Ct4Key, Ct4Value, DSR_OPTION_LEN, DSR_OPTION_TYPE, NODE_FLAG_DSR,
    Node4Config, PROTO_TCP, PROTO_UDP, SERVICE_FLAG_EXTERNAL, SERVICE_FLAG_LOCAL, STAT_DROP_DSR, STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_SNAT, STAT_DSR_OPTION_ADDED, STAT_DSR_RECORDED, STAT_ICMP_REV_NAT,
};

use crate::maps::{BACKENDS4, CT4, NODE4, STATS};
use crate::service::{Selection, lookup_frontend, mix64, select_backend};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
pub const IP_CSUM: usize = ETH_HLEN + 10;
/// The fixed IPv4 header; the DSR option goes right after it.
pub const IP_HLEN: usize = 20;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable code: fragmentation needed and DF set (its MTU at bytes 6-7).
const ICMP_FRAG_NEEDED: u8 = 4;
/// The smallest MTU an IPv4 link may have (RFC 791).
const MIN_IPV4_MTU: u16 = 68;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
/// How recent the forward direction's last packet must be for a SYN-ACK to belong to it:
/// covers the server's SYN-ACK retransmissions (1 s, then 2 s more).
const SYN_ACK_WINDOW_NS: u64 = 3_000_000_000;
/// Free SNAT ports tried per new flow before it is dropped.
const SNAT_ATTEMPTS: u32 = 8;

pub enum Verdict {
    Pass,
    Drop,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

/// Where the L4 checksum is and how it behaves.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub offset: usize,
    /// UDP: a zero checksum means "none" and must stay zero; a computed zero is sent as 0xffff.
    pub udp: bool,
}

/// Reading and rewriting one packet. Offsets count from the Ethernet header.
pub trait Packet {
    /// Whether IPv4 headers with options (variable L4 offsets) can be handled.
    const IP_OPTIONS: bool;
    /// Whether ICMP errors are reverse-NATed here. Where they are not (XDP), they pass
    /// untouched to TC.
    const ICMP_ERRORS: bool;
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Replaces the 4 bytes at `offset` (an address, `old` → `new`, network order) and
    /// updates the IPv4 header checksum and the L4 checksum (pseudo-header).
    fn set_addr(&mut self, offset: usize, csum: L4Csum, old: u32, new: u32) -> Option<()>;
    /// Replaces the 2 bytes at `offset` (a port, or another 16-bit field the L4 checksum
    /// covers without a pseudo-header) and updates the L4 checksum.
    fn set_port(&mut self, offset: usize, csum: L4Csum, old: u16, new: u16) -> Option<()>;
    /// Replaces the 4 bytes at `offset` (an address, `old` → `new`, network order) and
    /// updates the IPv4 header checksum at `ip_csum` only: an address of an ICMP packet,
    /// or of the IPv4 header an ICMP error quotes (whose sum, checksum included, does not
    /// change, so neither does the ICMP checksum over it).
    fn set_addr_l3(&mut self, offset: usize, ip_csum: usize, old: u32, new: u32) -> Option<()>;
    /// Inserts `option` right after the fixed IPv4 header (of a packet whose header is
    /// at most 52 bytes), updating the header length, total length and header checksum.
    /// The L4 checksum does not cover the IPv4 header, so it stays. On failure the packet
    /// may be left half-edited: the caller drops it.
    fn insert_ip_option(&mut self, option: [u8; DSR_OPTION_LEN as usize]) -> Option<()>;
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(counter) = STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot of this CPU; nothing else writes it while we run.
        unsafe { *counter += 1 };
    }
}

/// Translates one packet at `hook`; `new_stat`/`tracked_stat` count new flows and
/// packets of known flows.
#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P, hook: Hook, new_stat: u32, tracked_stat: u32) -> Verdict {
    match try_process(pkt, hook, new_stat, tracked_stat) {
        Some(verdict) => verdict,
        // A packet too short for its headers, or a failed rewrite: the kernel decides.
        None => Verdict::Pass,
    }
}

#[inline(always)]
fn try_process<P: Packet>(pkt: &mut P, hook: Hook, new_stat: u32, tracked_stat: u32) -> Option<Verdict> {
    if pkt.load::<u16>(12)? != ETH_P_IP.to_be() {
        return Some(Verdict::Pass);
    }
    let version_ihl: u8 = pkt.load(ETH_HLEN)?;
    if version_ihl >> 4 != 4 {
        return Some(Verdict::Pass);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 || (ihl != 20 && !P::IP_OPTIONS) {
        return Some(Verdict::Pass);
    }
    // More-fragments or a fragment offset: only the first fragment has ports.
    let frag: u16 = pkt.load(ETH_HLEN + 6)?;
    if frag & 0x3fffu16.to_be() != 0 {
        return Some(Verdict::Pass);
    }
    let proto: u8 = pkt.load(ETH_HLEN + 9)?;
    let l4 = ETH_HLEN + ihl;
    if P::ICMP_ERRORS && proto == PROTO_ICMP {
        return icmp_error(pkt, hook, l4);
    }
    let csum = match proto {
        PROTO_TCP => L4Csum {
            offset: l4 + 16,
            udp: false,
        },
        PROTO_UDP => L4Csum {
            offset: l4 + 6,
            udp: true,
        },
        _ => return Some(Verdict::Pass),
    };
    let key = Ct4Key {
        saddr: pkt.load(IP_SADDR)?,
        daddr: pkt.load(IP_DADDR)?,
        sport: pkt.load(l4)?,
        dport: pkt.load(l4 + 2)?,
        proto,
        pad: [0; 3],
    };
    let tcp_flags: u8 = if proto == PROTO_TCP { pkt.load(l4 + 13)? } else { 0 };
    let closing = tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    let syn = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let syn_ack = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // The packets that carry the DSR option: every UDP datagram, and the TCP SYN (the
    // backend's node tracks the rest of the connection from it).
    let dsr_option_wanted = proto == PROTO_UDP || syn;

    // This node is a DSR flow's backend node: the option says which service the client
    // asked for. Only TC ingress reads it (XDP passes headers with options on).
    if P::IP_OPTIONS && hook == Hook::TcIngress && ihl >= IP_HLEN + DSR_OPTION_LEN as usize {
        let option: [u8; 4] = pkt.load(ETH_HLEN + IP_HLEN)?;
        if option[0] == DSR_OPTION_TYPE && option[1] == DSR_OPTION_LEN {
            let port = u16::from_ne_bytes([option[2], option[3]]);
            let address: u32 = pkt.load(ETH_HLEN + IP_HLEN + 4)?;
            record_dsr(&key, address, port, now, syn);
            return Some(Verdict::Pass);
        }
    }

    if let Some(ptr) = CT4.get_ptr_mut(key) {
        // SAFETY: a map value pointer from a successful lookup; copied out at once.
        let entry = unsafe { *ptr };
        if (entry.flags & CT_FLAG_EGRESS != 0) != (hook == Hook::TcEgress) {
            // Another hook's entry (e.g. TC ingress after XDP translated the packet).
            return Some(Verdict::Pass);
        }
        let dsr_option = entry.flags & CT_FLAG_DSR != 0 && dsr_option_wanted;
        let dnat = entry.flags & (CT_FLAG_REPLY | CT_FLAG_EGRESS) == 0;
        let stale = if dnat {
            // A new connection on a tracked tuple is balanced anew (a retransmitted SYN,
            // after a SYN, is not), as is a flow whose backend went away (the flow's
            // other entries age out). A DSR backend node's forward entry has no backend.
            (syn && entry.flags & CT_FLAG_SYN == 0)
                || (entry.flags & CT_FLAG_DSR_BACKEND == 0 && !backend_still_there(&entry))
        } else {
            // A SYN-ACK answers a SYN that just went through this flow; otherwise it
            // belongs to a connection that only reuses the tuple (say, a client that now
            // talks to the backend directly) and must not be rewritten.
            syn_ack && entry.flags & CT_FLAG_REPLY != 0 && !syn_just_sent(&entry.peer, now)
        };
        if !stale {
            // SAFETY: as above; plain stores into it are how BPF programs update entries
            // in place (a racing update only loses a timestamp).
            unsafe {
                (*ptr).last_seen_ns = now;
                if closing {
                    (*ptr).flags |= CT_FLAG_CLOSING;
                }
                if entry.flags & CT_FLAG_REPLY == 0 {
                    (*ptr).flags = if syn {
                        (*ptr).flags | CT_FLAG_SYN
                    } else {
                        (*ptr).flags & !CT_FLAG_SYN
                    };
                }
            }
            rewrite(pkt, l4, csum, &key, &entry)?;
            count(tracked_stat);
            if dsr_option {
                return Some(add_dsr_option(pkt, key.daddr, key.dport));
            }
            return Some(Verdict::Pass);
        }
        let _ = CT4.remove(key);
        if !dnat {
            return Some(Verdict::Pass);
        }
    }
    if hook == Hook::TcEgress {
        return Some(Verdict::Pass);
    }

    let Some((service_key, frontend)) = lookup_frontend(key.daddr, key.dport, proto) else {
        return Some(Verdict::Pass);
    };
    if frontend.flags & SERVICE_FLAG_EXTERNAL == 0 {
        return Some(Verdict::Pass);
    }
    // Maglev spreads flows (not clients): the 5-tuple minus the fixed frontend half.
    let flow_hash = mix64((u64::from(key.saddr) << 32) | (u64::from(key.sport) << 16) | u64::from(proto));
    let client = AFFINITY_CLIENT_IP | u64::from(key.saddr);
    let (backend, backend_id, rev_nat_id) = match select_backend(service_key, frontend, client, flow_hash) {
        Selection::Backend {
            backend,
            backend_id,
            rev_nat_id,
        } => (backend, backend_id, rev_nat_id),
        Selection::NoBackend => {
            count(STAT_DROP_NO_BACKEND);
            return Some(Verdict::Drop);
        }
    };

    let remote = frontend.flags & SERVICE_FLAG_LOCAL == 0 && backend.flags & BACKEND_FLAG_REMOTE != 0;
    let syn_flag = if syn { CT_FLAG_SYN } else { 0 };
    let config = if remote { node_config()? } else { Node4Config::default() };
    if remote && config.flags & NODE_FLAG_DSR != 0 {
        // DNAT only, the client's address kept; replies go from the backend's node
        // straight to the client, so nothing here waits for them.
        let forward = Ct4Value {
            last_seen_ns: now,
            saddr: 0,
            daddr: backend.address,
            sport: 0,
            dport: backend.port,
            peer: key,
            rev_nat_id,
            flags: CT_FLAG_DSR | syn_flag,
            pad: [0; 3],
            backend_id,
        };
        if CT4.insert(key, forward, 0).is_err() {
            count(STAT_DROP_DSR);
            return Some(Verdict::Drop);
        }
        rewrite(pkt, l4, csum, &key, &forward)?;
        count(new_stat);
        if dsr_option_wanted {
            return Some(add_dsr_option(pkt, key.daddr, key.dport));
        }
        return Some(Verdict::Pass);
    }
    let snat = remote;
    let flags = if snat { CT_FLAG_SNAT } else { 0 };
    // Client → backend after DNAT, and backend → client before the reverse rewrite.
    let dnatted = Ct4Key {
        daddr: backend.address,
        dport: backend.port,
        ..key
    };
    let reply = Ct4Key {
        saddr: backend.address,
        daddr: key.saddr,
        sport: backend.port,
        dport: key.sport,
        proto,
        pad: [0; 3],
    };
    let forward = Ct4Value {
        last_seen_ns: now,
        saddr: 0,
        daddr: backend.address,
        sport: 0,
        dport: backend.port,
        peer: reply,
        rev_nat_id,
        flags: flags | syn_flag,
        pad: [0; 3],
        backend_id,
    };
    let reverse = Ct4Value {
        last_seen_ns: now,
        saddr: key.daddr,
        daddr: 0,
        sport: key.dport,
        dport: 0,
        peer: key,
        rev_nat_id,
        flags: flags | CT_FLAG_REPLY | CT_FLAG_EGRESS,
        pad: [0; 3],
        backend_id,
    };
    if snat {
        let mut snat_reply = Ct4Key {
            saddr: backend.address,
            sport: backend.port,
            ..reply
        };
        let Some((address, port)) = snat_port(&config, &mut snat_reply) else {
            count(STAT_DROP_NO_SNAT);
            return Some(Verdict::Drop);
        };
        let snat_forward = Ct4Value {
            last_seen_ns: now,
            saddr: address,
            daddr: 0,
            sport: port,
            dport: 0,
            peer: snat_reply,
            rev_nat_id,
            flags: flags | syn_flag | CT_FLAG_EGRESS,
            pad: [0; 3],
            backend_id,
        };
        let snat_reverse = Ct4Value {
            last_seen_ns: now,
            saddr: 0,
            daddr: key.saddr,
            sport: 0,
            dport: key.sport,
            peer: dnatted,
            rev_nat_id,
            flags: flags | CT_FLAG_REPLY,
            pad: [0; 3],
            backend_id,
        };
        if CT4.insert(snat_reply, snat_reverse, 0).is_err() || CT4.insert(dnatted, snat_forward, 0).is_err() {
            count(STAT_DROP_NO_SNAT);
            return Some(Verdict::Drop);
        }
    }
    // Replies can only come after the forward packet went out: reverse entries first.
    if CT4.insert(reply, reverse, 0).is_err() || CT4.insert(key, forward, 0).is_err() {
        count(STAT_DROP_NO_SNAT);
        return Some(Verdict::Drop);
    }
    rewrite(pkt, l4, csum, &key, &forward)?;
    count(new_stat);
    Some(Verdict::Pass)
}

/// Whether the backend a DNAT entry sends to is still a backend.
#[inline(always)]
fn backend_still_there(entry: &Ct4Value) -> bool {
    // SAFETY: a map value pointer from a successful lookup, read at once.
    BACKENDS4
        .get_ptr(entry.backend_id)
        .is_some_and(|backend| unsafe { (*backend).address == entry.daddr && (*backend).port == entry.dport })
}

/// Whether the last packet through the forward entry `key` was a SYN, in the last
/// [`SYN_ACK_WINDOW_NS`].
#[inline(always)]
fn syn_just_sent(key: &Ct4Key, now: u64) -> bool {
    // SAFETY: a map value pointer from a successful lookup, read at once.
    CT4.get_ptr(*key).is_some_and(|entry| unsafe {
        (*entry).flags & CT_FLAG_SYN != 0 && now.wrapping_sub((*entry).last_seen_ns) < SYN_ACK_WINDOW_NS
    })
}

/// The node's settings, as the agent last wrote them.
#[inline(always)]
fn node_config() -> Option<Node4Config> {
    // SAFETY: an array map value pointer; copied out at once.
    Some(unsafe { *NODE4.get_ptr(0)? })
}

/// Adds the DSR option naming the service `address:port` (network order) to a packet
/// already DNATed to a backend on another node; drops the packet when it cannot, since
/// without it the backend's node could not give the replies the service's address.
#[inline(always)]
fn add_dsr_option<P: Packet>(pkt: &mut P, address: u32, port: u16) -> Verdict {
    let [p0, p1] = port.to_ne_bytes();
    let [a0, a1, a2, a3] = address.to_ne_bytes();
    let option = [DSR_OPTION_TYPE, DSR_OPTION_LEN, p0, p1, a0, a1, a2, a3];
    if pkt.insert_ip_option(option).is_some() {
        count(STAT_DSR_OPTION_ADDED);
        Verdict::Pass
    } else {
        count(STAT_DROP_DSR);
        Verdict::Drop
    }
}

/// On a DSR flow's backend node: records the flow `key` (client → backend) the option
/// names service `address:port` for, so that the backend's replies leave with that
/// source. An option naming no external frontend known here is ignored (the packet goes
/// on untouched): nobody can make this node rewrite replies to an arbitrary address. Nor
/// is an option this node's XDP has just added (its DSR entry for the client's original
/// tuple sends to this very backend).
#[inline(always)]
fn record_dsr(key: &Ct4Key, address: u32, port: u16, now: u64, syn: bool) {
    let Some((_, frontend)) = lookup_frontend(address, port, key.proto) else {
        return;
    };
    if frontend.flags & SERVICE_FLAG_EXTERNAL == 0 {
        return;
    }
    let original = Ct4Key {
        daddr: address,
        dport: port,
        ..*key
    };
    if dsr_balanced_here(&original, key.daddr, key.dport) {
        return;
    }
    let reply = Ct4Key {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        pad: [0; 3],
    };
    let forward = Ct4Value {
        last_seen_ns: now,
        saddr: 0,
        daddr: 0,
        sport: 0,
        dport: 0,
        peer: reply,
        rev_nat_id: frontend.rev_nat_id,
        flags: CT_FLAG_DSR_BACKEND | if syn { CT_FLAG_SYN } else { 0 },
        pad: [0; 3],
        backend_id: 0,
    };
    let reverse = Ct4Value {
        last_seen_ns: now,
        saddr: address,
        daddr: 0,
        sport: port,
        dport: 0,
        peer: *key,
        rev_nat_id: frontend.rev_nat_id,
        flags: CT_FLAG_DSR_BACKEND | CT_FLAG_REPLY | CT_FLAG_EGRESS,
        pad: [0; 3],
        backend_id: 0,
    };
    // Never over a flow this node tracks for something else (a NodePort or SNAT flow
    // reusing the tuple): only a DSR backend entry may be refreshed.
    let foreign = |k: &Ct4Key| {
        // SAFETY: a map value pointer from a successful lookup; read at once.
        CT4.get_ptr(k).is_some_and(|e| unsafe { (*e).flags } & CT_FLAG_DSR_BACKEND == 0)
    };
    if foreign(&reply) || foreign(key) {
        return;
    }
    // Replies can only come after the packet is delivered: reverse entry first. A failed
    // insert (the map is LRU: only on memory pressure) leaves replies untranslated.
    if CT4.insert(reply, reverse, 0).is_ok() && CT4.insert(*key, forward, 0).is_ok() {
        count(STAT_DSR_RECORDED);
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) about a
/// translated flow, at offset `l4`: the header it quotes is a packet of the flow as it
/// left this node (client or SNAT address → backend), so the quoted tuple, reversed, is
/// the flow's reply key. Its entry at this hook rewrites the error as it rewrites replies:
/// the quoted destination (the backend) to the frontend and, when the error came from the
/// backend itself, the outer source with it (at egress); the quoted source and the outer
/// destination from the SNAT address back to the client (at ingress). The quoted L4
/// checksum is left as it is (it may lie beyond the quoted bytes; receivers ignore it).
/// An error about a DSR packet this node sent on gets its frontend back from the quoted
/// option, and "fragmentation needed" a path MTU 8 bytes lower, room for the option.
#[inline(always)]
fn icmp_error<P: Packet>(pkt: &mut P, hook: Hook, l4: usize) -> Option<Verdict> {
    let icmp_type: u8 = pkt.load(l4)?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Some(Verdict::Pass);
    }
    let inner = l4 + 8;
    let inner_version_ihl: u8 = pkt.load(inner)?;
    let inner_ihl = usize::from(inner_version_ihl & 0x0f) * 4;
    if inner_version_ihl >> 4 != 4 || inner_ihl < IP_HLEN {
        return Some(Verdict::Pass);
    }
    let proto: u8 = pkt.load(inner + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Some(Verdict::Pass);
    }
    let inner_l4 = inner + inner_ihl;
    let key = Ct4Key {
        saddr: pkt.load(inner + 16)?,
        daddr: pkt.load(inner + 12)?,
        sport: pkt.load(inner_l4 + 2)?,
        dport: pkt.load(inner_l4)?,
        proto,
        pad: [0; 3],
    };
    // SAFETY: a map value pointer from a successful lookup; copied out at once.
    let entry = CT4.get_ptr(key).map(|ptr| unsafe { *ptr }).filter(|entry| {
        entry.flags & CT_FLAG_REPLY != 0 && (entry.flags & CT_FLAG_EGRESS != 0) == (hook == Hook::TcEgress)
    });
    let (entry, dsr) = match entry {
        Some(entry) => (entry, false),
        None => match dsr_sent_from_here(pkt, hook, inner, inner_ihl, &key)? {
            Some(entry) => (entry, true),
            None => return Some(Verdict::Pass),
        },
    };
    let outer_saddr: u32 = pkt.load(IP_SADDR)?;
    let outer_daddr: u32 = pkt.load(IP_DADDR)?;
    let icmp_csum = L4Csum {
        offset: l4 + 2,
        udp: false,
    };
    let inner_csum = inner + 10;
    if entry.saddr != 0 {
        if outer_saddr == key.saddr {
            pkt.set_addr_l3(IP_SADDR, IP_CSUM, key.saddr, entry.saddr)?;
        }
        pkt.set_addr_l3(inner + 16, inner_csum, key.saddr, entry.saddr)?;
        if entry.sport != key.sport {
            pkt.set_port(inner_l4 + 2, icmp_csum, key.sport, entry.sport)?;
        }
    }
    if entry.daddr != 0 {
        if outer_daddr == key.daddr {
            pkt.set_addr_l3(IP_DADDR, IP_CSUM, key.daddr, entry.daddr)?;
        }
        pkt.set_addr_l3(inner + 12, inner_csum, key.daddr, entry.daddr)?;
        if entry.dport != key.dport {
            pkt.set_port(inner_l4, icmp_csum, key.dport, entry.dport)?;
        }
    }
    let code: u8 = pkt.load(l4 + 1)?;
    if dsr && icmp_type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
        // The client's datagrams must leave room for the option this node adds.
        let mtu: u16 = pkt.load(l4 + 6)?;
        let lowered = u16::from_be(mtu).saturating_sub(u16::from(DSR_OPTION_LEN));
        if lowered >= MIN_IPV4_MTU {
            pkt.set_port(l4 + 6, icmp_csum, mtu, lowered.to_be())?;
        }
    }
    count(STAT_ICMP_REV_NAT);
    Some(Verdict::Pass)
}

/// For an ICMP error leaving towards a client (TC egress) that quotes a DSR packet this
/// node balanced and sent on with the option (say, "fragmentation needed" because the
/// option made it too big): the rewrite that gives the quoted destination back its
/// frontend, as a reply entry of `reply_key` (backend → client) would.
#[inline(always)]
fn dsr_sent_from_here<P: Packet>(
    pkt: &P,
    hook: Hook,
    inner: usize,
    inner_ihl: usize,
    reply_key: &Ct4Key,
) -> Option<Option<Ct4Value>> {
    if hook != Hook::TcEgress || inner_ihl < IP_HLEN + DSR_OPTION_LEN as usize {
        return Some(None);
    }
    let option: [u8; 4] = pkt.load(inner + IP_HLEN)?;
    if option[0] != DSR_OPTION_TYPE || option[1] != DSR_OPTION_LEN {
        return Some(None);
    }
    let port = u16::from_ne_bytes([option[2], option[3]]);
    let address: u32 = pkt.load(inner + IP_HLEN + 4)?;
    let original = Ct4Key {
        saddr: reply_key.daddr,
        daddr: address,
        sport: reply_key.dport,
        dport: port,
        proto: reply_key.proto,
        pad: [0; 3],
    };
    if !dsr_balanced_here(&original, reply_key.saddr, reply_key.sport) {
        return Some(None);
    }
    Some(Some(Ct4Value {
        last_seen_ns: 0,
        saddr: address,
        daddr: 0,
        sport: port,
        dport: 0,
        peer: original,
        rev_nat_id: 0,
        flags: CT_FLAG_DSR | CT_FLAG_REPLY | CT_FLAG_EGRESS,
        pad: [0; 3],
        backend_id: 0,
    }))
}

/// Whether this node balanced the client's `original` flow (client → frontend) with DSR
/// to `backend:backend_port`.
#[inline(always)]
fn dsr_balanced_here(original: &Ct4Key, backend: u32, backend_port: u16) -> bool {
    // SAFETY: a map value pointer from a successful lookup, read at once.
    CT4.get_ptr(*original).is_some_and(|entry| unsafe {
        (*entry).flags & CT_FLAG_DSR != 0 && (*entry).daddr == backend && (*entry).dport == backend_port
    })
}

/// A SNAT address and a source port (network order) for a flow whose reply (backend →
/// node) key is `reply_key`, which gets them as its destination: random in the configured
/// range, free when no reply entry uses it yet.
#[inline(always)]
fn snat_port(config: &Node4Config, reply_key: &mut Ct4Key) -> Option<(u32, u16)> {
    if config.snat_address == 0 || config.snat_port_max < config.snat_port_min {
        return None;
    }
    let span = u32::from(config.snat_port_max - config.snat_port_min) + 1;
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    reply_key.daddr = config.snat_address;
    for attempt in 0..SNAT_ATTEMPTS {
        let port = config.snat_port_min + (start.wrapping_add(attempt) % span) as u16;
        reply_key.dport = port.to_be();
        if CT4.get_ptr(*reply_key).is_none() {
            return Some((config.snat_address, port.to_be()));
        }
    }
    None
}

/// Applies `entry`'s rewrite to a packet whose tuple is `key`.
#[inline(always)]
fn rewrite<P: Packet>(pkt: &mut P, l4: usize, csum: L4Csum, key: &Ct4Key, entry: &Ct4Value) -> Option<()> {
    if entry.saddr != 0 {
        if entry.saddr != key.saddr {
            pkt.set_addr(IP_SADDR, csum, key.saddr, entry.saddr)?;
        }
        if entry.sport != key.sport {
            pkt.set_port(l4, csum, key.sport, entry.sport)?;
        }
    }
    if entry.daddr != 0 {
        if entry.daddr != key.daddr {
            pkt.set_addr(IP_DADDR, csum, key.daddr, entry.daddr)?;
        }
        if entry.dport != key.dport {
            pkt.set_port(l4 + 2, csum, key.dport, entry.dport)?;
        }
    }
    Some(())
}
