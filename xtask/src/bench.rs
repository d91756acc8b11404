//! `cargo xtask bench <area>`: builds in release mode, runs the benchmark binary of the area
//! against every peer that runs here, and writes `target/bench/<area>.{json,md,png}`.
//! The plot is drawn by matplotlib, pip-installed into `target/tools/bench-python/` on first use.

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
        text = "failed" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    if m.get("target") is not None:
        ax.axhline(m["target"], color="red", linestyle="--", linewidth=1, label=f"target {m['target_text']}")
        ax.legend(loc="lower right", fontsize=8)
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

pub fn run(ws: &Workspace, area: Area, args: &[String]) -> Result<()> {
    match area {
        Area::Api => api(ws, args),
    }
}

fn api(ws: &Workspace, args: &[String]) -> Result<()> {
    status("bench api: building weir in release mode (cargo build --release -p weir)");
    command::run(
        "bench api: build weir",
        ws.cargo().args(["build", "--release", "-p", "weir"]),
        "fix the build errors above",
    )?;
    status("bench api: building the benchmark (cargo build --release -p weir-tests --bin bench_api)");
    command::run(
        "bench api: build bench_api",
        ws.cargo()
            .args(["build", "--release", "-p", "weir-tests", "--bin", "bench_api"]),
        "fix the build errors above",
    )?;
    let etcd = setup::etcd();
    if !etcd.is_file() && !args.iter().any(|a| a == "--stores") {
        bail!(
            "bench api: etcd not found at {}; run `cargo xtask setup` (Debian package etcd-server), \
             or pass `-- --stores embedded`",
            etcd.display()
        );
    }

    let release = ws.target.join("release");
    let out = ws.target.join("bench");
    status(format!(
        "bench api: {} --weir {} --out {} {}",
        release.join("bench_api").display(),
        release.join("weir").display(),
        out.display(),
        args.join(" ")
    ));
    let json = out.join("api.json");
    // A stale result must not be plotted as this run's.
    let _ = std::fs::remove_file(&json);
    let bench = command::run(
        "bench api: run",
        Command::new(release.join("bench_api"))
            .arg("--weir")
            .arg(release.join("weir"))
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("WEIR_ETCD_BINARY", &etcd),
        "see the failing phase and the server log above",
    );
    // Phases that failed are in the JSON as nulls; plot what was measured, then report.
    if json.is_file() {
        let png = out.join("api.png");
        plot(ws, &json, &png)?;
        status(format!(
            "bench api: wrote {}, {} and {}",
            json.display(),
            out.join("api.md").display(),
            png.display()
        ));
    }
    bench
}

/// Renders `json` into `png` with the PLOT script.
fn plot(ws: &Workspace, json: &Path, png: &Path) -> Result<()> {
    let site = plot_packages(ws)?;
    command::run(
        "bench: plot",
        Command::new("python3")
            .arg("-c")
            .arg(PLOT)
            .arg(json)
            .arg(png)
            .env("PYTHONPATH", &site),
        "the numbers are in the JSON and Markdown files; delete target/tools/bench-python/ and run again",
    )
}

/// `target/tools/bench-python`, a pip `--target` dir with matplotlib, installed on first use.
/// A target dir instead of a venv: Debian 12 needs the extra python3-venv package for venvs,
/// and pip's PEP 668 guard does not apply to `--target`.
fn plot_packages(ws: &Workspace) -> Result<PathBuf> {
    let site = ws.tools().join("bench-python");
    let import = || {
        command::succeeds(
            Command::new("python3")
                .args(["-c", "import matplotlib"])
                .env("PYTHONPATH", &site),
        )
    };
    if import() {
        status(format!("bench: matplotlib: present in {}", site.display()));
        return Ok(site);
    }
    status(format!(
        "bench: matplotlib: pip install {MATPLOTLIB} into {}",
        site.display()
    ));
    let _ = std::fs::remove_dir_all(&site);
    std::fs::create_dir_all(&site).with_context(|| format!("creating {}", site.display()))?;
    command::run(
        "bench: install matplotlib",
        Command::new("python3")
            .args(["-m", "pip", "install", "--no-input", "--progress-bar", "off"])
            .args(["--disable-pip-version-check", "--only-binary=:all:", "--target"])
            .arg(&site)
            .arg(MATPLOTLIB)
            .stdin(std::process::Stdio::null()),
        "check that pypi.org is reachable and python3 -m pip works (`cargo xtask setup` installs python3-pip)",
    )?;
    if !import() {
        bail!(
            "bench: matplotlib installed into {} but cannot be imported",
            site.display()
        );
    }
    Ok(site)
}
