//! Closing connected UDP sockets whose backend left their service.
//!
//! connect4 translates a connected UDP socket once, at `connect`; when its backend leaves
//! the service the socket goes on sending to the dead address forever (the well-known
//! stale DNS-socket problem). After the map writes that remove a UDP backend, the datapath
//! finds the sockets it translated to that backend (their cookies are in `SOCK_REV_NAT4`
//! with the backend's address) and destroys them: the application's next `recv` fails
//! with ECONNABORTED and it opens a new socket, which connect4 sends to a live backend.
//! Sockets connected straight to the backend's IP have no such entry and are left alone.
//!
//! The kernel's own way, a BPF socket iterator calling the `bpf_sock_destroy` kfunc, is
//! closed to us: kfuncs can only be called from GPL-licensed programs and Weir's BPF
//! object is Apache-2.0. So this uses `sock_diag` netlink (`SOCK_DIAG_BY_FAMILY` dumps and
//! `SOCK_DESTROY`, kernel options CONFIG_INET_UDP_DIAG and CONFIG_INET_DIAG_DESTROY), which
//! sees one network namespace at a time: a dedicated thread enters every network namespace
//! of the node in turn with `setns`, and the walk runs only when `SOCK_REV_NAT4` holds an
//! entry for a departed backend.
//!
//! The walk blocks the calling thread (it reads /proc and dumps sockets in each namespace,
//! milliseconds on a node with a few hundred processes): an async agent calls the
//! [`Datapath`] from a blocking thread (`tokio::task::spawn_blocking`), as for every other
//! map update.
//!
//! The netlink messages come from rust-netlink's `netlink-packet-sock-diag` (which has
//! both the request and `SockDiagDestroy`) over `netlink-sys`.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use tracing::{debug, info, warn};
use weir_ebpf_common::{
    SOCK_REV_NAT4, SOCK_REV_NAT6, SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value,
};

use super::index::{MapAddress, map_address, map_address6};

use super::{Backend, Datapath, Error, Protocol, ServiceKey};

/// Why stale UDP sockets could not be closed. The map writes before it took effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum UdpSocketError {
    #[error(
        "the kernel refused SOCK_DESTROY (EOPNOTSUPP): it was built without CONFIG_INET_DIAG_DESTROY, so \
         connected UDP sockets of departed backends stay open; use a kernel with CONFIG_INET_DIAG_DESTROY=y"
    )]
    NoDestroy,
    #[error(
        "the kernel has no sock_diag handler for UDP (ENOENT on the dump): load it with `modprobe udp_diag` \
         (CONFIG_INET_UDP_DIAG)"
    )]
    NoUdpDiag,
    #[error(
        "sock_diag {what} in network namespace {netns} was refused ({source}); closing other processes' sockets \
         needs CAP_NET_ADMIN (and CAP_SYS_ADMIN to enter their namespaces): run the agent as root"
    )]
    NotPermitted {
        what: &'static str,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {netns} with setns: {source}; the agent needs CAP_SYS_ADMIN (run it as root)")]
    EnterNetns {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag {what} in network namespace {netns}: {source}")]
    Netlink {
        what: &'static str,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag {what} in network namespace {netns}: undecodable reply: {reason}")]
    Decode {
        what: &'static str,
        netns: PathBuf,
        reason: String,
    },
}

/// A backend that left a UDP service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Departure {
    pub service: SocketAddr,
    pub backend: SocketAddr,
}

/// A socket connect4 sent to a departed backend: its cookie and that backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StaleSocket {
    pub cookie: u64,
    pub backend: SocketAddr,
}

/// The backends of the UDP service `key` that are in `old` and not in `new` (by address
/// and port: a backend turning Terminating stays and drains).
pub(crate) fn departures(key: &ServiceKey, old: &[Backend], new: &[Backend]) -> Vec<Departure> {
    if key.protocol != Protocol::Udp {
        return Vec::new();
    }
    let service = SocketAddr::new(key.address, key.port);
    let mut gone: Vec<Departure> = old
        .iter()
        .filter(|b| !new.iter().any(|n| n.address == b.address && n.port == b.port))
        .map(|b| Departure {
            service,
            backend: SocketAddr::new(b.address, b.port),
        })
        .collect();
    gone.sort();
    gone.dedup();
    gone
}

/// One `SOCK_REV_NAT4`/`SOCK_REV_NAT6` entry in the agent's terms: (cookie, backend, service).
pub(crate) type RevNatEntry = (u64, SocketAddr, SocketAddr);

pub(crate) fn entry4((key, value): (SockRevNat4Key, SockRevNat4Value)) -> RevNatEntry {
    (
        key.cookie,
        map_socket_address(key.address, key.port),
        map_socket_address(value.address, value.port),
    )
}

pub(crate) fn entry6((key, value): (SockRevNat6Key, SockRevNat6Value)) -> RevNatEntry {
    (
        key.cookie,
        map_socket_address(key.address, key.port),
        map_socket_address(value.address, value.port),
    )
}

/// The socket reverse-NAT entries that record a socket translated to a departed backend
/// of the same service.
pub(crate) fn stale_sockets(
    entries: impl IntoIterator<Item = RevNatEntry>,
    departed: &[Departure],
) -> BTreeSet<StaleSocket> {
    if departed.is_empty() {
        return BTreeSet::new();
    }
    let departed: HashSet<&Departure> = departed.iter().collect();
    entries
        .into_iter()
        .filter_map(|(cookie, backend, service)| {
            let departure = Departure { service, backend };
            departed.contains(&departure).then_some(StaleSocket {
                cookie,
                backend: departure.backend,
            })
        })
        .collect()
}

/// An address and port as the maps hold them (network byte order).
fn map_socket_address(address: impl MapAddress, port: u16) -> SocketAddr {
    SocketAddr::new(address.ip(), u16::from_be(port))
}

/// The socket cookie of an `inet_diag` socket id: the kernel stores it as two `u32`s in
/// host byte order, low half first (`sock_diag_save_cookie`).
fn diag_cookie(bytes: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let high = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

/// The peer of a dumped socket as socket-LB recorded it: a v4-mapped peer of an AF_INET6
/// socket (a dual-stack socket that connected to an IPv4 address, translated through the
/// IPv4 maps) is its IPv4 address.
fn destination(id: &SocketId) -> SocketAddr {
    let address = match id.destination_address {
        IpAddr::V6(address) => address.to_ipv4_mapped().map_or(IpAddr::V6(address), IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(address, id.destination_port)
}

/// Whether the dumped socket `id` is one of `stale`: same cookie, peer the departed backend.
fn is_stale(id: &SocketId, stale: &BTreeSet<StaleSocket>) -> bool {
    stale.contains(&StaleSocket {
        cookie: diag_cookie(id.cookie),
        backend: destination(id),
    })
}

impl Datapath {
    /// Connected UDP sockets destroyed since this [`Datapath`] was loaded because their
    /// backend left the service (see the `sockets` module).
    pub fn destroyed_udp_sockets(&self) -> u64 {
        self.destroyed_udp_sockets
    }

    /// The backends about to leave the UDP service `key`, when its backends become `new`
    /// (`None`: the service goes).
    pub(super) fn udp_departures(&self, key: &ServiceKey, new: Option<&[Backend]>) -> Vec<Departure> {
        let old = self.index.backends_of(key).unwrap_or_default();
        departures(key, &old, new.unwrap_or_default())
    }

    /// The sockets translated to a departed backend, as `SOCK_REV_NAT4` holds them now.
    /// Read before the map writes too: recvmsg4 forgets the entries of a removed service.
    pub(super) fn stale_udp_sockets(&self, departed: &[Departure]) -> BTreeSet<StaleSocket> {
        if departed.is_empty() {
            return BTreeSet::new();
        }
        let v4 = self.sock_rev_nat.iter().filter_map(Result::ok).map(entry4);
        let v6 = self.sock_rev_nat6.iter().filter_map(Result::ok).map(entry6);
        stale_sockets(v4.chain(v6), departed)
    }

    /// After the map writes: destroys the sockets in `before` and those `SOCK_REV_NAT4` holds
    /// now for the `departed` backends, in every network namespace of the node, then drops
    /// their entries. Returns how many sockets were destroyed.
    ///
    /// Best effort: the map writes have taken effect whatever happens here, so a failure is
    /// logged and counted ([`Datapath::udp_socket_errors`]), never returned. Sockets whose
    /// destroy failed are tried again with the next UDP departure, unless the kernel cannot
    /// destroy sockets at all (no CONFIG_INET_DIAG_DESTROY or udp_diag), which is said once.
    pub(super) fn close_stale_udp_sockets(&mut self, departed: &[Departure], before: BTreeSet<StaleSocket>) -> u64 {
        if departed.is_empty() && before.is_empty() {
            return 0;
        }
        let mut stale = before;
        stale.extend(self.stale_udp_sockets(departed));
        stale.append(&mut self.pending_udp_sockets);
        if stale.is_empty() {
            return 0;
        }
        let started = std::time::Instant::now();
        let destroyed = match destroy_everywhere(&stale) {
            Ok(destroyed) => destroyed,
            Err(e) => {
                self.udp_socket_errors += 1;
                if matches!(e, UdpSocketError::NoDestroy | UdpSocketError::NoUdpDiag) {
                    // Nothing to retry: this kernel cannot do it.
                    warn!(error = %e, "datapath: stale UDP sockets cannot be closed on this node");
                } else {
                    warn!(error = %e, sockets = stale.len(), "datapath: closing stale UDP sockets failed; retrying with the next UDP update");
                    self.pending_udp_sockets = stale;
                }
                return 0;
            }
        };
        self.destroyed_udp_sockets += destroyed;
        if let Err(e) = forget(&mut self.sock_rev_nat, &mut self.sock_rev_nat6, &stale) {
            // Stale entries only cost LRU room; recvmsg drops those of changed services.
            warn!(error = %e, "datapath: removing socket reverse-NAT entries failed");
        }
        info!(
            departed = departed.len(),
            candidates = stale.len(),
            destroyed,
            elapsed_ms = started.elapsed().as_millis(),
            "datapath: closed connected UDP sockets of departed backends"
        );
        destroyed
    }

    /// How many times closing stale UDP sockets failed since load (each failure is logged).
    pub fn udp_socket_errors(&self) -> u64 {
        self.udp_socket_errors
    }
}

/// Removes the `SOCK_REV_NAT4` entries of `stale`: their backend is gone from the service.
fn forget(
    map4: &mut BpfHashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    map6: &mut BpfHashMap<MapData, SockRevNat6Key, SockRevNat6Value>,
    stale: &BTreeSet<StaleSocket>,
) -> Result<(), Error> {
    for socket in stale {
        let port = socket.backend.port().to_be();
        let (result, name) = match socket.backend.ip() {
            IpAddr::V4(address) => {
                let key = SockRevNat4Key {
                    cookie: socket.cookie,
                    address: map_address(address),
                    port,
                    pad: [0; 2],
                };
                (map4.remove(&key), SOCK_REV_NAT4)
            }
            IpAddr::V6(address) => {
                let key = SockRevNat6Key {
                    cookie: socket.cookie,
                    address: map_address6(address),
                    port,
                    pad: [0; 6],
                };
                (map6.remove(&key), SOCK_REV_NAT6)
            }
        };
        super::ignore_missing(result).map_err(|source| Error::Map { name, source })?;
    }
    Ok(())
}

/// Destroys the `stale` sockets in every network namespace of the node, from one thread
/// that enters each in turn (the caller's thread keeps its namespace). Goes on after a
/// namespace fails and reports the first error.
fn destroy_everywhere(stale: &BTreeSet<StaleSocket>) -> Result<u64, UdpSocketError> {
    let namespaces = network_namespaces(Path::new("/proc"), Path::new("/run/netns"));
    debug!(
        namespaces = namespaces.len(),
        sockets = stale.len(),
        "datapath: looking for stale UDP sockets"
    );
    let walk = || {
        let mut destroyed = 0;
        let mut first_error = None;
        for (path, file) in &namespaces {
            // SAFETY: `file` is an open namespace file; setns changes only this thread,
            // which exists for this walk and ends with it.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let result = if entered {
                destroy_in_current_netns(stale, path)
            } else {
                let source = io::Error::last_os_error();
                // Not a network namespace (a plain file left in /run/netns): nothing there.
                if source.raw_os_error() == Some(libc::EINVAL) {
                    continue;
                }
                Err(UdpSocketError::EnterNetns {
                    netns: path.clone(),
                    source,
                })
            };
            match result {
                Ok(count) => destroyed += count,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(destroyed),
        }
    };
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("weir-sock-destroy".to_owned())
            .spawn_scoped(scope, walk)
            .map_err(|source| UdpSocketError::Netlink {
                what: "starting the namespace walk thread",
                netns: PathBuf::from("/proc/thread-self/ns/net"),
                source,
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The distinct network namespaces of the node: the caller's, every process's
/// (`<proc>/<pid>/ns/net`) and the named ones (`<run_netns>/*`, `ip netns add`), opened and
/// deduplicated by device and inode. Processes that exit meanwhile are skipped.
pub(crate) fn network_namespaces(proc: &Path, run_netns: &Path) -> Vec<(PathBuf, File)> {
    let mut candidates = vec![proc.join("thread-self/ns/net")];
    if let Ok(entries) = std::fs::read_dir(proc) {
        candidates.extend(
            entries
                .flatten()
                .filter(|entry| {
                    entry
                        .file_name()
                        .to_str()
                        .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|entry| entry.path().join("ns/net")),
        );
    }
    if let Ok(entries) = std::fs::read_dir(run_netns) {
        candidates.extend(entries.flatten().map(|entry| entry.path()));
    }
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter_map(|path| {
            let file = File::open(&path).ok()?;
            let metadata = file.metadata().ok()?;
            seen.insert((metadata.dev(), metadata.ino())).then_some((path, file))
        })
        .collect()
}

/// Dumps the connected UDP sockets (IPv4, and IPv6 ones with v4-mapped peers) of the
/// calling thread's network namespace and destroys those in `stale`.
fn destroy_in_current_netns(stale: &BTreeSet<StaleSocket>, netns: &Path) -> Result<u64, UdpSocketError> {
    let io_err = |what| {
        move |source| UdpSocketError::Netlink {
            what,
            netns: netns.to_owned(),
            source,
        }
    };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(io_err("opening a socket"))?;
    socket.bind_auto().map_err(io_err("binding the socket"))?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(io_err("connecting the socket"))?;
    let mut victims = Vec::new();
    for family in [AF_INET, AF_INET6] {
        send(&socket, dump_request(family), "dump request", netns)?;
        'dump: loop {
            let (buffer, _) = socket.recv_from_full().map_err(io_err("reading the dump"))?;
            for message in messages(&buffer, "dump", netns)? {
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                        if is_stale(&response.header.socket_id, stale) =>
                    {
                        victims.push((family, response.header.socket_id.clone()));
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(error) => {
                        let errno = error.code.map_or(0, |code| code.get().abs());
                        // AF_INET6 unavailable (ipv6.disable=1): nothing to find there.
                        if family == AF_INET6 && errno == libc::EAFNOSUPPORT {
                            break 'dump;
                        }
                        return Err(refusal("dump", errno, netns));
                    }
                    _ => {}
                }
            }
        }
    }
    let mut destroyed = 0;
    for (family, id) in victims {
        send(&socket, destroy_request(family, id), "destroy request", netns)?;
        let (buffer, _) = socket.recv_from_full().map_err(io_err("reading the destroy reply"))?;
        for message in messages(&buffer, "destroy", netns)? {
            if let NetlinkPayload::Error(error) = message.payload {
                match error.code.map_or(0, |code| code.get().abs()) {
                    0 => destroyed += 1,
                    // Closed by its owner since the dump.
                    libc::ENOENT => {}
                    errno => return Err(refusal("destroy", errno, netns)),
                }
            }
        }
    }
    Ok(destroyed)
}

/// A `SOCK_DIAG_BY_FAMILY` dump request for the connected UDP sockets of `family`.
fn dump_request(family: u8) -> Vec<u8> {
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    serialize(header, udp_request(family, socket_id))
}

/// A `SOCK_DESTROY` request for the UDP socket `id` (as the dump reported it), acknowledged.
fn destroy_request(family: u8, id: SocketId) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    serialize(header, SockDiagDestroy::new(udp_request(family, id)))
}

fn udp_request(family: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        // A connected UDP socket is in TCP_ESTABLISHED.
        states: StateFlags::ESTABLISHED,
        socket_id,
    })
}

fn serialize<T: NetlinkSerializable>(header: NetlinkHeader, inner: T) -> Vec<u8> {
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    buffer
}

fn send(socket: &Socket, buffer: Vec<u8>, what: &'static str, netns: &Path) -> Result<(), UdpSocketError> {
    socket
        .send(&buffer, 0)
        .map(drop)
        .map_err(|source| UdpSocketError::Netlink {
            what,
            netns: netns.to_owned(),
            source,
        })
}

/// The netlink messages in one datagram.
fn messages(
    mut buffer: &[u8],
    what: &'static str,
    netns: &Path,
) -> Result<Vec<NetlinkMessage<SockDiagMessage>>, UdpSocketError> {
    let mut out = Vec::new();
    while buffer.len() >= 16 {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(buffer).map_err(|e| UdpSocketError::Decode {
            what,
            netns: netns.to_owned(),
            reason: e.to_string(),
        })?;
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        let length = (message.header.length as usize).div_ceil(4) * 4;
        out.push(message);
        if length == 0 || length >= buffer.len() {
            break;
        }
        buffer = &buffer[length..];
    }
    Ok(out)
}

/// The error for the kernel's answer `errno` to a dump or destroy.
fn refusal(what: &'static str, errno: i32, netns: &Path) -> UdpSocketError {
    match (what, errno) {
        ("destroy", libc::EOPNOTSUPP) => UdpSocketError::NoDestroy,
        ("dump", libc::ENOENT) => UdpSocketError::NoUdpDiag,
        (_, libc::EPERM | libc::EACCES) => UdpSocketError::NotPermitted {
            what,
            netns: netns.to_owned(),
            source: io::Error::from_raw_os_error(errno),
        },
        _ => UdpSocketError::Netlink {
            what,
            netns: netns.to_owned(),
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

    use super::*;

    fn udp(port: u16) -> ServiceKey {
        ServiceKey {
            address: Ipv4Addr::new(10, 96, 0, 10).into(),
            port,
            protocol: Protocol::Udp,
        }
    }

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), port).into()
    }

    fn v4(address: SocketAddr) -> SocketAddrV4 {
        match address {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(_) => panic!("{address} is not IPv4"),
        }
    }

    fn entry(cookie: u64, backend: SocketAddr, service: SocketAddr) -> RevNatEntry {
        let (backend, service) = (v4(backend), v4(service));
        entry4((
            SockRevNat4Key {
                cookie,
                address: u32::from_ne_bytes(backend.ip().octets()),
                port: backend.port().to_be(),
                pad: [0; 2],
            },
            SockRevNat4Value {
                address: u32::from_ne_bytes(service.ip().octets()),
                port: service.port().to_be(),
                pad: [0; 2],
                rev_nat_id: 1,
            },
        ))
    }

    #[test]
    fn departures_are_udp_backends_that_left_by_address_and_port() {
        let a = Backend::active(Ipv4Addr::new(10, 0, 0, 1), 53);
        let b = Backend::active(Ipv4Addr::new(10, 0, 0, 2), 53);
        let a_other_port = Backend::active(Ipv4Addr::new(10, 0, 0, 1), 5353);
        let service: SocketAddr = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53).into();
        assert_eq!(
            departures(&udp(53), &[a, b], &[b]),
            vec![Departure {
                service,
                backend: addr(1, 53)
            }]
        );
        // Turning Terminating is not leaving: the backend drains.
        assert!(departures(&udp(53), &[a, b], &[Backend::terminating(a.address, a.port), b]).is_empty());
        // Another port is another backend.
        assert_eq!(departures(&udp(53), &[a], &[a_other_port]).len(), 1);
        // The service goes: all leave.
        assert_eq!(departures(&udp(53), &[a, b], &[]).len(), 2);
        let tcp = ServiceKey {
            protocol: Protocol::Tcp,
            ..udp(53)
        };
        assert!(
            departures(&tcp, &[a, b], &[]).is_empty(),
            "TCP connections drain instead"
        );
    }

    #[test]
    fn stale_sockets_need_both_the_departed_backend_and_its_service() {
        let service: SocketAddr = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53).into();
        let other_service: SocketAddr = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 53).into();
        let departed = [Departure {
            service,
            backend: addr(1, 53),
        }];
        let entries = [
            entry(1, addr(1, 53), service),       // stale
            entry(2, addr(2, 53), service),       // another backend stays
            entry(3, addr(1, 53), other_service), // the backend still serves another service
            entry(4, addr(1, 54), service),       // another port of the same address
        ];
        assert_eq!(
            stale_sockets(entries, &departed),
            BTreeSet::from([StaleSocket {
                cookie: 1,
                backend: addr(1, 53)
            }])
        );
        assert!(stale_sockets(entries, &[]).is_empty());
    }

    #[test]
    fn the_diag_cookie_is_two_host_order_halves_low_first() {
        let cookie: u64 = 0x0000_0001_2345_6789;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        bytes[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        assert_eq!(diag_cookie(bytes), cookie);
    }

    #[test]
    fn dumped_sockets_match_by_cookie_and_v4_or_v4_mapped_peer() {
        let cookie: u64 = 0x42;
        let stale = BTreeSet::from([StaleSocket {
            cookie,
            backend: addr(1, 53),
        }]);
        let mut id = SocketId::new_v4();
        id.destination_address = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        id.destination_port = 53;
        id.cookie = [0; 8];
        id.cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        assert!(is_stale(&id, &stale));

        let mut other_cookie = id.clone();
        other_cookie.cookie[0] ^= 1;
        assert!(
            !is_stale(&other_cookie, &stale),
            "a socket connected straight to the backend"
        );
        let mut other_port = id.clone();
        other_port.destination_port = 54;
        assert!(!is_stale(&other_port, &stale));

        let mut mapped = id.clone();
        mapped.destination_address = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert!(is_stale(&mapped, &stale));
        let mut v6 = id;
        v6.destination_address = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(!is_stale(&v6, &stale));
    }

    #[test]
    fn requests_are_udp_established_dumps_and_destroys_with_the_socket_id() {
        // The crate parses only responses: check the nlmsghdr and inet_diag_req_v2 bytes.
        let buffer = dump_request(AF_INET);
        assert_eq!(u16::from_ne_bytes([buffer[4], buffer[5]]), 20, "SOCK_DIAG_BY_FAMILY");
        assert_eq!(u16::from_ne_bytes([buffer[6], buffer[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!((buffer[16], buffer[17]), (AF_INET, IPPROTO_UDP));
        assert_eq!(
            u32::from_ne_bytes(buffer[20..24].try_into().unwrap()),
            1 << 1,
            "TCP_ESTABLISHED"
        );

        let mut id = SocketId::new_v4();
        id.destination_address = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        id.destination_port = 53;
        id.cookie = [7, 0, 0, 0, 0, 0, 0, 0];
        let buffer = destroy_request(AF_INET, id);
        assert_eq!(u16::from_ne_bytes([buffer[4], buffer[5]]), 21, "SOCK_DESTROY");
        // inet_diag_sockid at offset 24: sport, dport (big endian), src[16], dst[16], if, cookie.
        assert_eq!(&buffer[26..28], &53u16.to_be_bytes());
        assert_eq!(&buffer[44..48], &[10, 0, 0, 1]);
        assert_eq!(&buffer[64..72], &[7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn kernel_refusals_say_what_is_missing_and_how_to_fix_it() {
        let netns = Path::new("/proc/1/ns/net");
        let missing_destroy = refusal("destroy", libc::EOPNOTSUPP, netns).to_string();
        assert!(
            missing_destroy.contains("CONFIG_INET_DIAG_DESTROY"),
            "{missing_destroy}"
        );
        let missing_diag = refusal("dump", libc::ENOENT, netns).to_string();
        assert!(missing_diag.contains("modprobe udp_diag"), "{missing_diag}");
        let denied = refusal("destroy", libc::EPERM, netns).to_string();
        assert!(
            denied.contains("CAP_NET_ADMIN") && denied.contains("/proc/1/ns/net"),
            "{denied}"
        );
        let other = refusal("dump", libc::ENOBUFS, netns).to_string();
        assert!(other.contains("dump") && other.contains("/proc/1/ns/net"), "{other}");
    }

    #[test]
    fn network_namespaces_are_deduplicated_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let run = dir.path().join("netns");
        std::fs::create_dir_all(&run).unwrap();
        let ns_a = dir.path().join("ns-a");
        let ns_b = dir.path().join("ns-b");
        std::fs::write(&ns_a, "").unwrap();
        std::fs::write(&ns_b, "").unwrap();
        for (entry, target) in [("thread-self", &ns_a), ("1", &ns_a), ("22", &ns_b), ("self", &ns_b)] {
            std::fs::create_dir_all(proc.join(entry).join("ns")).unwrap();
            std::os::unix::fs::symlink(target, proc.join(entry).join("ns/net")).unwrap();
        }
        // A process that is gone (dangling link) and a named namespace.
        std::fs::create_dir_all(proc.join("333/ns")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), proc.join("333/ns/net")).unwrap();
        let ns_c = run.join("pod-c");
        std::fs::write(&ns_c, "").unwrap();

        let found: Vec<PathBuf> = network_namespaces(&proc, &run).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(
            found[0],
            proc.join("thread-self/ns/net"),
            "the caller's own comes first"
        );
        assert!(found.contains(&proc.join("22/ns/net")), "{found:?}");
        assert!(found.contains(&ns_c), "{found:?}");
    }
}
