//! The userspace side of the eBPF service datapath: loads and attaches the socket-LB
//! programs from `ebpf/` (and, through [`Datapath::attach_external`], TC and XDP for
//! NodePort/LoadBalancer traffic from outside), pins them, and keeps the service maps
//! equal to the services and endpoints of the cluster. It owns the pins under
//! `<pin root>/<version>/`; it never touches programs or maps it did not pin there.
//!
//! Socket-LB serves both families: IPv4 services live in the `*4` maps, IPv6 services in
//! their `*6` twins (and an IPv6 socket reaching an IPv4 service through its IPv4-mapped
//! address is translated through the IPv4 maps). Backend and reverse-NAT ids are one id
//! space over both, so the AFFINITY and MAGLEV maps serve both. TC and XDP (NodePort,
//! LoadBalancer) translate IPv4 only: an IPv6 frontend cannot be external.
//!
//! Everything is pinned, so translation goes on while no agent runs; a new
//! [`Datapath::load`] reopens the pins and [`Datapath::reconcile`] writes only differences.
//!
//! When a backend leaves a UDP service, the connected UDP sockets socket-LB had sent to it
//! are destroyed through sock_diag netlink in every network namespace of the node (see
//! `sockets.rs` for why not a BPF iterator with `bpf_sock_destroy`).

mod desired;
mod external;
mod gc;
mod index;
pub mod maglev;
mod model;
mod sockets;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, IterableMap, Map, MapData, MapError};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{EbpfError, EbpfLoader};
use tracing::{debug, info};
use weir_ebpf_common::{
    AFFINITY, AffinityKey, AffinityValue, BACKENDS4, BACKENDS4_MAX_ENTRIES, BACKENDS6, BACKENDS6_MAX_ENTRIES,
    Backend4Value, Backend6Value, CT4, DATAPATH_VERSION, MAGLEV, MAGLEV_TABLE_SIZE, NODE4, REV_NAT4,
    REV_NAT4_MAX_ENTRIES, REV_NAT6, REV_NAT6_MAX_ENTRIES, RevNat4Value, RevNat6Value, SERVICE_FLAG_EXTERNAL,
    SERVICE_FLAG_LOCAL, SERVICE_FLAG_MAGLEV, SERVICES4, SERVICES4_MAX_ENTRIES, SERVICES6, SERVICES6_MAX_ENTRIES,
    SOCK_PROGRAMS, SOCK_REV_NAT4, SOCK_REV_NAT6, STATS, Service4Key, Service6Key, ServiceValue, SockRevNat4Key,
    SockRevNat4Value, SockRevNat6Key, SockRevNat6Value, maglev_key,
};

pub use desired::{LB_ALGORITHM_ANNOTATION, NodeContext, desired_state, desired_state_for_node};
pub use external::{
    ConntrackEntry, ConntrackTimeouts, ExternalConfig, ExternalMode, InterfaceAttachment, PacketStats, XdpAttachment,
    XdpPolicy,
};
pub use gc::ConntrackSweeper;
pub use index::IdsExhausted;
pub use model::{
    Backend, BackendState, DesiredState, LbAlgorithm, Protocol, Selection as ServiceSelection, ServiceKey,
};

use index::{ByFamily, Family, Index, Limits, Selection, Write};

/// The kernel programs, built by build.rs from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));

/// Where the pins of the node's datapath live by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weir";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Clone, Debug)]
pub struct Config {
    /// The cgroup v2 directory whose processes get socket-LB: the node's v2 root in
    /// production (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
    pub cgroup_path: PathBuf,
    /// Pins go to `<pin_root>/<DATAPATH_VERSION>/`; must be on a bpffs.
    pub pin_root: PathBuf,
    /// The sizes of the service maps, applied when they are created; maps reopened from
    /// pins keep the size they were created with.
    pub capacity: Capacity,
}

/// How much the service maps hold. The kernel preallocates hash maps, so this is memory
/// the node gives up front: the defaults take about 30 MB for IPv4 and 9 MB for IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// IPv4 service frontends (one per ClusterIP, NodePort, LoadBalancer or external
    /// address and port): the size of REV_NAT4.
    pub services: u32,
    /// IPv4 frontends plus one slot per backend of each: the size of SERVICES4.
    pub service_slots: u32,
    /// Distinct IPv4 backend address:port pairs: the size of BACKENDS4.
    pub backends: u32,
    /// IPv6 service frontends (ClusterIPs): the size of REV_NAT6.
    pub services6: u32,
    /// IPv6 frontends plus one slot per backend of each: the size of SERVICES6.
    pub service_slots6: u32,
    /// Distinct IPv6 backend address:port pairs: the size of BACKENDS6.
    pub backends6: u32,
}

impl Default for Capacity {
    fn default() -> Capacity {
        Capacity {
            services: REV_NAT4_MAX_ENTRIES,
            service_slots: SERVICES4_MAX_ENTRIES,
            backends: BACKENDS4_MAX_ENTRIES,
            services6: REV_NAT6_MAX_ENTRIES,
            service_slots6: SERVICES6_MAX_ENTRIES,
            backends6: BACKENDS6_MAX_ENTRIES,
        }
    }
}

impl Capacity {
    /// Room for `services` IPv4 frontends with `backends_each` backends each, all
    /// distinct; the IPv6 maps keep their default size.
    pub fn for_services(services: u32, backends_each: u32) -> Capacity {
        let slots = u64::from(services) * (1 + u64::from(backends_each));
        Capacity {
            services,
            service_slots: u32::try_from(slots).unwrap_or(u32::MAX),
            backends: services.saturating_mul(backends_each),
            ..Capacity::default()
        }
    }

    /// The loader for the object, with the maps sized and pinned in `pin_dir` (maps already
    /// pinned there are reused as they are).
    fn loader(self, pin_dir: &Path) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(REV_NAT4, self.services.max(1))
            .map_max_entries(SERVICES4, self.service_slots.max(1))
            .map_max_entries(BACKENDS4, self.backends.max(1))
            .map_max_entries(REV_NAT6, self.services6.max(1))
            .map_max_entries(SERVICES6, self.service_slots6.max(1))
            .map_max_entries(BACKENDS6, self.backends6.max(1));
        loader
    }
}

impl Config {
    /// The directory holding this version's pinned maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_root.join(DATAPATH_VERSION)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run the agent as root")]
    NotRoot,
    #[error(
        "{path} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` or choose a pin root under it"
    )]
    NoBpfFs { path: PathBuf },
    #[error(
        "{path} is not a cgroup v2 directory ({reason}); find the v2 hierarchy with `mount -t cgroup2` \
         (hybrid hosts have it at /sys/fs/cgroup/unified) or mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2 { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<EbpfError>),
    #[error("the eBPF object has no program {0}; agent and ebpf/ are out of step")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("link of program {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    IdsExhausted(#[from] IdsExhausted),
    #[error("network interface {name:?} does not exist in this network namespace (see `ip link show`)")]
    NoInterface { name: String },
    #[error(
        "{mode} XDP cannot be attached to {interface}: {source}; the driver may lack XDP support: \
         use XdpPolicy::Auto (TC alone where XDP is missing) or XdpPolicy::Generic"
    )]
    XdpUnsupported {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "TC programs on {interface} were attached through netlink, whose links cannot be pinned to \
         outlive the agent; TCX links need Linux 6.6 or newer"
    )]
    NoTcx { interface: String },
    #[error("invalid datapath configuration: {0}")]
    InvalidConfig(String),
}

/// The loaded (or reopened) datapath: typed handles on the pinned service maps and a
/// mirror of their contents. Dropping it leaves the datapath running.
pub struct Datapath {
    services: BpfHashMap<MapData, Service4Key, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend4Value>,
    rev_nat: BpfHashMap<MapData, u32, RevNat4Value>,
    services6: BpfHashMap<MapData, Service6Key, ServiceValue>,
    backends6: BpfHashMap<MapData, u32, Backend6Value>,
    rev_nat6: BpfHashMap<MapData, u32, RevNat6Value>,
    maglev: BpfHashMap<MapData, u64, u32>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    conntrack: gc::ConntrackMap,
    node: external::NodeMap,
    stats: external::StatsMap,
    sock_rev_nat: BpfHashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    sock_rev_nat6: BpfHashMap<MapData, SockRevNat6Key, SockRevNat6Value>,
    destroyed_udp_sockets: u64,
    /// Stale UDP sockets a failed destroy left open: tried again with the next update.
    pending_udp_sockets: std::collections::BTreeSet<sockets::StaleSocket>,
    udp_socket_errors: u64,
    index: Index,
    pin_dir: PathBuf,
    capacity: Capacity,
}

impl Datapath {
    /// Attaches the socket-LB programs to `config.cgroup_path` and pins their links and the
    /// maps, or, when this version's pins exist, reopens them (the datapath outlives the
    /// agent). Pinned links are reused as they are, wherever they were attached: to move
    /// the datapath to another cgroup, [`Datapath::uninstall`] first.
    pub fn load(config: &Config) -> Result<Datapath, Error> {
        preflight(config)?;
        let pin_dir = config.pin_dir();
        std::fs::create_dir_all(&pin_dir).map_err(|source| Error::Io {
            what: "creating the pin directory",
            path: pin_dir.clone(),
            source,
        })?;
        let missing: Vec<&'static str> = SOCK_PROGRAMS
            .into_iter()
            .filter(|name| !link_pin(&pin_dir, name).exists())
            .collect();
        if missing.is_empty() {
            info!(pin_dir = %pin_dir.display(), "datapath: reopening pinned programs and maps");
        } else {
            attach(config, &pin_dir, &missing)?;
        }
        let mut datapath = Datapath {
            services: open_map(&pin_dir, SERVICES4)?,
            backends: open_map(&pin_dir, BACKENDS4)?,
            rev_nat: open_map(&pin_dir, REV_NAT4)?,
            services6: open_map(&pin_dir, SERVICES6)?,
            backends6: open_map(&pin_dir, BACKENDS6)?,
            rev_nat6: open_map(&pin_dir, REV_NAT6)?,
            maglev: open_map(&pin_dir, MAGLEV)?,
            affinity: open_lru_map(&pin_dir, AFFINITY)?,
            conntrack: open_lru_map(&pin_dir, CT4)?,
            node: open_pinned(&pin_dir, NODE4, Map::Array)?,
            stats: open_pinned(&pin_dir, STATS, Map::PerCpuArray)?,
            sock_rev_nat: open_lru_map(&pin_dir, SOCK_REV_NAT4)?,
            sock_rev_nat6: open_lru_map(&pin_dir, SOCK_REV_NAT6)?,
            destroyed_udp_sockets: 0,
            pending_udp_sockets: Default::default(),
            udp_socket_errors: 0,
            index: Index::default(),
            pin_dir,
            capacity: config.capacity,
        };
        datapath.resync()?;
        Ok(datapath)
    }

    /// Detaches the programs and removes this version's pins (maps go with their last
    /// user). For tests and `weir agent --uninstall`; a running node never needs it.
    pub fn uninstall(config: &Config) -> Result<(), Error> {
        let pin_dir = config.pin_dir();
        let entries = match std::fs::read_dir(&pin_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Io {
                    what: "reading the pin directory",
                    path: pin_dir,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| Error::Io {
                what: "removing pin",
                path,
                source,
            })?;
        }
        for dir in [&pin_dir, &config.pin_root] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                // The root may hold other versions' pins; only this version's dir must go.
                Err(e) if dir == &config.pin_root && e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        what: "removing the pin directory",
                        path: dir.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Makes `key` balance over `backends` (all of `key`'s address family), writing only
    /// what differs from the maps. Returns the number of map writes.
    pub fn upsert_service(&mut self, key: ServiceKey, backends: Vec<Backend>) -> Result<usize, Error> {
        self.upsert_service_with(key, backends, ServiceSelection::default())
    }

    /// [`Datapath::upsert_service`] with a choice of backend selection. A Maglev service
    /// gets its table written after its slots, only the table slots that differ. Connected
    /// UDP sockets translated to a backend that left are destroyed after the writes
    /// ([`Datapath::destroyed_udp_sockets`] counts them). An IPv6 frontend cannot be
    /// `external` (TC and XDP translate IPv4 only) nor IPv4-mapped.
    pub fn upsert_service_with(
        &mut self,
        key: ServiceKey,
        backends: Vec<Backend>,
        selection: ServiceSelection,
    ) -> Result<usize, Error> {
        let family = Family::of(key.address);
        if let Some(other) = backends.iter().find(|b| Family::of(b.address) != family) {
            return Err(Error::InvalidConfig(format!(
                "service {key} is {family} but its backend {} is not: a service's backends must be of its \
                 address family (dual-stack Services have one frontend per family)",
                other.socket_addr()
            )));
        }
        if let std::net::IpAddr::V6(address) = key.address
            && let Some(v4) = address.to_ipv4_mapped()
        {
            return Err(Error::InvalidConfig(format!(
                "service {key}: an IPv4-mapped address is no IPv6 frontend (sockets reach it through the \
                 IPv4 maps); give the service its IPv4 address {v4}"
            )));
        }
        if selection.external && family == Family::V6 {
            return Err(Error::InvalidConfig(format!(
                "service {key}: IPv6 frontends cannot be external (NodePort/LoadBalancer), TC and XDP \
                 translate IPv4 only; give external frontends IPv4 addresses"
            )));
        }
        let mut flags = match selection.algorithm {
            LbAlgorithm::Random => 0,
            LbAlgorithm::Maglev => SERVICE_FLAG_MAGLEV,
        };
        if selection.external {
            flags |= SERVICE_FLAG_EXTERNAL;
            if selection.external_local {
                flags |= SERVICE_FLAG_LOCAL;
            }
        }
        let departed = self.udp_departures(&key, Some(&backends));
        let stale_udp = self.stale_udp_sockets(&departed);
        let old = self.index.selection_of(&key);
        let affinity_timeout = selection.affinity_timeout.unwrap_or(0);
        let writes = self.index.plan_upsert_flagged(key, &backends, flags, affinity_timeout);
        let writes = self.or_resync(writes.map_err(Error::from))?;
        debug!(service = %key, backends = backends.len(), writes = writes.len(), "datapath: upsert service");
        let mut count = self.apply(writes)?;
        if let Some(Selection {
            flags: old_flags,
            rev_nat_id,
            ..
        }) = old
            && old_flags & SERVICE_FLAG_MAGLEV != 0
            && flags & SERVICE_FLAG_MAGLEV == 0
        {
            count += self.remove_maglev_table(rev_nat_id)?;
        }
        if flags & SERVICE_FLAG_MAGLEV != 0 {
            count += self.write_maglev_table(&key)?;
        }
        let had_affinity = old.as_ref().is_some_and(|old| old.affinity_timeout != 0);
        if let Some(Selection {
            rev_nat_id, backends, ..
        }) = self.index.selection_of(&key)
            && (had_affinity || affinity_timeout != 0)
        {
            // Clients stuck to a backend this service no longer selects choose again.
            let keep: Vec<u32> = if affinity_timeout == 0 {
                Vec::new()
            } else {
                backends.iter().map(|(id, _)| *id).collect()
            };
            count += self.forget_affinities(rev_nat_id, &keep)?;
        }
        self.close_stale_udp_sockets(&departed, stale_udp);
        Ok(count)
    }

    /// Removes the affinity entries of the service with `rev_nat_id` whose backend is not
    /// in `keep`: a backend leaving the service, or a reverse-NAT id about to be reused,
    /// must not hold on to clients.
    fn forget_affinities(&mut self, rev_nat_id: u32, keep: &[u32]) -> Result<usize, Error> {
        let map_err = |source| Error::Map { name: AFFINITY, source };
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| key.rev_nat_id == rev_nat_id && !keep.contains(&value.backend_id))
            .map(|(key, _)| key)
            .collect();
        for key in &stale {
            ignore_missing(self.affinity.remove(key)).map_err(map_err)?;
        }
        Ok(stale.len())
    }

    /// Writes the slots of `key`'s Maglev table that differ from its selectable backends'.
    /// Until then the program falls back to random for slots that are missing or stale.
    fn write_maglev_table(&mut self, key: &ServiceKey) -> Result<usize, Error> {
        let Some(Selection {
            rev_nat_id, backends, ..
        }) = self.index.selection_of(key)
        else {
            return Ok(0);
        };
        if backends.is_empty() {
            return self.remove_maglev_table(rev_nat_id);
        }
        // `address:port`, `[address]:port` for IPv6.
        let identities: Vec<String> = backends
            .iter()
            .map(|(_, value)| value.socket_addr().to_string())
            .collect();
        let table = maglev::table(&identities);
        let map_err = |source| Error::Map { name: MAGLEV, source };
        let mut count = 0;
        for (slot, backend) in table.iter().enumerate() {
            let map_key = maglev_key(rev_nat_id, slot as u32);
            let id = backends[*backend as usize].0;
            if self.maglev.get(&map_key, 0).ok() != Some(id) {
                self.maglev.insert(map_key, id, 0).map_err(map_err)?;
                count += 1;
            }
        }
        Ok(count)
    }

    fn remove_maglev_table(&mut self, rev_nat_id: u32) -> Result<usize, Error> {
        let mut count = 0;
        for slot in 0..MAGLEV_TABLE_SIZE {
            match self.maglev.remove(&maglev_key(rev_nat_id, slot)) {
                Ok(()) => count += 1,
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { name: MAGLEV, source }),
            }
        }
        Ok(count)
    }

    /// Removes `key`; connections to it are no longer translated, and connected UDP sockets
    /// translated to its backends are destroyed. Returns the map writes.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<usize, Error> {
        let departed = self.udp_departures(key, None);
        let stale_udp = self.stale_udp_sockets(&departed);
        let old = self.index.selection_of(key);
        let writes = self.index.plan_remove(key);
        debug!(service = %key, writes = writes.len(), "datapath: remove service");
        let mut count = self.apply(writes)?;
        if let Some(old) = old {
            if old.flags & SERVICE_FLAG_MAGLEV != 0 {
                count += self.remove_maglev_table(old.rev_nat_id)?;
            }
            if old.affinity_timeout != 0 {
                count += self.forget_affinities(old.rev_nat_id, &[])?;
            }
        }
        self.close_stale_udp_sockets(&departed, stale_udp);
        Ok(count)
    }

    /// Brings the maps to `desired`: services that should not exist go, the others are
    /// upserted, leftovers of an interrupted agent are cleaned up. Returns the map writes;
    /// 0 when the maps already matched.
    pub fn reconcile(&mut self, desired: &DesiredState) -> Result<usize, Error> {
        let stale: Vec<ServiceKey> = self
            .index
            .services()
            .filter(|key| !desired.services.contains_key(key))
            .copied()
            .collect();
        let mut writes = 0;
        for key in &stale {
            writes += self.remove_service(key)?;
        }
        for (key, backends) in &desired.services {
            writes += self.upsert_service_with(*key, backends.clone(), desired.selection(key))?;
        }
        let cleanup = self.index.plan_cleanup();
        writes += self.apply(cleanup)?;
        info!(
            services = desired.services.len(),
            removed = stale.len(),
            writes,
            "datapath: reconciled"
        );
        Ok(writes)
    }

    /// The services the maps hold.
    pub fn services(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self.index.services().copied().collect();
        keys.sort();
        keys
    }

    /// The backends of `key` as the maps hold them: selectable ones first.
    pub fn backends(&self, key: &ServiceKey) -> Option<Vec<Backend>> {
        self.index.backends_of(key)
    }

    /// Re-reads the maps into the mirror: after load, and after a failed write left the
    /// two apart.
    fn resync(&mut self) -> Result<(), Error> {
        let services = collect(&self.services, SERVICES4)?
            .into_iter()
            .map(|(key, value)| (ByFamily::V4(key), value))
            .chain(
                collect(&self.services6, SERVICES6)?
                    .into_iter()
                    .map(|(key, value)| (ByFamily::V6(key), value)),
            );
        let backends = collect(&self.backends, BACKENDS4)?
            .into_iter()
            .map(|(id, value)| (id, ByFamily::V4(value)))
            .chain(
                collect(&self.backends6, BACKENDS6)?
                    .into_iter()
                    .map(|(id, value)| (id, ByFamily::V6(value))),
            );
        let rev_nats = collect(&self.rev_nat, REV_NAT4)?
            .into_iter()
            .map(|(id, _)| (id, Family::V4))
            .chain(
                collect(&self.rev_nat6, REV_NAT6)?
                    .into_iter()
                    .map(|(id, _)| (id, Family::V6)),
            );
        // Pinned maps keep the size they were created with, whatever the config says now.
        let max_entries = |map: &MapData, name| {
            map.info()
                .map(|info| info.max_entries() as usize)
                .map_err(|source| Error::Map { name, source })
        };
        let limits = Limits {
            backends: [
                max_entries(IterableMap::map(&self.backends), BACKENDS4)?,
                max_entries(IterableMap::map(&self.backends6), BACKENDS6)?,
            ],
            rev_nats: [
                max_entries(IterableMap::map(&self.rev_nat), REV_NAT4)?,
                max_entries(IterableMap::map(&self.rev_nat6), REV_NAT6)?,
            ],
        };
        self.index = Index::restore(services, backends, rev_nats, limits);
        Ok(())
    }

    fn or_resync<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if result.is_err() {
            self.resync()?;
        }
        result
    }

    fn apply(&mut self, writes: Vec<Write>) -> Result<usize, Error> {
        let count = writes.len();
        for write in writes {
            let result = self.apply_one(write);
            self.or_resync(result)?;
        }
        Ok(count)
    }

    fn apply_one(&mut self, write: Write) -> Result<(), Error> {
        let map_err = |name| move |source| Error::Map { name, source };
        match write {
            Write::Backend(id, ByFamily::V4(value)) => self.backends.insert(id, value, 0).map_err(map_err(BACKENDS4)),
            Write::Backend(id, ByFamily::V6(value)) => self.backends6.insert(id, value, 0).map_err(map_err(BACKENDS6)),
            Write::RevNat(id, ByFamily::V4(value)) => self.rev_nat.insert(id, value, 0).map_err(map_err(REV_NAT4)),
            Write::RevNat(id, ByFamily::V6(value)) => self.rev_nat6.insert(id, value, 0).map_err(map_err(REV_NAT6)),
            Write::Slot(ByFamily::V4(key), value) => self.services.insert(key, value, 0).map_err(map_err(SERVICES4)),
            Write::Slot(ByFamily::V6(key), value) => self.services6.insert(key, value, 0).map_err(map_err(SERVICES6)),
            Write::RemoveSlot(ByFamily::V4(key)) => {
                ignore_missing(self.services.remove(&key)).map_err(map_err(SERVICES4))
            }
            Write::RemoveSlot(ByFamily::V6(key)) => {
                ignore_missing(self.services6.remove(&key)).map_err(map_err(SERVICES6))
            }
            Write::RemoveRevNat(id, Family::V4) => ignore_missing(self.rev_nat.remove(&id)).map_err(map_err(REV_NAT4)),
            Write::RemoveRevNat(id, Family::V6) => ignore_missing(self.rev_nat6.remove(&id)).map_err(map_err(REV_NAT6)),
            Write::RemoveBackend(id, Family::V4) => {
                ignore_missing(self.backends.remove(&id)).map_err(map_err(BACKENDS4))
            }
            Write::RemoveBackend(id, Family::V6) => {
                ignore_missing(self.backends6.remove(&id)).map_err(map_err(BACKENDS6))
            }
        }
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}"))
}

/// Loads the object with its maps pinned in `pin_dir` (reusing maps already pinned
/// there), attaches the `missing` programs to the cgroup and pins their links.
fn attach(config: &Config, pin_dir: &Path, missing: &[&'static str]) -> Result<(), Error> {
    info!(cgroup = %config.cgroup_path.display(), pin_dir = %pin_dir.display(), programs = ?missing,
        "datapath: loading and attaching socket-LB programs");
    let mut ebpf = config
        .capacity
        .loader(pin_dir)
        .load(OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))?;
    let cgroup = File::open(&config.cgroup_path).map_err(|source| Error::Io {
        what: "opening cgroup",
        path: config.cgroup_path.clone(),
        source,
    })?;
    for &name in missing {
        let program_err = |source| Error::Program { name, source };
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        let link_id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(program_err)?;
        let link = program.take_link(link_id).map_err(program_err)?;
        let link: FdLink = link.try_into().map_err(|source| Error::Link { name, source })?;
        let path = link_pin(pin_dir, name);
        link.pin(&path).map_err(|source| Error::Pin { path, source })?;
    }
    Ok(())
}

fn open_map<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &'static str) -> Result<BpfHashMap<MapData, K, V>, Error> {
    let map_err = |source| Error::Map { name, source };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
    BpfHashMap::try_from(Map::HashMap(data)).map_err(map_err)
}

fn open_lru_map<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, Error> {
    let map_err = |source| Error::Map { name, source };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
    BpfHashMap::try_from(Map::LruHashMap(data)).map_err(map_err)
}

fn open_pinned<T: TryFrom<Map, Error = MapError>>(
    pin_dir: &Path,
    name: &'static str,
    kind: fn(MapData) -> Map,
) -> Result<T, Error> {
    let map_err = |source| Error::Map { name, source };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
    T::try_from(kind(data)).map_err(map_err)
}

fn collect<K: aya::Pod, V: aya::Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Map { name, source })
}

/// Says what is wrong with the host, and how to fix it, before the kernel says EPERM.
fn preflight(config: &Config) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let existing = config
        .pin_root
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) != Some(BPF_FS_MAGIC) {
        return Err(Error::NoBpfFs {
            path: config.pin_root.clone(),
        });
    }
    let cgroup = &config.cgroup_path;
    if !cgroup.is_dir() {
        return Err(Error::NoCgroup2 {
            path: cgroup.clone(),
            reason: "no such directory".to_owned(),
        });
    }
    match fs_type(cgroup) {
        Some(CGROUP2_SUPER_MAGIC) => Ok(()),
        Some(other) => Err(Error::NoCgroup2 {
            path: cgroup.clone(),
            reason: format!("filesystem type {other:#x}, e.g. a cgroup v1 hierarchy"),
        }),
        None => Err(Error::NoCgroup2 {
            path: cgroup.clone(),
            reason: "statfs failed".to_owned(),
        }),
    }
}

fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a valid C string and `stat` a properly sized out-parameter.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast, reason = "f_type is i64 on x86_64 but not everywhere")]
    Some(stat.f_type as i64)
}
