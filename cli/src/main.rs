//! The `weir` binary: parses flags and hands each role to its library. Nothing else lives here.

use anyhow::Result;
use clap::{Parser, Subcommand};
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
    /// Run the API server (and, as they arrive, the scheduler, controllers, DNS and ingress).
    Server(ServerConfig),
    /// Run everything this machine needs for a single-node cluster. Today: the API server.
    Up(ServerConfig),
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

#[tokio::main]
async fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Server(config) | Command::Up(config) => apiserver::run(config).await,
        Command::LogDriver { .. } => unreachable!("handled before the runtime starts"),
    }
}
