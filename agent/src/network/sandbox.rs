//! The network of pod sandboxes on one node: the gateway interface, per pod a netns and a
//! veth with its `/32` route, and the routes to other nodes. Owns only what it names
//! (`weir0`, `weir<hash>`, `weir-pod-<uid>` mounts, routes of our protocol numbers).
//!
//! Everything on the host side happens in the network namespace of the thread that calls
//! [`PodNetwork::open`] (and its methods): the node's. Work inside a pod's namespace goes
//! through a netlink socket made on a thread that entered it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest as _, Sha256};

use super::ipam::{PodRange, check_owner};
use super::netns::{self, Netlink};
use super::routes::{self, NodeRoute, RouteChange};
use super::{Error, Ipam, NODE_ROUTE_PROTOCOL, POD_ROUTE_PROTOCOL, Result};

/// The name of the pod's interface inside its namespace.
pub const POD_INTERFACE: &str = "eth0";

/// How the pod network of a node is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetworkConfig {
    /// The node's podCIDR (`Node.spec.podCIDR`), IPv4.
    pub pod_cidr: IpNet,
    /// Where IP allocations are kept, e.g. `<data-dir>/ipam`.
    pub ipam_dir: PathBuf,
    /// Where pod network namespaces are mounted.
    pub netns_dir: PathBuf,
    /// The interface that holds the gateway address (a bridge without ports).
    pub gateway_interface: String,
    /// The MTU of both ends of each pod's veth; `None` keeps the kernel's (1500). Set it to
    /// the MTU of the network between nodes when that is smaller.
    pub mtu: Option<u32>,
}

impl PodNetworkConfig {
    /// The defaults: IPAM under `<data_dir>/ipam`, namespaces in `/run/netns` (where
    /// `ip netns` finds them), the gateway on `weir0`.
    pub fn new(pod_cidr: IpNet, data_dir: &Path) -> PodNetworkConfig {
        PodNetworkConfig {
            pod_cidr,
            ipam_dir: data_dir.join("ipam"),
            netns_dir: PathBuf::from("/run/netns"),
            gateway_interface: "weir0".to_owned(),
            mtu: None,
        }
    }
}

/// What a pod's sandbox got: where its namespace is and how it is addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSandboxNetwork {
    /// The pod's network namespace (a bind mount; give it to the runtime as the sandbox's
    /// network namespace path).
    pub netns: PathBuf,
    /// The pod IP (`status.podIP`).
    pub ip: IpAddr,
    /// The prefix length of the pod's address (the podCIDR's).
    pub prefix_len: u8,
    /// The pod's default gateway.
    pub gateway: IpAddr,
    /// The host side of the pod's veth.
    pub host_interface: String,
}

/// The pod network of this node.
#[derive(Debug)]
pub struct PodNetwork {
    config: PodNetworkConfig,
    range: PodRange,
    ipam: Mutex<Ipam>,
    host: Netlink,
}

/// The host-side veth name of a pod: `weir` and 10 hex digits of the SHA-256 of its UID,
/// 14 characters (the kernel allows 15), stable across agent restarts.
pub fn host_interface_name(pod_uid: &str) -> String {
    let digest = Sha256::digest(pod_uid.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("weir{hex}")
}

/// The file name of a pod's network namespace under the netns directory.
pub fn netns_name(pod_uid: &str) -> String {
    format!("{NETNS_PREFIX}{pod_uid}")
}

const NETNS_PREFIX: &str = "weir-pod-";

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| Error::Io {
        what: "setting sysctl (needs root)",
        path: path.into(),
        source,
    })
}

fn is_errno(e: &Error, errno: i32) -> bool {
    e.errno() == Some(errno)
}

/// The index of link `name`, `None` when there is none.
async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(Error::netlink(format!("looking up link {name}")));
    match found {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn required_link_index(handle: &rtnetlink::Handle, name: &str, place: &str) -> Result<u32> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| Error::Invalid(format!("link {name} vanished from {place} while it was being set up")))
}

async fn set_up(handle: &rtnetlink::Handle, index: u32, name: &str) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(Error::netlink(format!("setting link {name} up")))
}

/// Deletes link `name` if it exists.
async fn delete_link(handle: &rtnetlink::Handle, name: &str) -> Result<()> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(Error::netlink(format!("deleting link {name}")))
    {
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        other => other,
    }
}

fn ipv4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        // PodNetwork::open refuses IPv6 podCIDRs, so every address here is IPv4.
        IpAddr::V6(_) => unreachable!("PodNetwork::open admits IPv4 podCIDRs only"),
    }
}

impl PodNetwork {
    /// Sets up the node side (the gateway on `weir0`, forwarding on) and opens
    /// the IP allocations. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); runs in the caller's
    /// network namespace, which is the node's.
    pub async fn open(config: PodNetworkConfig) -> Result<PodNetwork> {
        if !config.pod_cidr.network().is_ipv4() {
            return Err(Error::Invalid(format!(
                "podCIDR {} is IPv6: pod sandboxes get IPv4 addresses only; give the node an IPv4 podCIDR \
                 (the first of spec.podCIDRs on dual-stack clusters)",
                config.pod_cidr
            )));
        }
        if config.gateway_interface.is_empty() || config.gateway_interface.len() > 15 {
            return Err(Error::Invalid(format!(
                "gateway interface name {:?} must have 1 to 15 characters",
                config.gateway_interface
            )));
        }
        let range = PodRange::new(config.pod_cidr)?;
        let ipam = Ipam::open(&config.ipam_dir, range.cidr())?;
        let network = PodNetwork {
            range,
            ipam: Mutex::new(ipam),
            host: netns::netlink_here()?,
            config,
        };
        network.set_up_gateway().await?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        Ok(network)
    }

    /// `weir0` up with exactly `<gateway>/<prefix>`: its prefix route takes every podCIDR
    /// address no pod holds into the interface, which drops it. `weir0` is a bridge without
    /// ports, used as a dummy: the dummy driver is a module some kernels lack (the VMs this
    /// project is tested on), the bridge is there wherever containers run.
    async fn set_up_gateway(&self) -> Result<()> {
        let handle = &self.host.handle;
        let name = &self.config.gateway_interface;
        let index = match link_index(handle, name).await? {
            Some(index) => index,
            None => {
                handle
                    .link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await
                    .map_err(Error::netlink(format!("creating gateway interface {name} (bridge)")))?;
                required_link_index(handle, name, "the node").await?
            }
        };
        let gateway = self.range.gateway;
        let prefix = self.range.cidr().prefix_len();
        let addresses: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(Error::netlink(format!("listing the addresses of {name}")))?;
        // The gateway of a podCIDR the node had before goes (IPv6 link-local addresses the
        // kernel gives the interface stay).
        for address in addresses {
            let ip = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if ip.is_some_and(|ip| ip.is_ipv4()) && (ip != Some(gateway) || address.header.prefix_len != prefix) {
                handle
                    .address()
                    .del(address)
                    .execute()
                    .await
                    .map_err(Error::netlink(format!("removing an old address from {name}")))?;
            }
        }
        handle
            .address()
            .add(index, gateway, prefix)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!("adding gateway {gateway}/{prefix} to {name}")))?;
        set_up(handle, index, name).await
    }

    /// The configuration.
    pub fn config(&self) -> &PodNetworkConfig {
        &self.config
    }

    /// The podCIDR's gateway and pod addresses.
    pub fn range(&self) -> &PodRange {
        &self.range
    }

    /// The IP allocations (to list or garbage-collect them). The guard locks them: drop it
    /// before calling anything else on this `PodNetwork`, which would wait for it forever.
    pub fn ipam(&self) -> std::sync::MutexGuard<'_, Ipam> {
        self.ipam.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where the network namespace of pod `pod_uid` is mounted.
    pub fn netns_path(&self, pod_uid: &str) -> PathBuf {
        self.config.netns_dir.join(netns_name(pod_uid))
    }

    /// Creates the network of pod `pod_uid`: its IP (the one it holds already, if any), its
    /// namespace (kept if it exists) with `eth0`, `lo` and a default route, the host side
    /// of the veth (made anew) with the `/32` route to the pod. On failure what was made
    /// is removed again, as [`delete`](Self::delete) does.
    pub async fn create(&self, pod_uid: &str) -> Result<PodSandboxNetwork> {
        check_owner(pod_uid)?;
        match self.try_create(pod_uid).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Err(cleanup) = self.delete(pod_uid).await {
                    tracing::warn!(pod_uid, error = %cleanup, "cleaning up after a failed pod network setup");
                }
                Err(e)
            }
        }
    }

    async fn try_create(&self, pod_uid: &str) -> Result<PodSandboxNetwork> {
        let ip = ipv4(self.ipam().allocate(pod_uid)?);
        let gateway = ipv4(self.range.gateway);
        let prefix_len = self.range.cidr().prefix_len();
        let netns_path = self.netns_path(pod_uid);
        netns::create(&netns_path)?;
        let host_if = host_interface_name(pod_uid);
        let handle = &self.host.handle;

        // A veth left by an earlier try goes, and with it its peer in the pod namespace.
        delete_link(handle, &host_if).await?;
        let ns = netns::open(&netns_path)?;
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(POD_INTERFACE)
            .setns_by_fd(ns.as_raw_fd());
        let mut veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth).name(host_if.clone());
        if let Some(mtu) = self.config.mtu {
            peer = peer.mtu(mtu);
            veth = veth.mtu(mtu);
        }
        let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))).build();
        handle.link().add(veth).execute().await.map_err(Error::netlink(format!(
            "creating veth {host_if} with peer {POD_INTERFACE} in {}",
            netns_path.display()
        )))?;
        drop(ns);

        // Host side: up, answering ARP for the gateway and other pods at once, routed to.
        let host_index = required_link_index(handle, &host_if, "the node").await?;
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{host_if}/proxy_arp"), "1")?;
        write_sysctl(&format!("/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay"), "0")?;
        set_up(handle, host_index, &host_if).await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(host_index)
            .pref_source(gateway)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(POD_ROUTE_PROTOCOL))
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!("adding route {ip}/32 dev {host_if}")))?;

        // Pod side.
        let pod = netns::netlink_in(&netns_path)?;
        let place = format!("pod namespace {}", netns_path.display());
        let lo = required_link_index(&pod.handle, "lo", &place).await?;
        set_up(&pod.handle, lo, "lo").await?;
        let eth0 = required_link_index(&pod.handle, POD_INTERFACE, &place).await?;
        pod.handle
            .address()
            .add(eth0, IpAddr::V4(ip), prefix_len)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "adding {ip}/{prefix_len} to the pod's {POD_INTERFACE}"
            )))?;
        set_up(&pod.handle, eth0, POD_INTERFACE).await?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(eth0)
            .build();
        pod.handle
            .route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(Error::netlink(format!("adding the pod's default route via {gateway}")))?;

        tracing::debug!(pod_uid, %ip, host_interface = %host_if, "pod network created");
        Ok(PodSandboxNetwork {
            netns: netns_path,
            ip: IpAddr::V4(ip),
            prefix_len,
            gateway: IpAddr::V4(gateway),
            host_interface: host_if,
        })
    }

    /// The network of pod `pod_uid` if it is whole (its IP, its namespace and the host side
    /// of its veth all exist): what a restarted agent adopts without touching the running
    /// pod. `None`: [`create`](Self::create) it (again).
    pub async fn existing(&self, pod_uid: &str) -> Result<Option<PodSandboxNetwork>> {
        check_owner(pod_uid)?;
        let Some(ip) = self.ipam().address_of(pod_uid) else {
            return Ok(None);
        };
        let netns = self.netns_path(pod_uid);
        let host_interface = host_interface_name(pod_uid);
        if !netns.exists() || link_index(&self.host.handle, &host_interface).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(PodSandboxNetwork {
            netns,
            ip,
            prefix_len: self.range.cidr().prefix_len(),
            gateway: self.range.gateway,
            host_interface,
        }))
    }

    /// Removes the network of pod `pod_uid`: the veth (and with it the `/32` route), the
    /// namespace mount, the IP allocation. Whatever is already gone is skipped, so this
    /// cleans a half-created sandbox too and can be repeated.
    pub async fn delete(&self, pod_uid: &str) -> Result<()> {
        check_owner(pod_uid)?;
        delete_link(&self.host.handle, &host_interface_name(pod_uid)).await?;
        netns::remove(&self.netns_path(pod_uid))?;
        let released = self.ipam().release(pod_uid)?;
        tracing::debug!(pod_uid, ?released, "pod network deleted");
        Ok(())
    }

    /// The UIDs of the pods that have network state here: an IP allocation or a namespace
    /// mount. After a restart, the pod lifecycle code deletes those of pods that are gone.
    pub fn known_pods(&self) -> Result<BTreeSet<String>> {
        let mut pods: BTreeSet<String> = self.ipam().allocations().map(|(_, owner)| owner.to_owned()).collect();
        let dir = &self.config.netns_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pods),
            Err(e) => return Err(Error::io("listing the netns directory", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(Error::io("listing the netns directory", dir))?;
            if let Some(uid) = entry.file_name().to_str().and_then(|n| n.strip_prefix(NETNS_PREFIX))
                && check_owner(uid).is_ok()
            {
                pods.insert(uid.to_owned());
            }
        }
        Ok(pods)
    }

    /// Makes the routes to other nodes' podCIDRs exactly `routes` (an entry for this node's
    /// own podCIDR is skipped): adds the missing, replaces the moved and removes the stale
    /// among the routes of [`NODE_ROUTE_PROTOCOL`]; no other route is touched. Returns the
    /// changes made.
    pub async fn sync_node_routes(&self, routes: &[NodeRoute]) -> Result<Vec<RouteChange>> {
        let current = self.installed_node_routes().await?;
        let changes = routes::plan(Some(self.range.cidr()), &current, routes)?;
        let handle = &self.host.handle;
        for change in &changes {
            match *change {
                RouteChange::Add(route) => handle
                    .route()
                    .add(node_route_message(route)?)
                    .execute()
                    .await
                    .map_err(|source| node_route_error("adding", route, source))?,
                RouteChange::Replace(route) => handle
                    .route()
                    .add(node_route_message(route)?)
                    .replace()
                    .execute()
                    .await
                    .map_err(|source| node_route_error("replacing", route, source))?,
                RouteChange::Remove(route) => match handle.route().del(node_route_message(route)?).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ESRCH => {}
                    other => other.map_err(|source| node_route_error("removing", route, source))?,
                },
            }
        }
        Ok(changes)
    }

    /// Our routes to other nodes' podCIDRs in the main table, both families.
    pub async fn installed_node_routes(&self) -> Result<Vec<NodeRoute>> {
        let mut found = Vec::new();
        for dump in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let messages: Vec<RouteMessage> = match self.host.handle.route().get(dump).execute().try_collect().await {
                Ok(messages) => messages,
                // A kernel without IPv6 has no IPv6 routes.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EAFNOSUPPORT => Vec::new(),
                Err(source) => {
                    return Err(Error::Netlink {
                        what: "listing routes".to_owned(),
                        source,
                    });
                }
            };
            found.extend(messages.iter().filter_map(node_route_of));
        }
        Ok(found)
    }
}

/// The node route a kernel route is, if it is one of ours.
fn node_route_of(message: &RouteMessage) -> Option<NodeRoute> {
    if message.header.table != RouteHeader::RT_TABLE_MAIN || u8::from(message.header.protocol) != NODE_ROUTE_PROTOCOL {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let mut destination = None;
    let mut via = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => via = ip(a),
            _ => {}
        }
    }
    let cidr = IpNet::new(destination?, message.header.destination_prefix_length).ok()?;
    Some(NodeRoute { cidr, via: via? })
}

fn node_route_message(route: NodeRoute) -> Result<RouteMessage> {
    fn invalid<E: std::fmt::Display>(route: NodeRoute) -> impl Fn(E) -> Error {
        move |e| Error::Invalid(format!("node route {} via {}: {e}", route.cidr, route.via))
    }
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.cidr.network(), route.cidr.prefix_len())
        .map_err(invalid(route))?
        .gateway(route.via)
        .map_err(invalid(route))?
        .protocol(RouteProtocol::Other(NODE_ROUTE_PROTOCOL))
        .build())
}

fn node_route_error(doing: &str, route: NodeRoute, source: rtnetlink::Error) -> Error {
    let hint = match &source {
        rtnetlink::Error::NetlinkError(e) if e.raw_code().abs() == libc::ENETUNREACH => {
            ": the node IP is not on a network this node is attached to; nodes must share a layer 2 segment"
        }
        rtnetlink::Error::NetlinkError(e) if e.raw_code().abs() == libc::EEXIST => {
            ": a route to that podCIDR that Weir did not make is in the way; remove it (ip route del)"
        }
        _ => "",
    };
    Error::Netlink {
        what: format!(
            "{doing} the route to podCIDR {} via node {}{hint}",
            route.cidr, route.via
        ),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the pod network can be shared between tasks of a multi-threaded
    /// runtime.
    #[allow(dead_code)]
    fn futures_are_send(network: &PodNetwork) {
        fn send<T: Send + Sync>(_: T) {}
        send(network);
        send(network.create("uid"));
        send(network.delete("uid"));
        send(network.sync_node_routes(&[]));
    }

    #[test]
    fn host_interface_names_are_stable_short_and_distinct() {
        let a = host_interface_name("6f1c8a4e-3b0d-4c2a-9e1f-0a1b2c3d4e5f");
        assert_eq!(a, host_interface_name("6f1c8a4e-3b0d-4c2a-9e1f-0a1b2c3d4e5f"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("weir") && a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, host_interface_name("6f1c8a4e-3b0d-4c2a-9e1f-0a1b2c3d4e60"));
        // sha256("abc") starts ba7816bf8f.
        assert_eq!(host_interface_name("abc"), "weirba7816bf8f");
    }

    #[test]
    fn only_main_table_routes_of_our_protocol_are_node_routes() {
        let ours = node_route_message(NodeRoute {
            cidr: "10.244.2.0/24".parse().unwrap(),
            via: "192.0.2.2".parse().unwrap(),
        })
        .unwrap();
        assert_eq!(
            node_route_of(&ours),
            Some(NodeRoute {
                cidr: "10.244.2.0/24".parse().unwrap(),
                via: "192.0.2.2".parse().unwrap()
            })
        );
        let mut static_route = ours.clone();
        static_route.header.protocol = RouteProtocol::Static;
        assert_eq!(node_route_of(&static_route), None);
        let mut other_table = ours.clone();
        other_table.header.table = 100;
        assert_eq!(node_route_of(&other_table), None);
        let mut pod_route = ours;
        pod_route.header.protocol = RouteProtocol::Other(POD_ROUTE_PROTOCOL);
        assert_eq!(node_route_of(&pod_route), None);
    }
}
