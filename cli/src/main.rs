//! The `weir` binary: parses flags and hands each role to its library. Nothing else lives here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use weir_agent::agent::{self, AgentConfig};
use weir_control_plane::apiserver::{self, ServerConfig};

/// mimalloc instead of glibc's malloc: the API server and its controllers allocate from many
/// threads at once, and glibc's arena locks showed as the top cost under load (perf, bench
/// scheduler).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A networking-first, Kubernetes-compatible orchestrator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server with the scheduler and controllers.
    Server(ServerConfig),
    /// Run the node agent: join a cluster, run its pods on this machine.
    Agent(AgentConfig),
    /// A single-node cluster on this machine: the API server and an agent in one process.
    Up(UpConfig),
    /// The node's container images: import tarballs (air-gapped nodes), list them.
    #[command(subcommand)]
    Image(weir_agent::runtime::ImageCommand),
    /// containerd's binary logging driver for the agent's containers: the runc shim starts it
    /// with the container's stdout on fd 3, stderr on fd 4 and a ready pipe on fd 5, and it
    /// writes CRI-format lines to LOG_PATH. Not for use by hand.
    #[command(hide = true)]
    LogDriver {
        /// The container's log file.
        log_path: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::LogDriver { log_path } = &cli.command {
        // No runtime and no tracing: the driver is a small process per container, and its
        // stderr goes nowhere anyone reads.
        return weir_agent::stream::cri::run_log_driver(log_path).map_err(anyhow::Error::msg);
    }
    run(cli)
}

/// `weir up`: the server's flags and the agent's that make sense on the same machine.
#[derive(clap::Args)]
struct UpConfig {
    #[command(flatten)]
    server: ServerConfig,
    /// This node's name (default: the host name, lowercased).
    #[arg(long)]
    node_name: Option<String>,
    /// The node's address (default: the source address of the default route).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Use this containerd instead of starting one under the data dir.
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// Do not load the eBPF service datapath.
    #[arg(long)]
    no_service_proxy: bool,
    /// The port of the agent's own server (logs, exec, port-forward).
    #[arg(long, default_value_t = 10250)]
    agent_port: u16,
    /// The cgroup pods' containers go under.
    #[arg(long, default_value = "/weir")]
    cgroup_parent: String,
    /// The cgroup v2 directory whose processes get socket-level service translation
    /// (default: the v2 root, /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup).
    #[arg(long)]
    service_cgroup: Option<PathBuf>,
    /// Where the service datapath pins its maps and links (a bpffs directory).
    #[arg(long, default_value = weir_agent::datapath::DEFAULT_PIN_ROOT)]
    bpf_pin_root: PathBuf,
    /// Run only the server (no agent: no pods run on this machine).
    #[arg(long)]
    no_agent: bool,
}

#[tokio::main]
async fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Server(config) => apiserver::run(config).await,
        Command::Agent(config) => agent::run(config, stop_on_signal()).await,
        Command::Up(config) => up(config).await,
        Command::Image(command) => command.run().await,
        Command::LogDriver { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// A flag that turns true on Ctrl-C or SIGTERM.
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

async fn up(config: UpConfig) -> Result<()> {
    if config.no_agent {
        return apiserver::run(config.server).await;
    }
    let port = config.server.secure_port;
    let data_dir = config.server.data_dir.clone();
    let stop = stop_on_signal();
    let mut server = tokio::spawn(apiserver::run(config.server));
    // The server has its certificates and token once its port is open.
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(local).await.is_err() {
        if server.is_finished() {
            return server.await.context("the API server task")?;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the API server did not open port {port} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token_path = data_dir.join("node-token");
    let token = std::fs::read_to_string(&token_path).with_context(|| format!("reading {}", token_path.display()))?;
    let agent_config = AgentConfig {
        token: Some(token.trim().to_owned()),
        node_name: config.node_name,
        node_ip: config.node_ip,
        containerd_socket: config.containerd_socket,
        no_service_proxy: config.no_service_proxy,
        port: config.agent_port,
        cgroup_parent: config.cgroup_parent,
        service_cgroup: config.service_cgroup,
        bpf_pin_root: config.bpf_pin_root,
        ..AgentConfig::new(format!("https://127.0.0.1:{port}"), data_dir)
    };
    let mut agent = tokio::spawn(agent::run(agent_config, stop));
    tokio::select! {
        result = &mut server => {
            // The server stopped (Ctrl-C or an error): the agent got the same signal.
            let result = result.context("the API server task")?;
            match tokio::time::timeout(Duration::from_secs(30), agent).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the agent stopped with an error"),
                Err(_) => tracing::warn!("the agent did not stop within 30 s"),
                _ => {}
            }
            result
        }
        result = &mut agent => {
            let result = result.context("the agent task")?;
            if let Err(e) = &result {
                tracing::error!(error = %e, "the agent stopped; stopping the server");
            }
            server.abort();
            result
        }
    }
}
