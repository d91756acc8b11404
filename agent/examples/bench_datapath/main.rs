//! `bench_datapath`: new TCP connections per second and per-connection latency through each
//! way a Kubernetes service can be reached on a node — straight to the backend, socket-LB,
//! TC and XDP NodePort, kube-proxy's iptables DNAT (nft and legacy) and IPVS — with 1 to
//! 100,000 services programmed, and how long programming those services takes (map writes
//! against iptables-restore and ipvsadm). Run it through `cargo xtask bench datapath` (as
//! root), which builds it in release mode and draws the plot.
//!
//! Every measurement builds its own client, node and backend namespaces (veths, routed by
//! the node), a cgroup and a private pin root, and programs the services for its mode from
//! empty (timed). Then the client (this binary, re-invoked in `client` mode inside the client
//! namespace) visits the modes in turn, about 250 ms at a time, until each has had its
//! bounded duration, and everything is removed again. So modes are interleaved within each
//! run and machine noise hits all of them alike; the report gives medians over runs, and
//! ratios against direct taken per run. Writes `<out>/datapath.{json,md}`.

/// Shared with the privileged tests: joining a cgroup before exec.
#[path = "../../tests/common/mod.rs"]
mod common;
mod load;
mod modes;
mod report;
mod topology;

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::load::LoadSample;
use crate::modes::{Catalog, MAX_SERVICES, Mode, NotMeasured, Programming};
use crate::report::{Outcome, Outcomes, Params, Report, duration_text, thousands};
use crate::topology::Topology;

#[derive(Parser)]
#[command(name = "bench_datapath", args_conflicts_with_subcommands = true)]
/// Service datapath benchmark: connections/s through socket-LB, TC, XDP, iptables and IPVS
/// with 1 to 100,000 services, and the time to program them. Needs root.
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Numbers of services to program (comma-separated); each size is measured with N-1
    /// fillers and the measured service.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 1_000, 10_000, 100_000])]
    sizes: Vec<usize>,
    /// Runs; every run measures every mode at every size. The report gives medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Milliseconds of connections per mode, size and run (after a 200 ms warm-up).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(200..=30_000))]
    duration_ms: u64,
    /// Modes to measure (comma-separated); direct is the baseline of every ratio.
    #[arg(long, value_delimiter = ',', default_values_t = Mode::ALL)]
    modes: Vec<Mode>,
    /// Where datapath.json and datapath.md go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Role {
    /// The load client, run by the benchmark inside the client namespace.
    #[command(hide = true)]
    Client {
        #[arg(long)]
        target: SocketAddrV4,
        #[arg(long)]
        duration_ms: u64,
    },
    /// The backend server, run by the benchmark inside the backend namespace.
    #[command(hide = true)]
    Server {
        #[arg(long)]
        listen: SocketAddrV4,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.role {
        Some(Role::Client { target, duration_ms }) => load::client(target, Duration::from_millis(duration_ms)),
        Some(Role::Server { listen }) => load::server(listen),
        None => bench(cli.bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_datapath: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(line: impl AsRef<str>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[bench datapath] {}", line.as_ref());
    let _ = out.flush();
}

/// About how long the client stays on one mode before moving on to the next.
const SLICE_MS: u64 = 250;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM stop the benchmark between measurements, so the Drop guards of the
/// current one remove its namespaces, cgroup and pins. Children get the default action
/// back at exec.
fn stop_on_interrupt() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_interrupt as *const () as libc::sighandler_t);
        }
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the datapath benchmark needs root (network namespaces, eBPF programs, iptables): \
             run `sudo cargo xtask bench datapath`"
        );
    }
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if let Some(bad) = sizes.iter().find(|s| **s == 0 || **s > MAX_SERVICES) {
        bail!("--sizes: {bad} is out of range; each size must be 1 to {MAX_SERVICES} services");
    }
    let mut modes = args.modes.clone();
    modes.dedup();
    if !modes.contains(&Mode::Direct) {
        modes.insert(0, Mode::Direct);
    }
    stop_on_interrupt();
    let params = Params {
        sizes,
        modes,
        runs: args.runs,
        duration_ms: args.duration_ms,
    };
    let slices = (args.duration_ms / SLICE_MS).max(1);
    let slice = Duration::from_millis(args.duration_ms / slices);
    let total = params.runs as usize * params.sizes.len() * params.modes.len();
    status(format!(
        "{} runs × sizes {:?} × modes {}: {total} measurements of {} ms each ({slices} slices), plus setup and programming",
        params.runs,
        params.sizes,
        params.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        args.duration_ms
    ));
    let mut unavailable: Vec<(Mode, String)> = params
        .modes
        .iter()
        .filter_map(|&mode| modes::unavailable(mode).map(|reason| (mode, reason)))
        .collect();
    for (mode, reason) in &unavailable {
        status(format!("{mode}: {reason}"));
    }
    let mut outcomes = Outcomes::default();
    'runs: for run in 1..=params.runs {
        for &size in &params.sizes {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break 'runs;
            }
            let catalog = Catalog::new(size);
            let prefix = |mode: Mode| {
                format!(
                    "run {run}/{} · {} services · {mode}",
                    params.runs,
                    thousands(size as f64)
                )
            };
            // Every mode gets its own namespaces and is programmed first; then the client
            // visits the modes in turn, a slice at a time, so a burst of machine noise hits
            // them all alike.
            let mut stands: Vec<Stand> = Vec::new();
            for &mode in &params.modes {
                if let Some((_, reason)) = unavailable.iter().find(|(m, _)| *m == mode) {
                    outcomes.push(size, mode, Outcome::Unavailable(reason.clone()));
                    continue;
                }
                match Stand::prepare(mode, &catalog) {
                    Ok(stand) => {
                        if let Some(p) = stand.programming {
                            status(format!(
                                "{}: programmed in {} (CPU {})",
                                prefix(mode),
                                duration_text(p.wall),
                                duration_text(p.cpu)
                            ));
                        }
                        stands.push(stand);
                    }
                    Err(NotMeasured::Unavailable(reason)) => {
                        status(format!("{}: {reason}", prefix(mode)));
                        unavailable.push((mode, reason.clone()));
                        outcomes.push(size, mode, Outcome::Unavailable(reason));
                    }
                    Err(NotMeasured::Failed(error)) => {
                        status(format!("{}: FAILED: {error:#}", prefix(mode)));
                        outcomes.push(size, mode, Outcome::Failed(format!("{error:#}")));
                    }
                }
                if INTERRUPTED.load(Ordering::SeqCst) {
                    break 'runs;
                }
            }
            for _ in 0..slices {
                for stand in stands.iter_mut().filter(|s| s.error.is_none()) {
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        break 'runs;
                    }
                    match run_client(&stand.topology, stand.mode, catalog.target(stand.mode), slice) {
                        Ok(part) => stand.load.merge(part),
                        Err(e) => stand.error = Some(e),
                    }
                }
            }
            for stand in stands {
                let load = stand.load.summary();
                let outcome = match stand.error {
                    Some(error) => Outcome::Failed(format!("{error:#}")),
                    None if load.connections == 0 => Outcome::Failed(format!(
                        "no connection succeeded: {}",
                        load.first_error.as_deref().unwrap_or("no attempt finished")
                    )),
                    None => Outcome::Measured {
                        programming: stand.programming,
                        load,
                    },
                };
                outcomes.push(size, stand.mode, outcome);
                status(progress_line(&prefix(stand.mode), &outcomes, size, stand.mode));
            }
        }
    }
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    let report = Report::new(&params, &outcomes);
    report.write(&args.out)?;
    println!("\n{}", report.markdown());
    for verdict in &report.verdicts {
        status(verdict);
    }
    status(format!(
        "wrote {} and {}",
        args.out.join("datapath.json").display(),
        args.out.join("datapath.md").display()
    ));
    if interrupted {
        bail!("interrupted; the report holds the measurements made until then");
    }
    Ok(())
}

fn progress_line(prefix: &str, outcomes: &Outcomes, size: usize, mode: Mode) -> String {
    match outcomes.last(size, mode) {
        Some(Outcome::Measured { programming, load }) => {
            let ratio = match outcomes.latest_ratio(size, mode) {
                Some(r) if mode != Mode::Direct => format!(" ({r:.2}x direct)"),
                _ => String::new(),
            };
            let programmed =
                programming.map_or(String::new(), |p| format!(", programmed in {}", duration_text(p.wall)));
            let failed = if load.failures > 0 {
                format!(
                    ", {} failed ({})",
                    load.failures,
                    load.first_error.as_deref().unwrap_or("?")
                )
            } else {
                String::new()
            };
            format!(
                "{prefix}: {} conns/s{ratio}, p50 {} µs, p99 {} µs{programmed}{failed}",
                thousands(load.conns_per_s),
                thousands(load.p50_us),
                thousands(load.p99_us)
            )
        }
        Some(Outcome::Failed(error)) => format!("{prefix}: FAILED: {error}"),
        Some(Outcome::Unavailable(reason)) => format!("{prefix}: {reason}"),
        None => format!("{prefix}: not run"),
    }
}

/// One mode at one size, ready to measure: its own namespaces, the services programmed.
struct Stand {
    mode: Mode,
    programming: Option<Programming>,
    load: LoadSample,
    error: Option<anyhow::Error>,
    topology: Topology,
}

impl Stand {
    fn prepare(mode: Mode, catalog: &Catalog) -> Result<Stand, NotMeasured> {
        let mut topology = Topology::create().context("building the namespaces")?;
        topology.start_server()?;
        let programming = modes::program(mode, &mut topology, catalog)?;
        Ok(Stand {
            mode,
            programming,
            load: LoadSample::default(),
            error: None,
            topology,
        })
    }
}

fn run_client(topology: &Topology, mode: Mode, target: SocketAddrV4, duration: Duration) -> Result<LoadSample> {
    let output = topology
        .client_command(mode.client_in_cgroup())?
        .args(["client", "--target", &target.to_string()])
        .args(["--duration-ms", &duration.as_millis().to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the client")?;
    if !output.status.success() {
        bail!("the client failed ({}); see its error above", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("the client printed nothing")?;
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("parsing the client's output {line:?}"))?;
    LoadSample::from_json(&value)
}
