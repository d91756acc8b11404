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
    /// The node's container images: import tarballs (air-gapped nodes), list them.
    #[command(subcommand)]
    Image(weir_agent::runtime::ImageCommand),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Server(config) | Command::Up(config) => apiserver::run(config).await,
        Command::Image(command) => command.run().await,
    }
}
