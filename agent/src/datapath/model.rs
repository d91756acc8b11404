//! What the datapath is asked to do, in plain terms: services (an IPv4 or IPv6 address, a
//! port and a protocol) and their backends. No map layouts and no ids here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use weir_ebpf_common::{PROTO_TCP, PROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub(crate) fn from_number(number: u8) -> Option<Protocol> {
        match number {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A service frontend: a ClusterIP (or NodePort or LoadBalancer address), a service port
/// and its protocol. Its backends are of the same family: IPv4 frontends go to IPv4
/// backends, IPv6 ones to IPv6 backends. IPv6 frontends are for socket-LB only (TC and
/// XDP translate IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.address, self.port), self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    /// Ready: gets new connections.
    Active,
    /// Terminating but still serving: gets new connections only while the service has no
    /// active backend (Kubernetes' terminating-endpoint fallback).
    Terminating,
}

/// One endpoint of a service: where connections to the service port go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    pub state: BackendState,
    /// Runs on another node: NodePort/LoadBalancer traffic to it (externalTrafficPolicy
    /// Cluster) is SNATed to the node so that replies come back through this node.
    pub remote: bool,
}

impl Backend {
    pub fn active(address: impl Into<IpAddr>, port: u16) -> Backend {
        Backend {
            address: address.into(),
            port,
            state: BackendState::Active,
            remote: false,
        }
    }

    pub fn terminating(address: impl Into<IpAddr>, port: u16) -> Backend {
        Backend {
            address: address.into(),
            port,
            state: BackendState::Terminating,
            remote: false,
        }
    }

    /// `address:port` (`[address]:port` for IPv6).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The same backend, on another node.
    pub fn on_remote_node(self) -> Backend {
        Backend { remote: true, ..self }
    }
}

/// How a service picks the backend of a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbAlgorithm {
    /// A random selectable backend per connection.
    #[default]
    Random,
    /// Maglev consistent hashing of the client's network namespace: one client keeps its
    /// backend, and a backend change moves few clients.
    Maglev,
}

/// How a service chooses backends, beyond which ones it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selection {
    pub algorithm: LbAlgorithm,
    /// sessionAffinity ClientIP: a client (its network namespace) keeps its backend while
    /// it reconnects within this many seconds. `None`: no affinity.
    pub affinity_timeout: Option<u32>,
    /// A NodePort or LoadBalancer frontend: TC and XDP translate packets from outside the
    /// node to it (socket-LB translates every frontend for local clients).
    pub external: bool,
    /// externalTrafficPolicy Local (with `external`): the backends given are this node's,
    /// the client address reaches them unchanged, and without one the packet is dropped.
    pub external_local: bool,
}

/// Everything the maps should hold: each service with its backends, sorted and without
/// duplicates, and the services whose [`Selection`] is not the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceKey, Vec<Backend>>,
    pub selections: BTreeMap<ServiceKey, Selection>,
}

impl DesiredState {
    pub fn selection(&self, key: &ServiceKey) -> Selection {
        self.selections.get(key).copied().unwrap_or_default()
    }
}
