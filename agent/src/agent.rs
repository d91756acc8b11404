//! The node agent as one program: join the cluster (or reuse the credentials of an earlier
//! join), start containerd, register the Node, get the podCIDR, set up the pod network and
//! the routes to other nodes, load the service datapath and feed it, and run the pods bound
//! to this node until stopped. Stopping leaves the pods running; the next start adopts them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::join::{self, Token};
use crate::network::files::{DnsSettings, ResolvConf};
use crate::network::{PodNetwork, PodNetworkConfig, node_routes};
use crate::node::{self, NodeConfig, Readiness};
use crate::pods::directory::Directory;
use crate::pods::env::NodeFacts;
use crate::pods::{manager, worker};
use crate::runtime::{Containerd, ContainerdConfig, DEFAULT_NAMESPACE, Runtime};

/// `weir agent`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentConfig {
    /// The API server, e.g. https://10.0.0.1:6443.
    #[arg(long, env = "WEIR_SERVER")]
    pub server: String,
    /// The join token (`<data-dir>/node-token` on the server). Not needed once the agent has
    /// joined: its credentials are kept in `<data-dir>/agent.kubeconfig`.
    #[arg(long, env = "WEIR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// This node's name (default: the host name, lowercased).
    #[arg(long, env = "WEIR_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the agent keeps containerd, pod files, IP allocations and its credentials.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "/var/lib/weir")]
    pub data_dir: PathBuf,
    /// Use this containerd instead of starting one under the data dir.
    #[arg(long)]
    pub containerd_socket: Option<PathBuf>,
    /// The node's address (InternalIP; default: the source address of the default route).
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// The cluster DNS service address pods resolve with.
    #[arg(long, default_value = "10.96.0.10")]
    pub cluster_dns: IpAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Where pods' network namespaces are mounted.
    #[arg(long, default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// The bridge that holds the pod gateway address.
    #[arg(long, default_value = "weir0")]
    pub gateway_interface: String,
    /// The cgroup (relative to each hierarchy's root) pods' containers go under.
    #[arg(long, default_value = "/weir")]
    pub cgroup_parent: String,
    /// Do not load the eBPF service datapath (Services are then not reachable from this node).
    #[arg(long)]
    pub no_service_proxy: bool,
    /// The cgroup v2 directory whose processes get socket-level service translation
    /// (default: the v2 root, /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup).
    #[arg(long)]
    pub service_cgroup: Option<PathBuf>,
    /// Where the datapath pins its maps and links (a bpffs directory).
    #[arg(long, default_value = crate::datapath::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,
    /// The port of the agent's own server (logs, exec, port-forward).
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
    /// How the agent reaches image registries.
    #[command(flatten)]
    pub registries: crate::runtime::RegistryConfig,
    /// How long to wait for the node's podCIDR before running only hostNetwork pods.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    pub pod_cidr_timeout: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a number of seconds like 60s"))
}

impl AgentConfig {
    /// Defaults for an agent of `server` under `data_dir`.
    pub fn new(server: impl Into<String>, data_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            server: server.into(),
            token: None,
            node_name: None,
            data_dir: data_dir.into(),
            containerd_socket: None,
            node_ip: None,
            cluster_dns: IpAddr::from([10, 96, 0, 10]),
            cluster_domain: "cluster.local".into(),
            netns_dir: PathBuf::from("/run/netns"),
            gateway_interface: "weir0".into(),
            cgroup_parent: "/weir".into(),
            no_service_proxy: false,
            service_cgroup: None,
            bpf_pin_root: PathBuf::from(crate::datapath::DEFAULT_PIN_ROOT),
            port: 10250,
            pod_cidr_timeout: Duration::from_secs(60),
            registries: crate::runtime::RegistryConfig::default(),
        }
    }

    fn node_name(&self) -> Result<String> {
        if let Some(name) = &self.node_name {
            return Ok(name.clone());
        }
        let name =
            std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name (give --node-name)")?;
        Ok(name.trim().to_ascii_lowercase())
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.data_dir.join("agent").join("kubeconfig")
    }
}

/// The agent's credentials, kept in `<data-dir>/agent/` (kubeconfig, the cluster CA and the
/// streaming server's serving certificate): those of an earlier join with this server, else a
/// new join with the token (whose serving certificate names `addresses`).
async fn credentials(
    config: &AgentConfig,
    node_name: &str,
    addresses: &[IpAddr],
) -> Result<(kube::Client, crate::stream::ServerTls)> {
    let dir = config.data_dir.join("agent");
    let path = config.kubeconfig_path();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let existing = Kubeconfig::read_from(&path).ok().filter(|k| {
        k.clusters
            .iter()
            .any(|c| c.cluster.as_ref().and_then(|c| c.server.as_deref()) == Some(config.server.as_str()))
            && k.auth_infos
                .iter()
                .any(|a| a.name == format!("system:node:{node_name}"))
    });
    let stored = existing.zip(read("ca.crt").zip(read("serving.crt")).zip(read("serving.key")));
    let (kubeconfig, tls) = match stored {
        Some((k, ((ca_pem, cert_pem), key_pem))) => (
            k,
            crate::stream::ServerTls {
                ca_pem,
                cert_pem,
                key_pem,
            },
        ),
        None => {
            let token: Token = config
                .token
                .as_deref()
                .context("this node has not joined the cluster yet: give --token (the server's <data-dir>/node-token)")?
                .parse()?;
            let credentials = join::join_with_addresses(&config.server, &token, node_name, addresses).await?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            credentials.write_kubeconfig(&path, &config.server, node_name)?;
            credentials.write_serving_certificate(&dir)?;
            std::fs::write(dir.join("ca.crt"), &credentials.ca_cert)
                .with_context(|| format!("writing {}", dir.join("ca.crt").display()))?;
            info!(node = node_name, kubeconfig = %path.display(), "joined the cluster");
            let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
            (kubeconfig, credentials.server_tls())
        }
    };
    let kube_config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((kube::Client::try_from(kube_config)?, tls))
}

/// Waits for the node's podCIDR (the control plane's node IPAM assigns it).
async fn pod_cidr(client: &kube::Client, name: &str, timeout: Duration) -> Option<ipnet::IpNet> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(node) = nodes.get(name).await {
            let spec = node.spec.unwrap_or_default();
            let cidrs = spec
                .pod_cidrs
                .filter(|c| !c.is_empty())
                .or_else(|| spec.pod_cidr.map(|c| vec![c]))
                .unwrap_or_default();
            if let Some(v4) = cidrs
                .iter()
                .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
                .find(|c| c.network().is_ipv4())
            {
                return Some(v4);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the agent until `stop` turns true.
pub async fn run(config: AgentConfig, stop: watch::Receiver<bool>) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "the agent needs root (network namespaces, routes, containerd, cgroups, eBPF): run it as root or with \
             sudo"
        );
    }
    let node_name = config.node_name()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let addresses: Vec<IpAddr> = match config.node_ip {
        Some(ip) => vec![ip],
        None => node::detect_node_ip().into_iter().collect(),
    };
    let (client, serving) = credentials(&config, &node_name, &addresses).await?;

    let containerd_config = ContainerdConfig {
        existing_socket: config.containerd_socket.clone(),
        ..ContainerdConfig::managed(config.data_dir.join("containerd"))
    };
    let containerd = Containerd::start(&containerd_config).await?;
    let mut runtime = Runtime::connect(containerd.socket(), DEFAULT_NAMESPACE)
        .await?
        .with_registry_config(config.registries.clone());
    // Containers log through `weir log-driver` (CRI format, a time on every line) when the
    // agent runs as the weir binary.
    if let Ok(exe) = std::env::current_exe()
        && exe.file_name().is_some_and(|n| n == "weir")
    {
        runtime = runtime.with_logger(exe);
    }
    // Air-gapped nodes: every image archive in <data-dir>/images/ (failures are logged).
    let images = crate::runtime::images_dir(&config.data_dir);
    // On a blocking thread: the import's futures are not provably `Send` for every lifetime
    // (see `pull_image_spawnable`), and `run` must stay spawnable.
    let imported = {
        let runtime = runtime.clone();
        let images = images.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(crate::runtime::import_directory(&runtime, &images)))
            .await
            .context("the image import task")?
    };
    match imported {
        Ok(report) => {
            if !report.imported.is_empty() {
                info!(images = ?report.images(), dir = %images.display(), "imported image archives");
            }
        }
        Err(e) => warn!(error = %e, "importing the image archives in {}", images.display()),
    }

    let (ready_tx, ready_rx) = watch::channel(Readiness::NotReady("the agent is starting".into()));
    let mut node_config = NodeConfig::new(node_name.clone(), config.data_dir.clone());
    node_config.addresses = addresses.clone();
    node_config.runtime_version = "containerd://".into();
    node_config.agent_port = config.port;
    let host_ips: Vec<String> = node_config.addresses.iter().map(ToString::to_string).collect();
    let registered = node::register(client.clone(), node_config, ready_rx).await?;

    let network = match pod_cidr(&client, &node_name, config.pod_cidr_timeout).await {
        Some(cidr) => {
            let network_config = PodNetworkConfig {
                netns_dir: config.netns_dir.clone(),
                gateway_interface: config.gateway_interface.clone(),
                ..PodNetworkConfig::new(cidr, &config.data_dir)
            };
            let network = Arc::new(PodNetwork::open(network_config).await?);
            info!(%cidr, "pod network ready");
            tokio::spawn(sync_routes(client.clone(), network.clone(), stop.clone()));
            Some(network)
        }
        None => {
            warn!(
                "node {node_name} got no IPv4 podCIDR within {:?}: only hostNetwork pods will run (start the server \
                 with --cluster-cidr)",
                config.pod_cidr_timeout
            );
            None
        }
    };

    if !config.no_service_proxy {
        // A cgroup below the v2 root (e.g. the pods' parent) may not exist before the first pod.
        let service_cgroup = config.service_cgroup.clone().unwrap_or_else(cgroup_v2_root);
        std::fs::create_dir_all(&service_cgroup)
            .with_context(|| format!("creating the service cgroup {}", service_cgroup.display()))?;
        let datapath_config = crate::datapath::Config {
            cgroup_path: service_cgroup,
            pin_root: config.bpf_pin_root.clone(),
            capacity: crate::datapath::Capacity::default(),
        };
        let node_addresses = host_ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let context = crate::datapath::NodeContext {
            name: node_name.clone(),
            addresses: node_addresses,
        };
        tokio::spawn(feed_datapath(client.clone(), datapath_config, context, stop.clone()));
    }

    let resources = node::Resources::of_this_machine(&config.data_dir)?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let ctx = Arc::new(worker::Context {
        client: client.clone(),
        runtime,
        network,
        node_name: node_name.clone(),
        host_ips,
        pods_dir: config.data_dir.join("pods"),
        dns: DnsSettings {
            cluster_dns: vec![config.cluster_dns],
            cluster_domain: config.cluster_domain.clone(),
            host: ResolvConf::parse(&host_resolv),
        },
        facts: NodeFacts {
            allocatable_millicores: i128::from(resources.cpus) * 1000,
            allocatable_memory: i128::from(resources.memory_bytes),
            allocatable_ephemeral_storage: i128::from(resources.storage_bytes),
            ..NodeFacts::default()
        },
        backoff_initial: crate::pods::backoff::INITIAL,
        backoff_max: crate::pods::backoff::MAX,
        directory: Arc::new(Directory::default()),
        cgroup_parent: config.cgroup_parent.clone(),
        volume_source: Arc::new(crate::volumes::KubeVolumeSource::new(client.clone(), node_name.clone())),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "kubelet".into(),
                instance: Some(node_name.clone()),
            },
        ),
    });
    let listener = tokio::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, config.port))
        .await
        .or(tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, config.port)).await)
        .with_context(|| {
            format!(
                "binding the agent's port {} (logs, exec, port-forward): is another agent or a kubelet running? pick \
                 another with --port",
                config.port
            )
        })?;
    let stream = crate::stream::StreamServer::new(ctx.runtime.clone(), ctx.directory.clone(), &serving)?;
    let streaming = tokio::spawn(Arc::new(stream).serve(listener));
    let _ = ready_tx.send(Readiness::Ready);
    info!(node = %node_name, "agent ready");
    manager::run(ctx, stop).await;
    streaming.abort();
    registered.stop();
    containerd.shutdown().await?;
    info!("agent stopped; pods keep running");
    Ok(())
}

/// The cgroup v2 hierarchy's root: /sys/fs/cgroup/unified on hybrid (v1 + v2) hosts,
/// /sys/fs/cgroup on unified ones.
fn cgroup_v2_root() -> PathBuf {
    let hybrid = PathBuf::from("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() {
        hybrid
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Keeps the routes to other nodes' podCIDRs in step with the Nodes.
async fn sync_routes(client: kube::Client, network: Arc<PodNetwork>, mut stop: watch::Receiver<bool>) {
    let (reader, writer) = reflector::store::<Node>();
    let stream = reflector(writer, watcher(Api::<Node>::all(client), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            item = stream.next() => if item.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        // Coalesce a burst of node updates.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let nodes: Vec<Node> = reader.state().iter().map(|n| (**n).clone()).collect();
        match network.sync_node_routes(&node_routes(&nodes)).await {
            Ok(changes) if !changes.is_empty() => info!(?changes, "routes to other nodes' pods updated"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "updating the routes to other nodes' pods"),
        }
    }
}

/// Loads the service datapath and programs it from the Services and EndpointSlices. The
/// datapath's calls block (map updates, socket walks), so it lives on its own thread.
async fn feed_datapath(
    client: kube::Client,
    config: crate::datapath::Config,
    node: crate::datapath::NodeContext,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<crate::datapath::DesiredState>();
    let loader = std::thread::spawn(move || -> Result<(), crate::datapath::Error> {
        let mut datapath = crate::datapath::Datapath::load(&config)?;
        info!(pins = %datapath.pin_dir().display(), "service datapath loaded");
        while let Ok(mut desired) = rx.recv() {
            // Only the newest state matters.
            while let Ok(newer) = rx.try_recv() {
                desired = newer;
            }
            if let Err(e) = datapath.reconcile(&desired) {
                warn!(error = %e, "programming the service datapath");
            }
        }
        Ok(())
    });
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let service_stream = reflector(
        services_writer,
        watcher(Api::<Service>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .map(|_| ());
    let slice_stream = reflector(
        slices_writer,
        watcher(Api::<EndpointSlice>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .map(|_| ());
    let mut changes = std::pin::pin!(futures::stream::select(service_stream, slice_stream));
    loop {
        tokio::select! {
            item = changes.next() => if item.is_none() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if loader.is_finished() {
            break;
        }
        let services: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
        let slices: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
        let desired = crate::datapath::desired_state_for_node(&services, &slices, &node);
        if tx.send(desired).is_err() {
            break;
        }
    }
    drop(tx);
    match tokio::task::spawn_blocking(move || loader.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(
            error = %e,
            "the service datapath could not be loaded: Services are not reachable from this node (run with \
             --no-service-proxy to silence this)"
        ),
        _ => warn!("the service datapath thread panicked"),
    }
}
