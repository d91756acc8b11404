//! The pod network of one node: addresses from the node's podCIDR ([`ipam`]), a network
//! namespace and veth per pod ([`sandbox`]), routes to other nodes' podCIDRs ([`routes`]) and
//! the /etc files a pod sees ([`files`]). It owns the `weir0` gateway interface, the
//! `weir<hash>` veths, the routes marked with [`POD_ROUTE_PROTOCOL`] and
//! [`NODE_ROUTE_PROTOCOL`], and the pod netns mounts; it must not touch the service datapath.
//!
//! # Addressing and routing
//!
//! The node's podCIDR (e.g. `10.244.3.0/24`) is split as follows: the network address is not
//! used, the first usable address (`10.244.3.1`) is the node's gateway, the rest up to the
//! broadcast address go to pods. Routing is layer 3 only, in the style of Calico: no pod is
//! bridged to another, every packet of a pod is routed by the node.
//!
//! - The gateway lives on `weir0` as `10.244.3.1/24`. `weir0` is a bridge without ports,
//!   used as a dummy interface (no pod is attached to it). Its prefix route sends every
//!   address of the podCIDR that no pod holds into it, which drops it, so a packet for a
//!   deleted pod never leaves the node (no loops between nodes).
//! - Each pod gets a veth pair: the pod side is `eth0` in the pod's netns with
//!   `<pod IP>/<podCIDR prefix>` and a default route via the gateway; the host side,
//!   `weir` + 10 hex digits of the SHA-256 of the pod UID, has no address, a `/32` route to
//!   the pod IP (source: the gateway) and `proxy_arp` on with `proxy_delay` 0, so the host
//!   answers the pod's ARP for the gateway and for other pods at once.
//! - Other nodes' podCIDRs are routed directly via their node IPs
//!   ([`PodNetwork::sync_node_routes`]): nodes share one layer 2 segment, no tunnel.
//!
//! # What is persisted
//!
//! Pod IP allocations, one file per address under `<ipam dir>/<cidr>/` holding the owner's
//! pod UID (see [`ipam`]). Network namespaces are bind mounts under the netns directory
//! (`/run/netns` by default, as `ip netns` uses), so they outlive an agent restart; the
//! kernel keeps interfaces and routes. Nothing else is kept: the names of everything are
//! derived from the pod UID.

pub mod files;
pub mod ipam;
mod netns;
pub mod routes;
pub mod sandbox;

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

pub use ipam::Ipam;
pub use routes::{NodeRoute, node_routes};
pub use sandbox::{PodNetwork, PodNetworkConfig, PodSandboxNetwork};

/// The route protocol number that marks the `/32` routes to this node's pods (`ip route`
/// shows `proto 88`). Not in iproute2's rt_protos; chosen so our routes are ours alone.
pub const POD_ROUTE_PROTOCOL: u8 = 88;

/// The route protocol number that marks the routes to other nodes' podCIDRs
/// (`proto 87`): [`PodNetwork::sync_node_routes`] adds, replaces and removes only those.
pub const NODE_ROUTE_PROTOCOL: u8 = 87;

/// What can go wrong in the pod network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The podCIDR has too few addresses for a gateway and one pod.
    #[error("podCIDR {cidr} is too small: it needs room for a gateway and at least one pod (IPv4 /30 or larger)")]
    CidrTooSmall {
        /// The podCIDR.
        cidr: IpNet,
    },
    /// Every pod address of the podCIDR is allocated.
    #[error(
        "podCIDR {cidr} has no free pod address: all {total} are allocated; delete pods on this node \
         or give the node a larger podCIDR (--node-cidr-mask-size)"
    )]
    Exhausted {
        /// The podCIDR.
        cidr: IpNet,
        /// How many pod addresses it has.
        total: u128,
    },
    /// An owner (pod UID) that cannot be stored or used in names.
    #[error("pod UID {uid:?} is not usable: {reason}")]
    InvalidUid {
        /// The UID given.
        uid: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A filesystem operation on IPAM state or a netns mount failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Something the pod network was given does not fit together.
    #[error("{0}")]
    Invalid(String),
    /// A node route whose podCIDR and node IP are not of one address family.
    #[error("node route {cidr} via {via}: the podCIDR and the node IP must be of one address family")]
    MixedFamilies {
        /// The podCIDR.
        cidr: IpNet,
        /// The node IP.
        via: IpAddr,
    },
}

impl Error {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
        let what = what.into();
        move |source| Error::Netlink { what, source }
    }

    /// The errno of a netlink error, when the kernel sent one.
    fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => Some(message.raw_code().abs()),
            _ => None,
        }
    }
}

/// Results of the pod network.
pub type Result<T, E = Error> = std::result::Result<T, E>;
