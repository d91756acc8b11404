//! NodePort and LoadBalancer traffic from outside the node: attaching the TC programs (and
//! XDP where the driver has it) to the node's external interfaces, the node's SNAT or DSR
//! settings, and the conntrack map's garbage collection.
//!
//! [`ExternalMode`] says how flows reach backends on other nodes. `Snat` (the default):
//! the node rewrites the client's address to its own, and replies come back through it
//! for reverse NAT. `Dsr` (direct server return): the client's address is kept and the
//! service address travels in an IPv4 option (type 158, RFC 4727's experimental value,
//! 8 bytes) to the backend's node, whose TC egress gives the replies the service address
//! and sends them straight to the client. Every node reads the option whatever its own
//! mode, for frontends it knows (so every node must have the services programmed, and its
//! TC on the interfaces that carry the replies). DSR needs a network that lets the backend's
//! node send packets from the service address (no source filtering on the way), and
//! 8 bytes of headroom below the MTU for UDP datagrams (TCP adds the option to its SYN
//! only): a DF datagram that no longer fits gets "fragmentation needed" back with the MTU
//! lowered by 8, so path MTU discovery makes room. XDP adds the option itself (moving the
//! Ethernet and IPv4 headers into headroom it takes with bpf_xdp_adjust_head); TC adds it
//! where XDP is not attached.
//!
//! ICMP errors about translated flows (port unreachable, fragmentation needed, time
//! exceeded) are reverse-NATed by TC like the flow's replies, so clients see them.
//!
//! Links are pinned per interface (`link_tc_ingress_<if>`, `link_tc_egress_<if>`,
//! `link_xdp_<mode>_<if>`), so translation goes on while no agent runs, as for socket-LB.

use std::collections::HashMap;
use std::collections::HashSet;
use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use tracing::info;
use weir_ebpf_common::{
    CT_FLAG_CLOSING, CT_FLAG_DSR, CT_FLAG_DSR_BACKEND, CT_FLAG_EGRESS, CT_FLAG_REPLY, CT_FLAG_SNAT, Ct4Key, Ct4Value,
    NODE_FLAG_DSR, NODE4, Node4Config, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP, PROTO_TCP, STAT_DROP_DSR,
    STAT_DROP_NO_BACKEND, STAT_DROP_NO_SNAT, STAT_DSR_OPTION_ADDED, STAT_DSR_RECORDED, STAT_ICMP_REV_NAT,
    STAT_TC_EGRESS_TRACKED, STAT_TC_INGRESS_NEW, STAT_TC_INGRESS_TRACKED, STAT_XDP_NEW, STAT_XDP_TRACKED, STATS,
};

use super::index::map_address;
use super::model::Protocol;
use super::{Capacity, Datapath, Error, OBJECT, gc};

/// Where and how NodePort/LoadBalancer traffic from outside is translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalConfig {
    /// The node's external interfaces: where clients' packets come in, and where packets
    /// to and from other nodes go (SNAT happens at their egress, reverse SNAT at their
    /// ingress). TC ingress and egress (and XDP, by `xdp`) attach to each.
    pub interfaces: Vec<String>,
    /// The node address remote backends see as the client (SNAT, externalTrafficPolicy
    /// Cluster): one the other nodes route back to this node. Required in both modes
    /// (a node in DSR mode can be switched back to SNAT at the next attach).
    pub snat_address: Ipv4Addr,
    /// Source ports for SNAT. Keep it clear of the node's ephemeral ports
    /// (net.ipv4.ip_local_port_range) and of NodePorts.
    pub snat_ports: RangeInclusive<u16>,
    pub xdp: XdpPolicy,
    /// How flows reach backends on other nodes (externalTrafficPolicy Cluster).
    pub mode: ExternalMode,
}

/// How NodePort/LoadBalancer flows reach backends on other nodes (Cilium's
/// `loadBalancer.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalMode {
    /// Source NAT to the node's SNAT address; replies come back through this node.
    #[default]
    Snat,
    /// Direct server return: the backend sees the client's address and its node answers
    /// the client directly from the service address (see the module docs for what the
    /// network must allow).
    Dsr,
}

/// Whether the XDP fast path is attached next to TC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpPolicy {
    /// TC only; an XDP program attached earlier is detached.
    Off,
    /// Native (driver) XDP where the driver supports it; elsewhere TC alone translates
    /// (generic XDP would run later than TC's ingress hook gains anything over).
    #[default]
    Auto,
    /// Native XDP, or an error.
    Native,
    /// Generic (skb) XDP: for tests and drivers without native XDP.
    Generic,
}

/// What runs on one interface after [`Datapath::attach_external`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAttachment {
    pub interface: String,
    pub xdp: XdpAttachment,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpAttachment {
    Native,
    Generic,
    /// TC alone translates here; `reason` says why.
    None {
        reason: String,
    },
}

/// How long an idle conntrack entry lives before [`Datapath::sweep_conntrack`] removes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp: Duration,
    /// TCP after a FIN or RST in either direction.
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Default for ConntrackTimeouts {
    /// Cilium's defaults: established TCP 6 h, closing TCP 10 s, UDP 60 s.
    fn default() -> ConntrackTimeouts {
        ConntrackTimeouts {
            tcp: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// One direction of a tracked flow, as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub protocol: Protocol,
    /// The packet as it arrives.
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    /// What it is rewritten to; `None`: unchanged.
    pub new_source: Option<SocketAddrV4>,
    pub new_destination: Option<SocketAddrV4>,
    /// The backend-to-client direction.
    pub reply: bool,
    /// Applied by TC egress (source rewrites); otherwise at ingress by XDP or TC.
    pub egress: bool,
    /// The client's address was replaced by the node's SNAT address.
    pub snat: bool,
    /// A DSR flow: balanced here to a remote backend (the forward entry adds the DSR
    /// option), or recorded from the option on the backend's node.
    pub dsr: bool,
    pub closing: bool,
    pub idle: Duration,
}

/// Packet counters of TC and XDP, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketStats {
    pub xdp_new_flows: u64,
    pub xdp_tracked: u64,
    pub tc_ingress_new_flows: u64,
    pub tc_ingress_tracked: u64,
    pub tc_egress_tracked: u64,
    pub dropped_no_backend: u64,
    pub dropped_no_snat: u64,
    /// ICMP errors about translated flows rewritten for the client.
    pub icmp_errors_translated: u64,
    /// Packets sent to a backend on another node with the DSR option.
    pub dsr_options_added: u64,
    /// Packets that arrived with the DSR option and were recorded (this is their backend's node).
    pub dsr_options_recorded: u64,
    /// Packets dropped because the DSR option could not be added.
    pub dropped_dsr: u64,
}

fn tc_link_pin(pin_dir: &Path, program: &str, interface: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}_{interface}"))
}

fn xdp_link_pin(pin_dir: &Path, mode: &str, interface: &str) -> PathBuf {
    pin_dir.join(format!("link_{PROG_XDP}_{mode}_{interface}"))
}

fn interface_index(name: &str) -> u32 {
    let Ok(c_name) = CString::new(name) else {
        return 0;
    };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

/// The interface index a pinned TCX or XDP link is attached to; 0 once its device is gone
/// (the link stays pinned, but detached). Raw bpf(2): aya 0.14's `LinkInfo` does not
/// expose the link's interface.
fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let get = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: BPF_OBJ_GET with a valid attr and a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get, std::mem::size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned, at byte 16) the union
    // whose tcx and xdp members both start with ifindex.
    let mut info = [0u32; 32];
    let by_fd = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes into `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &by_fd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[4])
}

/// Whether `pin` holds a link attached to `interface` as it is now; a link left over from
/// an earlier device of the same name is unpinned (freeing it) and `false` returned.
fn pin_is_live(pin: &Path, interface: &str) -> Result<bool, Error> {
    if !pin.exists() {
        return Ok(false);
    }
    let ifindex = pinned_link_ifindex(pin).map_err(|source| Error::Io {
        what: "reading the pinned link",
        path: pin.to_owned(),
        source,
    })?;
    if ifindex != 0 && ifindex == interface_index(interface) {
        return Ok(true);
    }
    info!(%interface, pin = %pin.display(), "datapath: pinned link outlived its device; attaching again");
    remove_pin(pin)?;
    Ok(false)
}

fn remove_pin(path: &Path) -> Result<bool, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            what: "removing pin",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Now on the clock bpf_ktime_get_ns reads (CLOCK_MONOTONIC), in ns.
pub(super) fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime with a valid clock id and out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn socket(address: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(address.to_ne_bytes()), u16::from_be(port))
}

/// The entries of `entries` idle longer than their timeout at `now` (ns, CLOCK_MONOTONIC).
/// An entry counts as seen when its peer (the other direction) was, and as closing when
/// either direction saw a FIN or RST.
pub(super) fn expired(entries: &HashMap<Ct4Key, Ct4Value>, now: u64, timeouts: &ConntrackTimeouts) -> Vec<Ct4Key> {
    entries
        .iter()
        .filter(|(key, value)| {
            let peer = entries.get(&value.peer);
            let last = peer.map_or(value.last_seen_ns, |peer| peer.last_seen_ns.max(value.last_seen_ns));
            let closing = (value.flags | peer.map_or(0, |peer| peer.flags)) & CT_FLAG_CLOSING != 0;
            let timeout = match (key.proto, closing) {
                (PROTO_TCP, false) => timeouts.tcp,
                (PROTO_TCP, true) => timeouts.tcp_closing,
                _ => timeouts.udp,
            };
            u128::from(now.saturating_sub(last)) > timeout.as_nanos()
        })
        .map(|(key, _)| *key)
        .collect()
}

/// What the programs read of `config` (NODE4).
fn node_settings(config: &ExternalConfig) -> Node4Config {
    Node4Config {
        snat_address: map_address(config.snat_address),
        snat_port_min: *config.snat_ports.start(),
        snat_port_max: *config.snat_ports.end(),
        flags: match config.mode {
            ExternalMode::Snat => 0,
            ExternalMode::Dsr => NODE_FLAG_DSR,
        },
        pad: [0; 3],
    }
}

/// The object, loaded once per attach with its maps reopened from the pins, and which of
/// its programs are loaded into the kernel.
struct Loader<'a> {
    pin_dir: &'a Path,
    capacity: Capacity,
    ebpf: Option<Ebpf>,
    loaded: HashSet<&'static str>,
}

impl Loader<'_> {
    fn ebpf(&mut self) -> Result<&mut Ebpf, Error> {
        if self.ebpf.is_none() {
            let ebpf = self
                .capacity
                .loader(self.pin_dir)
                .load(OBJECT)
                .map_err(|e| Error::Load(Box::new(e)))?;
            self.ebpf = Some(ebpf);
        }
        Ok(self.ebpf.as_mut().expect("loaded above"))
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, Error> {
        let first = self.loaded.insert(name);
        let program: &mut SchedClassifier = self
            .ebpf()?
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        if first {
            program.load().map_err(|source| Error::Program { name, source })?;
        }
        Ok(program)
    }

    fn xdp(&mut self) -> Result<&mut Xdp, Error> {
        let first = self.loaded.insert(PROG_XDP);
        let program: &mut Xdp = self
            .ebpf()?
            .program_mut(PROG_XDP)
            .ok_or(Error::MissingProgram(PROG_XDP))?
            .try_into()
            .map_err(|source| Error::Program { name: PROG_XDP, source })?;
        if first {
            program
                .load()
                .map_err(|source| Error::Program { name: PROG_XDP, source })?;
        }
        Ok(program)
    }
}

impl Datapath {
    /// Writes the node's SNAT (or DSR) settings and attaches TC ingress and egress (and XDP as
    /// `config.xdp` says) to every interface of `config`, pinning the links. Interfaces
    /// whose links are pinned already keep them. Every interface is checked before
    /// anything is attached.
    pub fn attach_external(&mut self, config: &ExternalConfig) -> Result<Vec<InterfaceAttachment>, Error> {
        if config.snat_ports.is_empty() || *config.snat_ports.start() == 0 {
            return Err(Error::InvalidConfig(format!(
                "SNAT port range {}-{} is empty or starts at 0",
                config.snat_ports.start(),
                config.snat_ports.end()
            )));
        }
        if config.snat_address.is_unspecified() {
            return Err(Error::InvalidConfig(
                "the SNAT address is 0.0.0.0; give the node address other nodes route back to".to_owned(),
            ));
        }
        for interface in &config.interfaces {
            if interface_index(interface) == 0 {
                return Err(Error::NoInterface {
                    name: interface.clone(),
                });
            }
        }
        self.node
            .set(0, node_settings(config), 0)
            .map_err(|source| Error::Map { name: NODE4, source })?;

        let pin_dir = self.pin_dir.clone();
        let mut loader = Loader {
            pin_dir: &pin_dir,
            capacity: self.capacity,
            ebpf: None,
            loaded: HashSet::new(),
        };
        let mut report = Vec::new();
        for interface in &config.interfaces {
            for (name, attach_type) in [
                (PROG_TC_INGRESS, TcAttachType::Ingress),
                (PROG_TC_EGRESS, TcAttachType::Egress),
            ] {
                let pin = tc_link_pin(&pin_dir, name, interface);
                if pin_is_live(&pin, interface)? {
                    continue;
                }
                info!(%interface, program = name, "datapath: attaching TC program");
                let program = loader.classifier(name)?;
                let link_id = program
                    .attach(interface, attach_type)
                    .map_err(|source| Error::Program { name, source })?;
                let link = program
                    .take_link(link_id)
                    .map_err(|source| Error::Program { name, source })?;
                // Only TCX links (kernel ≥ 6.6) are bpf_links that can be pinned.
                let link: FdLink = link.try_into().map_err(|_| Error::NoTcx {
                    interface: interface.clone(),
                })?;
                link.pin(&pin).map_err(|source| Error::Pin { path: pin, source })?;
            }
            let xdp = self.attach_xdp(&mut loader, interface, config.xdp)?;
            info!(%interface, ?xdp, "datapath: external interface ready");
            report.push(InterfaceAttachment {
                interface: interface.clone(),
                xdp,
            });
        }
        Ok(report)
    }

    fn attach_xdp(
        &mut self,
        loader: &mut Loader<'_>,
        interface: &str,
        policy: XdpPolicy,
    ) -> Result<XdpAttachment, Error> {
        let native = xdp_link_pin(&self.pin_dir, "native", interface);
        let generic = xdp_link_pin(&self.pin_dir, "generic", interface);
        let (wanted, keep): (Option<(XdpMode, &Path)>, Option<&Path>) = match policy {
            XdpPolicy::Off => (None, None),
            XdpPolicy::Auto | XdpPolicy::Native => (Some((XdpMode::Driver, &native)), Some(&native)),
            XdpPolicy::Generic => (Some((XdpMode::Skb, &generic)), Some(&generic)),
        };
        // Another mode's link goes first: an interface holds one XDP program.
        for pin in [&native, &generic] {
            if Some(pin.as_path()) != keep {
                remove_pin(pin)?;
            }
        }
        let Some((mode, pin)) = wanted else {
            return Ok(XdpAttachment::None {
                reason: "XDP is off".to_owned(),
            });
        };
        let attached = if mode == XdpMode::Driver {
            XdpAttachment::Native
        } else {
            XdpAttachment::Generic
        };
        if pin_is_live(pin, interface)? {
            return Ok(attached);
        }
        let program = loader.xdp()?;
        let link_id = match program.attach(interface, mode) {
            Ok(link_id) => link_id,
            Err(source) if policy == XdpPolicy::Auto => {
                return Ok(XdpAttachment::None {
                    reason: format!("native XDP failed ({source}); TC translates alone"),
                });
            }
            Err(source) => {
                return Err(Error::XdpUnsupported {
                    interface: interface.to_owned(),
                    mode: if mode == XdpMode::Driver { "native" } else { "generic" },
                    source,
                });
            }
        };
        let link = program
            .take_link(link_id)
            .map_err(|source| Error::Program { name: PROG_XDP, source })?;
        let link: FdLink = link
            .try_into()
            .map_err(|source| Error::Link { name: PROG_XDP, source })?;
        link.pin(pin).map_err(|source| Error::Pin {
            path: pin.to_owned(),
            source,
        })?;
        Ok(attached)
    }

    /// Detaches TC and XDP from `interface` (removes their pins). Returns how many links
    /// went; 0 when none was attached.
    pub fn detach_external(&mut self, interface: &str) -> Result<usize, Error> {
        let mut removed = 0;
        for pin in [
            tc_link_pin(&self.pin_dir, PROG_TC_INGRESS, interface),
            tc_link_pin(&self.pin_dir, PROG_TC_EGRESS, interface),
            xdp_link_pin(&self.pin_dir, "native", interface),
            xdp_link_pin(&self.pin_dir, "generic", interface),
        ] {
            removed += usize::from(remove_pin(&pin)?);
        }
        Ok(removed)
    }

    fn conntrack_raw(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, Error> {
        gc::entries(&self.conntrack)
    }

    /// The tracked NodePort/LoadBalancer flows, one entry per direction.
    pub fn conntrack(&self) -> Result<Vec<ConntrackEntry>, Error> {
        let now = monotonic_ns();
        Ok(self
            .conntrack_raw()?
            .into_iter()
            .filter_map(|(key, value)| {
                Some(ConntrackEntry {
                    protocol: Protocol::from_number(key.proto)?,
                    source: socket(key.saddr, key.sport),
                    destination: socket(key.daddr, key.dport),
                    new_source: (value.saddr != 0).then(|| socket(value.saddr, value.sport)),
                    new_destination: (value.daddr != 0).then(|| socket(value.daddr, value.dport)),
                    reply: value.flags & CT_FLAG_REPLY != 0,
                    egress: value.flags & CT_FLAG_EGRESS != 0,
                    snat: value.flags & CT_FLAG_SNAT != 0,
                    dsr: value.flags & (CT_FLAG_DSR | CT_FLAG_DSR_BACKEND) != 0,
                    closing: value.flags & CT_FLAG_CLOSING != 0,
                    idle: Duration::from_nanos(now.saturating_sub(value.last_seen_ns)),
                })
            })
            .collect())
    }

    /// Removes the flows idle longer than `timeouts` (both directions together: a flow
    /// lives while either direction sees packets). The map is LRU, so a node that never
    /// sweeps still works, but a full table evicts live flows before dead ones. Returns
    /// the entries removed.
    pub fn sweep_conntrack(&mut self, timeouts: &ConntrackTimeouts) -> Result<usize, Error> {
        gc::sweep(&mut self.conntrack, timeouts)
    }

    /// TC and XDP packet counters since the maps were created.
    pub fn packet_stats(&self) -> Result<PacketStats, Error> {
        let stat = |index: u32| -> Result<u64, Error> {
            let values = self
                .stats
                .get(&index, 0)
                .map_err(|source| Error::Map { name: STATS, source })?;
            Ok(values.iter().sum())
        };
        Ok(PacketStats {
            xdp_new_flows: stat(STAT_XDP_NEW)?,
            xdp_tracked: stat(STAT_XDP_TRACKED)?,
            tc_ingress_new_flows: stat(STAT_TC_INGRESS_NEW)?,
            tc_ingress_tracked: stat(STAT_TC_INGRESS_TRACKED)?,
            tc_egress_tracked: stat(STAT_TC_EGRESS_TRACKED)?,
            dropped_no_backend: stat(STAT_DROP_NO_BACKEND)?,
            dropped_no_snat: stat(STAT_DROP_NO_SNAT)?,
            icmp_errors_translated: stat(STAT_ICMP_REV_NAT)?,
            dsr_options_added: stat(STAT_DSR_OPTION_ADDED)?,
            dsr_options_recorded: stat(STAT_DSR_RECORDED)?,
            dropped_dsr: stat(STAT_DROP_DSR)?,
        })
    }
}

pub(crate) type NodeMap = Array<aya::maps::MapData, Node4Config>;
pub(crate) type StatsMap = PerCpuArray<aya::maps::MapData, u64>;

#[cfg(test)]
mod tests {
    use weir_ebpf_common::PROTO_UDP;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn key(sport: u16, proto: u8) -> Ct4Key {
        Ct4Key {
            saddr: 1,
            daddr: 2,
            sport,
            dport: 80,
            proto,
            pad: [0; 3],
        }
    }

    /// A pair of entries (`forward`, its reply) last seen at the given times.
    fn pair(
        entries: &mut HashMap<Ct4Key, Ct4Value>,
        sport: u16,
        proto: u8,
        seen: (u64, u64),
        flags: (u8, u8),
    ) -> (Ct4Key, Ct4Key) {
        let (forward, reply) = (key(sport, proto), key(sport + 1000, proto));
        let value = |last_seen_ns, peer, flags| Ct4Value {
            last_seen_ns,
            saddr: 0,
            daddr: 3,
            sport: 0,
            dport: 8080,
            peer,
            rev_nat_id: 1,
            flags,
            pad: [0; 3],
            backend_id: 1,
        };
        entries.insert(forward, value(seen.0, reply, flags.0));
        entries.insert(reply, value(seen.1, forward, flags.1 | CT_FLAG_REPLY));
        (forward, reply)
    }

    #[test]
    fn the_mode_reaches_the_programs_as_a_node_flag() {
        let config = ExternalConfig {
            interfaces: vec!["eth0".to_owned()],
            snat_address: Ipv4Addr::new(10, 0, 0, 1),
            snat_ports: 61000..=61999,
            xdp: XdpPolicy::Auto,
            mode: ExternalMode::default(),
        };
        let snat = node_settings(&config);
        assert_eq!(config.mode, ExternalMode::Snat);
        assert_eq!(snat.flags & NODE_FLAG_DSR, 0);
        assert_eq!(
            (snat.snat_address, snat.snat_port_min, snat.snat_port_max),
            (u32::from_ne_bytes([10, 0, 0, 1]), 61000, 61999)
        );
        let dsr = node_settings(&ExternalConfig {
            mode: ExternalMode::Dsr,
            ..config
        });
        assert_eq!(dsr.flags, NODE_FLAG_DSR);
        assert_eq!(dsr.snat_address, snat.snat_address);
    }

    fn timeouts() -> ConntrackTimeouts {
        ConntrackTimeouts {
            tcp: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        }
    }

    fn sorted(mut keys: Vec<Ct4Key>) -> Vec<(u16, u8)> {
        let mut keys: Vec<(u16, u8)> = keys.drain(..).map(|k| (k.sport, k.proto)).collect();
        keys.sort();
        keys
    }

    #[test]
    fn a_flow_lives_while_either_direction_sees_packets() {
        let mut entries = HashMap::new();
        let now = 1000 * SECOND;
        // UDP one way: the forward entry is fresh, the reply one old: both stay.
        pair(&mut entries, 1, PROTO_UDP, (now - SECOND, now - 500 * SECOND), (0, 0));
        // UDP idle both ways past 30 s: both go.
        pair(
            &mut entries,
            2,
            PROTO_UDP,
            (now - 31 * SECOND, now - 40 * SECOND),
            (0, 0),
        );
        // TCP idle 50 s: established flows stay for 100 s.
        pair(
            &mut entries,
            3,
            PROTO_TCP,
            (now - 50 * SECOND, now - 50 * SECOND),
            (0, 0),
        );
        // TCP idle 11 s after a FIN in one direction: closing timeout, both go.
        pair(
            &mut entries,
            4,
            PROTO_TCP,
            (now - 11 * SECOND, now - 12 * SECOND),
            (0, CT_FLAG_CLOSING),
        );
        let dead = expired(&entries, now, &timeouts());
        assert_eq!(
            sorted(dead),
            vec![(2, PROTO_UDP), (4, PROTO_TCP), (1002, PROTO_UDP), (1004, PROTO_TCP)]
        );
    }

    #[test]
    fn an_entry_without_its_peer_ages_on_its_own_and_clock_skew_expires_nothing() {
        let mut entries = HashMap::new();
        let now = 1000 * SECOND;
        let (forward, _) = pair(&mut entries, 1, PROTO_UDP, (now - 31 * SECOND, now), (0, 0));
        let orphan_reply = entries.remove(&key(1001, PROTO_UDP)).unwrap();
        assert_eq!(orphan_reply.peer, forward);
        assert_eq!(sorted(expired(&entries, now, &timeouts())), vec![(1, PROTO_UDP)]);
        // An entry stamped after `now` (read before the program wrote it) is not idle.
        pair(&mut entries, 5, PROTO_UDP, (now + SECOND, now + SECOND), (0, 0));
        assert_eq!(sorted(expired(&entries, now, &timeouts())), vec![(1, PROTO_UDP)]);
    }
}
