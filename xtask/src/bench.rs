//! `cargo xtask bench <area>`: builds in release mode, runs the benchmark binary of the area
//! against every peer that runs here, and writes `target/bench/<area>.{json,md,png}`.
//! The plot is drawn by matplotlib from a venv under `target/tools/`, created on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::command::{self, status};
use crate::setup;
use crate::workspace::Workspace;

#[derive(Clone, Copy, ValueEnum)]
pub enum Area {
    /// API server: creates/s, updates/s, LIST of 10,000 pods, watch fan-out; embedded vs etcd.
    Api,
    /// Scheduler: pods bound per second with 1,000 fake nodes and 10,000 pending pods, and a
    /// 1,000-replica Deployment until fully bound.
    Scheduler,
    /// Service datapath (root): new connections/s and latency through socket-LB, TC, XDP,
    /// iptables (nft, legacy) and IPVS against direct, with 1 to 100,000 services, and the
    /// time to program them.
    Datapath,
    /// Pod start latency (root): 100 pods created at once on one node, create → Running p50 and
    /// p99 (image present), and the agent's memory.
    Pods,
}

impl Area {
    fn name(self) -> &'static str {
        match self {
            Area::Api => "api",
            Area::Scheduler => "scheduler",
            Area::Datapath => "datapath",
            Area::Pods => "pods",
        }
    }

    fn plot_script(self) -> &'static str {
        match self {
            Area::Api => PLOT,
            Area::Scheduler => PLOT_SCHEDULER,
            Area::Datapath => PLOT_DATAPATH,
            Area::Pods => PLOT_PODS,
        }
    }
}

/// matplotlib for the plots; 3.10 has wheels for Debian 12's Python 3.11 and later.
const MATPLOTLIB: &str = "matplotlib==3.10.8";

/// Draws `<area>.json`'s `metrics` rows (one panel each; a bar per store; the target as a
/// dashed line) into a PNG. matplotlib ships its own DejaVu fonts, so no system fonts needed.
const PLOT: &str = r##"
import json, math, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dest = sys.argv[1], sys.argv[2]
report = json.load(open(src))
stores = list(report["stores"].keys())
shown = ["creates_per_s", "updates_per_s", "pod_creates_per_s", "list_pods_ms", "watch_fanout_ms", "watch_open_s"]
metrics = [m for m in report["metrics"] if m["key"] in shown] or report["metrics"]
cols = min(3, len(metrics))
rows = math.ceil(len(metrics) / cols)
fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
for ax, m in zip(axes.flat, metrics):
    values = [m.get(s) for s in stores]
    heights = [v if v is not None else 0 for v in values]
    bars = ax.bar(stores, heights, color=colors[: len(stores)])
    for bar, v in zip(bars, values):
        text = "failed" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    if m.get("target") is not None:
        ax.axhline(m["target"], color="red", linestyle="--", linewidth=1)
        ax.annotate(f"target {m['target_text']}", xy=(0.99, m["target"]), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", color="red", fontsize=8)
    title = m["label"]
    if len(title) > 45:
        cut = title.rfind(" ", 0, 45)
        title = title[:cut] + "\n" + title[cut + 1:]
    ax.set_title(title, fontsize=9)
    better = "higher is better" if m["better"] == "higher" else "lower is better"
    ax.set_ylabel(f"{m['unit']} ({better})", fontsize=8)
    ax.margins(y=0.15)
for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
p = report.get("params", {})
fig.suptitle(f"Weir API server benchmark ({report.get('cpus', '?')} CPUs, HTTPS + HTTP/2, "
             f"{p.get('concurrency', '?')} requests in flight)", fontsize=11)
fig.tight_layout()
fig.savefig(dest, dpi=110)
"##;

/// Draws scheduler.json: bound pods over time per run, pods/s against the target and
/// kube-scheduler's published range, and the Deployment's time to be fully bound.
const PLOT_SCHEDULER: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dest = sys.argv[1], sys.argv[2]
report = json.load(open(src))
p = report["params"]
metrics = {m["key"]: m for m in report["metrics"]}
fig, (curve, rate, deploy) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
for i, run in enumerate(report["runs"]):
    xs = [t for t, _ in run["curve"]]
    ys = [n for _, n in run["curve"]]
    curve.plot(xs, ys, label=f"run {i + 1}: {run['pods_per_s']:,.0f} pods/s")
curve.set_xlabel("seconds since the first node was created")
curve.set_ylabel("pods bound")
curve.set_title(f"{p['pods']:,} pending pods onto {p['nodes']:,} nodes", fontsize=10)
curve.legend(fontsize=8)
m = metrics["pods_per_s"]
bars = rate.bar(["weir"], [m["weir"]], color="#4C72B0")
rate.annotate(f"{m['weir']:,.0f}", (0, m["weir"]), ha="center", va="bottom", fontsize=9)
rate.axhline(1000, color="red", linestyle="--", linewidth=1)
rate.annotate("target 1,000", xy=(0.99, 1000), xycoords=("axes fraction", "data"), ha="right", va="bottom",
              color="red", fontsize=8)
rate.axhspan(100, 300, color="#DD8452", alpha=0.3)
rate.annotate("kube-scheduler, published", xy=(0.99, 300), xycoords=("axes fraction", "data"), ha="right",
              va="bottom", fontsize=8)
rate.set_ylabel("pods/s (higher is better)", fontsize=8)
rate.set_title("Scheduling throughput (median)", fontsize=10)
rate.margins(y=0.15)
m = metrics["deployment_bound_s"]
deploy.bar(["weir"], [m["weir"]], color="#55A868")
deploy.annotate(f"{m['weir']:.2f} s", (0, m["weir"]), ha="center", va="bottom", fontsize=9)
deploy.set_ylabel("s (lower is better)", fontsize=8)
deploy.set_title(f"Deployment of {p['replicas']:,} replicas fully bound", fontsize=10)
deploy.margins(y=0.15)
fig.suptitle(f"Weir scheduler benchmark ({report.get('cpus', '?')} CPUs, median of {p['runs']} runs)", fontsize=11)
fig.tight_layout()
fig.savefig(dest, dpi=110)
"##;

/// Draws datapath.json: per mode, new connections/s as a ratio of direct by number of
/// services (the 0.95x target dashed), and programming time by number of services (log-log,
/// the 1 s target dashed). Modes that did not run are listed under the plot with the reason.
const PLOT_DATAPATH: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dest = sys.argv[1], sys.argv[2]
report = json.load(open(src))
p = report["params"]
sizes, modes = p["sizes"], p["modes"]
rows = {(r["mode"], r["services"]): r for r in report["results"]}
fig, (ratio_ax, prog_ax) = plt.subplots(1, 2, figsize=(14, 5.4))
notes = []
def series(mode, key):
    return [(s, rows[(mode, s)][key]) for s in sizes if (mode, s) in rows and rows[(mode, s)][key] is not None]
for mode in modes:
    points = series(mode, "ratio_vs_direct")
    if not points:
        reason = next((rows[(mode, s)]["status"] for s in sizes if (mode, s) in rows), "not run")
        notes.append(f"{mode}: {reason}")
        continue
    xs, ys = zip(*points)
    style = {"color": "black", "linestyle": ":"} if mode == "direct" else {}
    ratio_ax.plot(xs, ys, marker="o", label=mode, **style)
    if mode != "direct":
        prog = series(mode, "programming_ms")
        if prog:
            px, py = zip(*prog)
            prog_ax.plot(px, py, marker="o", label=mode)
for ax in (ratio_ax, prog_ax):
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:,}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("services programmed")
    ax.grid(True, which="major", alpha=0.3)
ratio_ax.axhline(report["ratio_target"], color="red", linestyle="--", linewidth=1)
ratio_ax.annotate(f"target {report['ratio_target']:.2f}x (socket-LB, TC)", xy=(0.99, report["ratio_target"]),
                  xycoords=("axes fraction", "data"), ha="right", va="bottom", color="red", fontsize=8)
ratio_ax.set_ylim(bottom=0)
ratio_ax.set_ylabel("new connections/s, ratio of direct (higher is better)", fontsize=9)
ratio_ax.set_title("Connection rate through each datapath", fontsize=10)
ratio_ax.legend(fontsize=8)
prog_ax.set_yscale("log")
prog_ax.axhline(report["programming_target_ms"], color="red", linestyle="--", linewidth=1)
prog_ax.annotate("target: 100,000 services in 1 s (maps)", xy=(0.01, report["programming_target_ms"]),
                 xycoords=("axes fraction", "data"), ha="left", va="bottom", color="red", fontsize=8)
prog_ax.set_ylabel("ms to program N services, from empty (lower is better)", fontsize=9)
prog_ax.set_title("Programming time: map writes vs iptables-restore vs ipvsadm", fontsize=10)
prog_ax.legend(fontsize=8)
fig.suptitle(f"Weir datapath benchmark (Linux {report.get('kernel', '?')}, {report.get('cpus', '?')} CPUs, "
             f"median of {p['runs']} runs, {p['duration_ms']} ms each)", fontsize=11)
if notes:
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom")
fig.tight_layout(rect=(0, 0.04 * len(notes), 1, 1))
fig.savefig(dest, dpi=110)
"##;

/// Draws pods.json: the latency distribution of every run (CDF), p50/p99 against the target
/// and Kubernetes' published SLO, and the agent's and its containerd's memory.
const PLOT_PODS: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dest = sys.argv[1], sys.argv[2]
r = json.load(open(src))
p = r["params"]
fig, (cdf, pct, mem) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
for i, run in enumerate(r["runs"]):
    for phase, style in (("paced", "-"), ("burst", "--")):
        xs = run[phase]["latencies_s"]
        ys = [(k + 1) / len(xs) * 100 for k in range(len(xs))]
        cdf.plot(xs, ys, style, label=f"run {i + 1} {phase}")
cdf.axvline(r["target_p99_s"], color="red", linestyle=":", linewidth=1)
cdf.annotate("target p99 1 s", xy=(r["target_p99_s"], 5), color="red", fontsize=8)
cdf.set_xlabel("seconds from create to Running")
cdf.set_ylabel("% of pods")
cdf.set_title(f"{p['pods']} pods on one node: {p['rate']}/s (paced) and at once (burst)", fontsize=10)
cdf.legend(fontsize=7)
names = ["paced p50", "paced p99", "burst p50", "burst p99"]
vals = [r["paced_p50_s"], r["paced_p99_s"], r["burst_p50_s"], r["burst_p99_s"]]
bars = pct.bar(names, vals, color=["#4C72B0", "#DD8452", "#4C72B0", "#DD8452"])
for b, v in zip(bars, vals):
    pct.annotate(f"{v:.2f} s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
pct.axhline(r["target_p99_s"], color="red", linestyle="--", linewidth=1)
pct.axhline(r["kubernetes_slo_p99_s"], color="gray", linestyle=":", linewidth=1)
pct.annotate("Kubernetes SLO p99 (published)", xy=(0.99, r["kubernetes_slo_p99_s"]),
             xycoords=("axes fraction", "data"), ha="right", va="bottom", color="gray", fontsize=8)
pct.tick_params(axis="x", labelsize=7)
pct.set_ylabel("s (lower is better)", fontsize=8)
pct.set_title("Pod start latency (median of runs)", fontsize=10)
pct.margins(y=0.15)
mvals = [r["agent_rss_mib"], r["containerd_rss_mib"]]
mb = mem.bar(["agent", "containerd"], mvals, color=["#55A868", "#8172B2"])
for b, v in zip(mb, mvals):
    mem.annotate(f"{v:.0f} MiB", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
mem.set_ylabel("RSS MiB (lower is better)", fontsize=8)
mem.set_title(f"Memory with {p['pods']} pods", fontsize=10)
mem.margins(y=0.15)
fig.suptitle(f"Weir pod start benchmark ({r.get('cpus', '?')} CPUs, median of {p['runs']} runs)", fontsize=11)
fig.tight_layout()
fig.savefig(dest, dpi=110)
"##;

pub fn run(ws: &Workspace, area: Area, args: &[String]) -> Result<()> {
    if matches!(area, Area::Datapath) {
        return run_datapath(ws, args);
    }
    if matches!(area, Area::Pods) {
        return run_pods(ws, args);
    }
    let name = area.name();
    let bin = format!("bench_{name}");
    status(format!(
        "bench {name}: building weir in release mode (cargo build --release -p weir)"
    ));
    command::run(
        &format!("bench {name}: build weir"),
        ws.cargo().args(["build", "--release", "-p", "weir"]),
        "fix the build errors above",
    )?;
    status(format!(
        "bench {name}: building the benchmark (cargo build --release -p weir-tests --bin {bin})"
    ));
    command::run(
        &format!("bench {name}: build {bin}"),
        ws.cargo()
            .args(["build", "--release", "-p", "weir-tests", "--bin", &bin]),
        "fix the build errors above",
    )?;
    let etcd = setup::etcd();
    if matches!(area, Area::Api) && !etcd.is_file() && !args.iter().any(|a| a == "--stores") {
        bail!(
            "bench api: etcd not found at {}; run `cargo xtask setup` (Debian package etcd-server), \
             or pass `-- --stores embedded`",
            etcd.display()
        );
    }

    let release = ws.target.join("release");
    let out = ws.target.join("bench");
    status(format!(
        "bench {name}: {} --weir {} --out {} {}",
        release.join(&bin).display(),
        release.join("weir").display(),
        out.display(),
        args.join(" ")
    ));
    // A stale result must not be plotted as this run's.
    let _ = std::fs::remove_file(out.join(format!("{name}.json")));
    let bench = command::run(
        &format!("bench {name}: run"),
        Command::new(release.join(&bin))
            .arg("--weir")
            .arg(release.join("weir"))
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("WEIR_ETCD_BINARY", &etcd),
        "see the failing phase and the server log above",
    );
    finish(ws, area, &out, bench)
}

/// The pod start benchmark runs real clusters (namespaces, containerd): root, the images of
/// `cargo xtask images`, weir in release mode.
fn run_pods(ws: &Workspace, args: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!("bench pods: needs root (network namespaces, containerd, cgroups): run it as root");
    }
    setup::run(ws)?;
    let images = crate::images::run(ws)?;
    let images_dir = images
        .first()
        .and_then(|i| i.parent())
        .map(Path::to_path_buf)
        .context("bench pods: `cargo xtask images` built no image")?;
    status("bench pods: building weir and bench_pods in release mode");
    command::run(
        "bench pods: build",
        ws.cargo().args([
            "build",
            "--release",
            "-p",
            "weir",
            "-p",
            "weir-tests",
            "--bin",
            "weir",
            "--bin",
            "bench_pods",
        ]),
        "fix the build errors above",
    )?;
    let release = ws.target.join("release");
    let out = ws.target.join("bench");
    let _ = std::fs::remove_file(out.join("pods.json"));
    status(format!(
        "bench pods: {} --out {} {}",
        release.join("bench_pods").display(),
        out.display(),
        args.join(" ")
    ));
    let bench = command::run(
        "bench pods: run",
        Command::new(release.join("bench_pods"))
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("WEIR_BIN", release.join("weir"))
            .env("WEIR_KUBECTL", ws.kubectl())
            .env("WEIR_IMAGES", &images_dir),
        "see the failing run and the node logs above",
    );
    finish(ws, Area::Pods, &out, bench)
}

/// Phases that failed are in the JSON as nulls; plot what was measured, then report.
fn finish(ws: &Workspace, area: Area, out: &Path, bench: Result<()>) -> Result<()> {
    let name = area.name();
    let json = out.join(format!("{name}.json"));
    if json.is_file() {
        let png = out.join(format!("{name}.png"));
        plot(ws, area.plot_script(), &json, &png)?;
        status(format!(
            "bench {name}: wrote {}, {} and {}",
            json.display(),
            out.join(format!("{name}.md")).display(),
            png.display()
        ));
    }
    bench
}

/// The datapath benchmark is an example of the agent crate (no control plane needed) and
/// runs as root: it builds namespaces, loads eBPF programs and writes iptables rules.
fn run_datapath(ws: &Workspace, args: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "bench datapath: needs root (network namespaces, eBPF programs, iptables and IPVS); \
             run `sudo cargo xtask bench datapath`"
        );
    }
    setup::datapath_bench_packages()?;
    let out = ws.target.join("bench");
    let json = out.join("datapath.json");
    // A stale result must not be plotted as this run's.
    let _ = std::fs::remove_file(&json);
    status(format!(
        "bench datapath: cargo run --release -p weir-agent --example bench_datapath -- --out {} {}",
        out.display(),
        args.join(" ")
    ));
    let bench = command::run(
        "bench datapath: run",
        ws.cargo()
            .args([
                "run",
                "--release",
                "-p",
                "weir-agent",
                "--example",
                "bench_datapath",
                "--",
            ])
            .arg("--out")
            .arg(&out)
            .args(args),
        "see the build errors or the failing measurement above",
    );
    finish(ws, Area::Datapath, &out, bench)
}

/// Renders `json` into `png` with a plot script.
fn plot(ws: &Workspace, script: &str, json: &Path, png: &Path) -> Result<()> {
    let python = plot_python(ws)?;
    command::run(
        "bench: plot",
        Command::new(&python).arg("-c").arg(script).arg(json).arg(png),
        "the numbers are in the JSON and Markdown files; delete target/tools/bench-venv/ and run again",
    )
}

/// The python of `target/tools/bench-venv/`, a venv with matplotlib, created on first use
/// (its own venv, so the plotting packages never mix with the test tools).
fn plot_python(ws: &Workspace) -> Result<PathBuf> {
    let venv = ws.tools().join("bench-venv");
    let python = venv.join("bin").join("python");
    let import = || command::succeeds(Command::new(&python).args(["-c", "import matplotlib"]));
    if import() {
        status(format!("bench: matplotlib: present in {}", venv.display()));
        return Ok(python);
    }
    status(format!(
        "bench: matplotlib: venv + pip install {MATPLOTLIB} into {}",
        venv.display()
    ));
    std::fs::create_dir_all(ws.tools()).with_context(|| format!("creating {}", ws.tools().display()))?;
    command::run(
        "bench: plot venv",
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .stdin(std::process::Stdio::null()),
        "install Debian's python3-venv (`cargo xtask setup` does it as root)",
    )?;
    command::run(
        "bench: install matplotlib",
        Command::new(&python)
            .args(["-m", "pip", "install", "--no-input", "--progress-bar", "off"])
            .args(["--disable-pip-version-check", "--only-binary=:all:", MATPLOTLIB])
            .stdin(std::process::Stdio::null()),
        "check that pypi.org is reachable",
    )?;
    if !import() {
        bail!(
            "bench: matplotlib installed into {} but cannot be imported",
            venv.display()
        );
    }
    Ok(python)
}
