//! The agent's Node: registration with capacity, allocatable, addresses, labels and node
//! info read off this machine, conditions, and the heartbeats the control plane's node
//! lifecycle controller watches: the Lease in `kube-node-lease` renewed every
//! [`NodeConfig::heartbeat`], and the status written when it changes (or every
//! [`NodeConfig::status_report`], as kubelet's nodeStatusReportFrequency).
//!
//! Readiness is the caller's to say ([`Readiness`]): the node is `Ready=False` with the
//! caller's message until the container runtime and pod network are up, so nothing is
//! scheduled onto a node that cannot run it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

/// The namespace of the node Leases.
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The version nodes report as `kubeletVersion`: the Kubernetes version the API speaks.
pub const KUBELET_VERSION: &str = "v1.37.0";
/// kubelet's default hard eviction thresholds, kept out of allocatable as kubelet does.
const EVICTION_MEMORY: u64 = 100 * 1024 * 1024;
const EVICTION_NODEFS_PERCENT: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("node name {0:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.'; at most 253)")]
    InvalidName(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Api { what, source }
}

/// Whether the node can run pods; `NotReady` carries the reason shown in `kubectl describe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// What the node says about itself.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// InternalIP addresses, first the primary.
    pub addresses: Vec<IpAddr>,
    /// Extra labels besides the well-known ones (`kubernetes.io/hostname`, `os`, `arch`).
    pub labels: BTreeMap<String, String>,
    /// `pods` capacity (kubelet's --max-pods).
    pub max_pods: u32,
    /// The directory whose file system is the node's ephemeral storage.
    pub data_dir: PathBuf,
    /// `containerRuntimeVersion`, e.g. `containerd://1.6.20`.
    pub runtime_version: String,
    /// Port of the agent's server for logs/exec (`daemonEndpoints.kubeletEndpoint`).
    pub agent_port: u16,
    /// Lease renewal period (kubelet: 10 s, a quarter of the 40 s lease).
    pub heartbeat: Duration,
    /// Unchanged status is written again after this long (kubelet: 5 min).
    pub status_report: Duration,
}

impl NodeConfig {
    /// Defaults for `name` on this machine: the address of the default route, 110 pods,
    /// kubelet's periods.
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            addresses: detect_node_ip().into_iter().collect(),
            labels: BTreeMap::new(),
            max_pods: 110,
            data_dir: data_dir.into(),
            runtime_version: String::new(),
            agent_port: 10250,
            heartbeat: Duration::from_secs(10),
            status_report: Duration::from_secs(300),
        }
    }
}

/// The source address this machine would use towards the outside (the IPv4 default
/// route), found by connecting a UDP socket to a TEST-NET address: no packet is sent. IPv4
/// only: a dual-stack node lists its IPv6 address in [`NodeConfig::addresses`] itself.
pub fn detect_node_ip() -> Option<IpAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The machine's resources as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
}

impl Resources {
    /// Reads CPUs (online), MemTotal and the size of `data_dir`'s file system.
    pub fn of_this_machine(data_dir: &std::path::Path) -> Result<Resources, NodeError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| NodeError::Read {
                path: path.into(),
                source,
            })
        };
        let meminfo = read("/proc/meminfo")?;
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Ok(Resources {
            cpus,
            memory_bytes: memory_kib * 1024,
            storage_bytes: fs_size(data_dir).unwrap_or(0),
        })
    }
}

fn fs_size(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid C string and `stat` a properly sized out-parameter.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_blocks * stat.f_frsize)
}

/// Static facts about the machine for `status.nodeInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineInfo {
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
}

impl MachineInfo {
    pub fn of_this_machine() -> MachineInfo {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let os_image = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "Linux".to_owned());
        MachineInfo {
            machine_id: read("/etc/machine-id"),
            system_uuid: read("/sys/class/dmi/id/product_uuid"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            kernel_version: read("/proc/sys/kernel/osrelease"),
            os_image,
        }
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> (String, String, String, String) {
    let status = if status { "True" } else { "False" };
    (
        type_.to_owned(),
        status.to_owned(),
        reason.to_owned(),
        message.to_owned(),
    )
}

/// The four conditions kubelet reports, as (type, status, reason, message).
pub fn conditions(readiness: &Readiness) -> Vec<(String, String, String, String)> {
    let ready = match readiness {
        Readiness::Ready => condition("Ready", true, "KubeletReady", "kubelet is posting ready status"),
        Readiness::NotReady(why) => condition("Ready", false, "KubeletNotReady", why),
    };
    vec![
        condition(
            "MemoryPressure",
            false,
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        condition(
            "DiskPressure",
            false,
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        condition(
            "PIDPressure",
            false,
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        ready,
    ]
}

/// The Node object to register (metadata and the status parts that do not change).
pub fn node_object(config: &NodeConfig, resources: &Resources, machine: &MachineInfo) -> Node {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), config.name.clone()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), arch().to_owned()),
        ("beta.kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("beta.kubernetes.io/arch".to_owned(), arch().to_owned()),
    ]);
    labels.extend(config.labels.clone());
    let value = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": config.name, "labels": labels},
        "spec": {},
        "status": static_status(config, resources, machine),
    });
    serde_json::from_value(value).expect("a well-formed Node")
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn static_status(config: &NodeConfig, resources: &Resources, machine: &MachineInfo) -> Value {
    let capacity = json!({
        "cpu": resources.cpus.to_string(),
        "memory": format!("{}Ki", resources.memory_bytes / 1024),
        "ephemeral-storage": format!("{}Ki", resources.storage_bytes / 1024),
        "pods": config.max_pods.to_string(),
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    let allocatable = json!({
        "cpu": resources.cpus.to_string(),
        "memory": format!("{}Ki", resources.memory_bytes.saturating_sub(EVICTION_MEMORY) / 1024),
        "ephemeral-storage": (resources.storage_bytes / 100 * (100 - EVICTION_NODEFS_PERCENT)).to_string(),
        "pods": config.max_pods.to_string(),
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    let mut addresses: Vec<Value> = config
        .addresses
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": config.name}));
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "addresses": addresses,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": config.agent_port}},
        "nodeInfo": {
            "machineID": machine.machine_id,
            "systemUUID": machine.system_uuid,
            "bootID": machine.boot_id,
            "kernelVersion": machine.kernel_version,
            "osImage": machine.os_image,
            "containerRuntimeVersion": config.runtime_version,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
    })
}

/// The conditions to write: `lastTransitionTime` kept from `old` while a status stays,
/// `lastHeartbeatTime` now.
pub fn merge_conditions(old: &[NodeCondition], readiness: &Readiness, now: jiff::Timestamp) -> Vec<Value> {
    conditions(readiness)
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let transition = old
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .map_or(now, |t| t.0);
            json!({
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": Time(now),
                "lastTransitionTime": Time(transition),
            })
        })
        .collect()
}

/// A registered node: its heartbeats run until [`RegisteredNode::stop`] (or drop).
pub struct RegisteredNode {
    pub name: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RegisteredNode {
    /// Stops the heartbeats (graceful agent shutdown). The Node, its Lease and the pods stay;
    /// the control plane marks the node Unknown after its grace period.
    pub fn stop(self) {
        self.heartbeat.abort();
    }
}

impl Drop for RegisteredNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Creates the Node (or takes over the existing one of this name: labels and status are
/// brought up to date, spec such as podCIDR and taints is left alone), writes its status
/// and starts the heartbeats, which follow `readiness`.
pub async fn register(
    client: Client,
    config: NodeConfig,
    readiness: watch::Receiver<Readiness>,
) -> Result<RegisteredNode, NodeError> {
    if config.name.is_empty()
        || config.name.len() > 253
        || !config
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(NodeError::InvalidName(config.name.clone()));
    }
    let resources = Resources::of_this_machine(&config.data_dir)?;
    let machine = MachineInfo::of_this_machine();
    let desired = node_object(&config, &resources, &machine);
    let nodes: Api<Node> = Api::all(client.clone());
    let registered = match nodes.create(&PostParams::default(), &desired).await {
        Ok(node) => {
            info!(node = %config.name, "node: registered");
            node
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let patch = json!({"metadata": {"labels": desired.metadata.labels}});
            let node = nodes
                .patch(&config.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(api(format!("updating the labels of the existing node {}", config.name)))?;
            info!(node = %config.name, "node: already registered, taking it over");
            node
        }
        Err(e) => return Err(api(format!("registering node {}", config.name))(e)),
    };
    let mut heartbeat = Heartbeat {
        nodes,
        leases: Api::namespaced(client, LEASE_NAMESPACE),
        status: static_status(&config, &resources, &machine),
        uid: registered.uid().unwrap_or_default(),
        config,
        readiness,
        last_written: None,
    };
    heartbeat.write_status(true).await?;
    heartbeat.renew_lease().await?;
    let name = heartbeat.config.name.clone();
    Ok(RegisteredNode {
        name,
        heartbeat: tokio::spawn(async move { heartbeat.run().await }),
    })
}

struct Heartbeat {
    nodes: Api<Node>,
    leases: Api<Lease>,
    config: NodeConfig,
    status: Value,
    uid: String,
    readiness: watch::Receiver<Readiness>,
    /// The readiness last written and when.
    last_written: Option<(Readiness, tokio::time::Instant)>,
}

impl Heartbeat {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.renew_lease().await {
                        warn!(error = %e, "node: lease renewal failed; retrying next beat");
                    }
                    if let Err(e) = self.write_status(false).await {
                        warn!(error = %e, "node: status update failed; retrying next beat");
                    }
                }
                changed = self.readiness.changed() => {
                    if changed.is_err() {
                        // The agent dropped its readiness sender: it is going away.
                        return;
                    }
                    if let Err(e) = self.write_status(false).await {
                        warn!(error = %e, "node: status update failed; retrying next beat");
                    }
                }
            }
        }
    }

    /// Writes the status when readiness changed, when `force`d, or after `status_report`.
    async fn write_status(&mut self, force: bool) -> Result<(), NodeError> {
        let readiness = self.readiness.borrow().clone();
        let due = match &self.last_written {
            None => true,
            Some((written, at)) => *written != readiness || at.elapsed() >= self.config.status_report,
        };
        if !(force || due) {
            return Ok(());
        }
        let name = self.config.name.clone();
        let current = self
            .nodes
            .get_status(&name)
            .await
            .map_err(api(format!("reading node {name}")))?;
        let old = current.status.and_then(|s| s.conditions).unwrap_or_default();
        let mut status = self.status.clone();
        status["conditions"] = Value::Array(merge_conditions(&old, &readiness, jiff::Timestamp::now()));
        self.nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .map_err(api(format!("writing the status of node {name}")))?;
        if self.last_written.as_ref().map(|(r, _)| r) != Some(&readiness) {
            info!(node = %name, ?readiness, "node: status written");
        }
        self.last_written = Some((readiness, tokio::time::Instant::now()));
        Ok(())
    }

    async fn renew_lease(&mut self) -> Result<(), NodeError> {
        let name = self.config.name.clone();
        let spec = json!({
            "holderIdentity": name,
            "leaseDurationSeconds": (self.config.heartbeat.as_secs() * 4).max(1),
            "renewTime": MicroTime(jiff::Timestamp::now()),
        });
        match self
            .leases
            .patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": spec})))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // Owned by the Node, so it goes when the Node is deleted: the Node's uid as it
                // is now (a Node deleted and created again has a new one).
                if let Some(uid) = self.nodes.get_opt(&name).await.ok().flatten().and_then(|n| n.uid()) {
                    self.uid = uid;
                }
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {
                        "name": name,
                        "namespace": LEASE_NAMESPACE,
                        "ownerReferences": [{
                            "apiVersion": "v1", "kind": "Node", "name": name, "uid": self.uid,
                        }],
                    },
                    "spec": spec,
                }))
                .expect("a well-formed Lease");
                self.leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(api(format!("creating the lease of node {name}")))?;
                Ok(())
            }
            Err(e) => Err(api(format!("renewing the lease of node {name}"))(e)),
        }
    }
}

/// Parses a Kubernetes quantity the way the status above writes them (for tests and logs).
pub fn quantity_bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.as_str();
    if let Some(k) = s.strip_suffix("Ki") {
        return k.parse::<u64>().ok().map(|v| v * 1024);
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            addresses: vec!["10.0.0.5".parse().unwrap()],
            runtime_version: "containerd://1.6.20".into(),
            ..NodeConfig::new("node-a", "/tmp")
        }
    }

    fn resources() -> Resources {
        Resources {
            cpus: 2,
            memory_bytes: 8 * 1024 * 1024 * 1024,
            storage_bytes: 100 * 1000 * 1000 * 1000,
        }
    }

    #[test]
    fn the_node_carries_capacity_allocatable_addresses_labels_and_info() {
        let node = node_object(&config(), &resources(), &MachineInfo::default());
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "node-a");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        let status = node.status.unwrap();
        let capacity = status.capacity.unwrap();
        assert_eq!(capacity["cpu"].0, "2");
        assert_eq!(capacity["memory"].0, "8388608Ki");
        assert_eq!(capacity["pods"].0, "110");
        let allocatable = status.allocatable.unwrap();
        // kubelet's eviction thresholds: 100Mi of memory, 10% of the disk.
        assert_eq!(
            quantity_bytes(&allocatable["memory"]),
            Some(8 * 1024 * 1024 * 1024 - 100 * 1024 * 1024)
        );
        assert_eq!(
            quantity_bytes(&allocatable["ephemeral-storage"]),
            Some(90 * 1000 * 1000 * 1000)
        );
        let addresses = status.addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(addresses[0].address, "10.0.0.5");
        assert_eq!(addresses[1].type_, "Hostname");
        let info = status.node_info.unwrap();
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert_eq!(info.container_runtime_version, "containerd://1.6.20");
        assert_eq!(status.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port, 10250);
    }

    #[test]
    fn conditions_keep_their_transition_time_until_the_status_changes() {
        let t0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let not_ready = Readiness::NotReady("container runtime is starting".into());
        let first: Vec<NodeCondition> = merge_conditions(&[], &not_ready, t0)
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let ready = first.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("KubeletNotReady"))
        );
        assert_eq!(ready.message.as_deref(), Some("container runtime is starting"));

        let again: Vec<NodeCondition> = merge_conditions(&first, &not_ready, t1)
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let ready = again.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time.as_ref().unwrap().0, t0);
        assert_eq!(ready.last_heartbeat_time.as_ref().unwrap().0, t1);

        let now_ready: Vec<NodeCondition> = merge_conditions(&again, &Readiness::Ready, t1)
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let ready = now_ready.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time.as_ref().unwrap().0, t1);
        let memory = now_ready.iter().find(|c| c.type_ == "MemoryPressure").unwrap();
        assert_eq!(
            memory.last_transition_time.as_ref().unwrap().0,
            t0,
            "unchanged conditions keep t0"
        );
    }

    #[test]
    fn this_machine_is_readable() {
        let r = Resources::of_this_machine(std::path::Path::new("/")).unwrap();
        assert!(r.cpus >= 1 && r.memory_bytes > 0 && r.storage_bytes > 0, "{r:?}");
        assert!(!MachineInfo::of_this_machine().kernel_version.is_empty());
    }
}
