//! From per-run outcomes to the report: medians per mode and size, ratios to direct, the
//! targets, and `datapath.{json,md}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::load::LoadResult;
use crate::modes::{Mode, Programming};

/// Socket-LB and TC must keep this share of direct's connection rate at every size.
pub const RATIO_TARGET: f64 = 0.95;
/// Programming 100,000 services into the maps must take less than this.
pub const PROGRAMMING_TARGET: Duration = Duration::from_secs(1);
const PROGRAMMING_TARGET_SIZE: usize = 100_000;

/// One mode at one size in one run.
#[derive(Debug)]
pub enum Outcome {
    Measured {
        programming: Option<Programming>,
        load: LoadResult,
    },
    Failed(String),
    Unavailable(String),
}

/// Every outcome of the benchmark, by size and mode, in run order.
#[derive(Default)]
pub struct Outcomes {
    cells: BTreeMap<(usize, Mode), Vec<Outcome>>,
}

impl Outcomes {
    pub fn push(&mut self, size: usize, mode: Mode, outcome: Outcome) {
        self.cells.entry((size, mode)).or_default().push(outcome);
    }

    pub fn last(&self, size: usize, mode: Mode) -> Option<&Outcome> {
        self.cells.get(&(size, mode))?.last()
    }

    /// `mode`'s connection rate over direct's, in the latest run at `size`.
    pub fn latest_ratio(&self, size: usize, mode: Mode) -> Option<f64> {
        let rate = |mode| match self.cells.get(&(size, mode))?.last()? {
            Outcome::Measured { load, .. } => Some(load.conns_per_s),
            _ => None,
        };
        Some(rate(mode)? / rate(Mode::Direct)?)
    }
}

/// The medians of one mode at one size.
struct Summary {
    mode: Mode,
    size: usize,
    /// `None`: nothing measured; the reason is in `reason`.
    conns_per_s: Option<f64>,
    ratio: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    programming: Option<Duration>,
    programming_cpu: Option<Duration>,
    failed_connections: u64,
    measured_runs: usize,
    reason: Option<String>,
}

pub struct Params {
    pub sizes: Vec<usize>,
    pub modes: Vec<Mode>,
    pub runs: u32,
    pub duration_ms: u64,
}

pub struct Report {
    json: Value,
    markdown: String,
    /// One line per target: met or not, with the numbers.
    pub verdicts: Vec<String>,
}

impl Report {
    pub fn new(params: &Params, outcomes: &Outcomes) -> Report {
        let summaries: Vec<Summary> = params
            .sizes
            .iter()
            .flat_map(|&size| params.modes.iter().map(move |&mode| (size, mode)))
            .map(|(size, mode)| summarize(outcomes, size, mode))
            .collect();
        let targets = targets(params, &summaries);
        let verdicts = targets.iter().map(|t| t.line()).collect();
        Report {
            json: to_json(params, outcomes, &summaries, &targets),
            markdown: to_markdown(params, &summaries, &targets),
            verdicts,
        }
    }

    pub fn markdown(&self) -> &str {
        &self.markdown
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let json = out.join("datapath.json");
        let text = serde_json::to_string_pretty(&self.json).context("encoding the report")?;
        std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
        let md = out.join("datapath.md");
        std::fs::write(&md, &self.markdown).with_context(|| format!("writing {}", md.display()))?;
        Ok(())
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn summarize(outcomes: &Outcomes, size: usize, mode: Mode) -> Summary {
    let runs: &[Outcome] = outcomes.cells.get(&(size, mode)).map(Vec::as_slice).unwrap_or_default();
    let direct: &[Outcome] = outcomes
        .cells
        .get(&(size, Mode::Direct))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let loads: Vec<&LoadResult> = runs
        .iter()
        .filter_map(|o| match o {
            Outcome::Measured { load, .. } => Some(load),
            _ => None,
        })
        .collect();
    // Each run's rate over the same run's direct rate: machine noise that hits a whole run
    // cancels out.
    let ratios: Vec<f64> = runs
        .iter()
        .zip(direct)
        .filter_map(|pair| match pair {
            (Outcome::Measured { load, .. }, Outcome::Measured { load: base, .. }) if base.conns_per_s > 0.0 => {
                Some(load.conns_per_s / base.conns_per_s)
            }
            _ => None,
        })
        .collect();
    let programming: Vec<Programming> = runs
        .iter()
        .filter_map(|o| match o {
            Outcome::Measured { programming, .. } => *programming,
            _ => None,
        })
        .collect();
    let programming_median = |part: fn(&Programming) -> Duration| {
        median(programming.iter().map(|p| part(p).as_secs_f64()).collect()).map(Duration::from_secs_f64)
    };
    let reason = if loads.is_empty() {
        runs.iter()
            .find_map(|o| match o {
                Outcome::Unavailable(reason) => Some(reason.clone()),
                Outcome::Failed(error) => Some(format!("failed: {error}")),
                Outcome::Measured { .. } => None,
            })
            .or_else(|| Some("not run".to_owned()))
    } else {
        None
    };
    Summary {
        mode,
        size,
        conns_per_s: median(loads.iter().map(|l| l.conns_per_s).collect()),
        ratio: median(ratios),
        p50_us: median(loads.iter().map(|l| l.p50_us).collect()),
        p99_us: median(loads.iter().map(|l| l.p99_us).collect()),
        programming: programming_median(|p| p.wall),
        programming_cpu: programming_median(|p| p.cpu),
        failed_connections: loads.iter().map(|l| l.failures).sum(),
        measured_runs: loads.len(),
        reason,
    }
}

struct Target {
    name: String,
    /// `None`: not measured.
    met: Option<bool>,
    detail: String,
}

impl Target {
    fn line(&self) -> String {
        let verdict = match self.met {
            Some(true) => "MET",
            Some(false) => "NOT MET",
            None => "NOT MEASURED",
        };
        format!("{verdict}: {} ({})", self.name, self.detail)
    }
}

fn targets(params: &Params, summaries: &[Summary]) -> Vec<Target> {
    let mut targets = Vec::new();
    for mode in [Mode::SocketLb, Mode::Tc] {
        if !params.modes.contains(&mode) {
            continue;
        }
        let rows: Vec<&Summary> = summaries.iter().filter(|s| s.mode == mode).collect();
        let parts: Vec<String> = rows
            .iter()
            .map(|s| match s.ratio {
                Some(r) => format!("{}: {r:.2}x", thousands(s.size as f64)),
                None => format!(
                    "{}: {}",
                    thousands(s.size as f64),
                    s.reason.as_deref().unwrap_or("no direct baseline")
                ),
            })
            .collect();
        let met = if rows.iter().all(|s| s.ratio.is_some()) {
            Some(rows.iter().all(|s| s.ratio.is_some_and(|r| r >= RATIO_TARGET)))
        } else {
            None
        };
        targets.push(Target {
            name: format!("{mode} >= {RATIO_TARGET:.2}x of direct at every size"),
            met,
            detail: parts.join(", "),
        });
    }
    let map_modes: Vec<&Summary> = summaries
        .iter()
        .filter(|s| s.size == PROGRAMMING_TARGET_SIZE && matches!(s.mode, Mode::SocketLb | Mode::Tc | Mode::Xdp))
        .collect();
    let name = format!(
        "{} services programmed into the maps in < {} s",
        thousands(PROGRAMMING_TARGET_SIZE as f64),
        PROGRAMMING_TARGET.as_secs()
    );
    if map_modes.is_empty() {
        targets.push(Target {
            name,
            met: None,
            detail: format!("size not run; add {PROGRAMMING_TARGET_SIZE} to --sizes"),
        });
    } else {
        let met = if map_modes.iter().all(|s| s.programming.is_some()) {
            Some(
                map_modes
                    .iter()
                    .all(|s| s.programming.is_some_and(|p| p < PROGRAMMING_TARGET)),
            )
        } else {
            None
        };
        let detail = map_modes
            .iter()
            .map(|s| match s.programming {
                Some(p) => format!("{}: {}", s.mode, duration_text(p)),
                None => format!("{}: {}", s.mode, s.reason.as_deref().unwrap_or("not measured")),
            })
            .collect::<Vec<_>>()
            .join(", ");
        targets.push(Target { name, met, detail });
    }
    targets
}

/// `12345.6` → `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

pub fn duration_text(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn to_json(params: &Params, outcomes: &Outcomes, summaries: &[Summary], targets: &[Target]) -> Value {
    let results: Vec<Value> = summaries
        .iter()
        .map(|s| {
            let runs: Vec<Value> = outcomes
                .cells
                .get(&(s.size, s.mode))
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|o| match o {
                    Outcome::Measured { programming, load } => {
                        let mut run = load.to_json();
                        run["status"] = json!("ok");
                        run["programming_ms"] = json!(programming.map(|p| p.wall.as_secs_f64() * 1000.0));
                        run["programming_cpu_ms"] = json!(programming.map(|p| p.cpu.as_secs_f64() * 1000.0));
                        run
                    }
                    Outcome::Failed(error) => json!({"status": "failed", "error": error}),
                    Outcome::Unavailable(reason) => json!({"status": "unavailable", "error": reason}),
                })
                .collect();
            json!({
                "mode": s.mode.name(),
                "services": s.size,
                "status": match &s.reason {
                    None => "ok".to_owned(),
                    Some(reason) => reason.clone(),
                },
                "conns_per_s": s.conns_per_s,
                "ratio_vs_direct": s.ratio,
                "p50_us": s.p50_us,
                "p99_us": s.p99_us,
                "programming_ms": s.programming.map(|p| p.as_secs_f64() * 1000.0),
                "programming_cpu_ms": s.programming_cpu.map(|p| p.as_secs_f64() * 1000.0),
                "failed_connections": s.failed_connections,
                "measured_runs": s.measured_runs,
                "runs": runs,
            })
        })
        .collect();
    json!({
        "area": "datapath",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel_release(),
        "params": {
            "sizes": params.sizes,
            "modes": params.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "runs": params.runs,
            "duration_ms": params.duration_ms,
        },
        "measured_service": "index N/2 of N services: the middle rule of KUBE-SERVICES, the middle IPVS service",
        "ratio_target": RATIO_TARGET,
        "programming_target_ms": PROGRAMMING_TARGET.as_secs_f64() * 1000.0,
        "results": results,
        "targets": targets.iter().map(|t| json!({"name": t.name, "met": t.met, "detail": t.detail})).collect::<Vec<_>>(),
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn to_markdown(params: &Params, summaries: &[Summary], targets: &[Target]) -> String {
    let mut md = String::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let _ = writeln!(md, "## Datapath benchmark\n");
    let _ = writeln!(
        md,
        "Linux {}, {cpus} CPUs. Median of {} runs. Per mode, size and run: {} ms of sequential TCP connections \
         (connect, request, reply, close with RST) from a client namespace through a routing node namespace to a \
         backend namespace, in slices of about 250 ms with the modes taking turns, so machine noise hits all alike; \
         conns/s is the median of the slices' rates. \
         Each size N is N-1 filler services plus the measured one, which is in the middle (the middle rule of \
         KUBE-SERVICES). Ratios are per run against the same run's direct rate, then the median.\n",
        kernel_release(),
        params.runs,
        thousands(params.duration_ms as f64)
    );
    let by = |mode: Mode, size: usize| summaries.iter().find(|s| s.mode == mode && s.size == size);
    let header = |md: &mut String, first: &str| {
        let sizes: Vec<String> = params.sizes.iter().map(|s| thousands(*s as f64)).collect();
        let _ = writeln!(md, "| {first} | {} |", sizes.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(params.sizes.len()));
    };

    let _ = writeln!(md, "### New connections/s as a ratio of direct (services programmed)\n");
    header(&mut md, "mode");
    for &mode in &params.modes {
        let cells: Vec<String> = params
            .sizes
            .iter()
            .map(|&size| match by(mode, size) {
                Some(Summary {
                    ratio: Some(r),
                    conns_per_s: Some(c),
                    ..
                }) => format!("{r:.2}x ({}/s)", thousands(*c)),
                Some(Summary { reason: Some(r), .. }) => r.clone(),
                _ => "—".to_owned(),
            })
            .collect();
        let _ = writeln!(md, "| {mode} | {} |", cells.join(" | "));
    }

    let _ = writeln!(
        md,
        "\n### Programming time of N services, from empty\n\nMaps: one `Datapath::reconcile`. \
         iptables: one `iptables-*-restore` of the nat table (process start included). \
         IPVS: one `ipvsadm --restore` (the VIPs on kube-ipvs0 are added before, untimed). Wall time, \
         and in brackets the CPU time spent (the writing thread's, or the restore process's).\n"
    );
    header(&mut md, "mode");
    for &mode in params.modes.iter().filter(|m| **m != Mode::Direct) {
        let cells: Vec<String> = params
            .sizes
            .iter()
            .map(|&size| match by(mode, size) {
                Some(Summary {
                    programming: Some(p),
                    programming_cpu: Some(cpu),
                    ..
                }) => format!("{} (CPU {})", duration_text(*p), duration_text(*cpu)),
                Some(Summary { reason: Some(r), .. }) => r.clone(),
                _ => "—".to_owned(),
            })
            .collect();
        let _ = writeln!(md, "| {mode} | {} |", cells.join(" | "));
    }

    let _ = writeln!(md, "\n### All medians\n");
    let _ = writeln!(
        md,
        "| mode | services | conns/s | vs direct | p50 µs | p99 µs | programming | failed conns | runs |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in summaries {
        let number = |v: Option<f64>| v.map_or("—".to_owned(), thousands);
        let first = match (&s.reason, s.conns_per_s) {
            (Some(reason), _) => reason.clone(),
            (None, c) => number(c),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.mode,
            thousands(s.size as f64),
            first,
            s.ratio.map_or("—".to_owned(), |r| format!("{r:.2}x")),
            number(s.p50_us),
            number(s.p99_us),
            s.programming.map_or("—".to_owned(), duration_text),
            s.failed_connections,
            s.measured_runs,
        );
    }

    let _ = writeln!(md, "\n### Targets\n");
    for target in targets {
        let _ = writeln!(md, "- {}", target.line());
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(conns_per_s: f64) -> LoadResult {
        LoadResult {
            connections: 1,
            failures: 0,
            conns_per_s,
            overall_conns_per_s: conns_per_s,
            p50_us: 10.0,
            p99_us: 20.0,
            first_error: None,
        }
    }

    #[test]
    fn ratios_are_per_run_then_median() {
        let mut outcomes = Outcomes::default();
        for (direct, tc) in [(1000.0, 990.0), (2000.0, 1000.0), (1000.0, 960.0)] {
            outcomes.push(
                1,
                Mode::Direct,
                Outcome::Measured {
                    programming: None,
                    load: load(direct),
                },
            );
            let programming = Some(Programming {
                wall: Duration::from_millis(2),
                cpu: Duration::from_millis(1),
            });
            outcomes.push(
                1,
                Mode::Tc,
                Outcome::Measured {
                    programming,
                    load: load(tc),
                },
            );
        }
        let s = summarize(&outcomes, 1, Mode::Tc);
        assert_eq!(s.ratio, Some(0.96));
        assert_eq!(s.conns_per_s, Some(990.0));
        assert_eq!(s.programming, Some(Duration::from_millis(2)));
        assert_eq!(s.programming_cpu, Some(Duration::from_millis(1)));
    }

    #[test]
    fn unavailable_mode_is_reported_with_its_reason() {
        let mut outcomes = Outcomes::default();
        let reason = "unavailable: kernel built without CONFIG_IP_VS (IP Virtual Server)";
        outcomes.push(10, Mode::Ipvs, Outcome::Unavailable(reason.to_owned()));
        let params = Params {
            sizes: vec![10],
            modes: vec![Mode::Direct, Mode::Ipvs],
            runs: 1,
            duration_ms: 100,
        };
        let report = Report::new(&params, &outcomes);
        assert!(
            report.markdown().contains(&format!("| ipvs | 10 | {reason} |")),
            "{}",
            report.markdown()
        );
        assert_eq!(report.json["results"][1]["status"], reason);
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1.0), "1");
        assert_eq!(thousands(100_000.0), "100,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
    }
}
