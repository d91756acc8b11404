//! Shared by the benchmark binaries (`bench_api`, `bench_scheduler`): the server under test,
//! process measurements from /proc, and number formatting for the tables.

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir_control_plane::store::etcd_process::EtcdProcess;

/// How long the server gets to answer `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one request (except watches, which are bounded per read).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Etcd,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Etcd => "etcd",
        }
    }
}

/// One `weir server` (and its etcd) in a throwaway data dir; Drop kills it by PID and removes
/// the dir. Fields drop in order: the server is killed in `drop`, then etcd, then the dir.
pub struct BenchServer {
    child: Option<Child>,
    pub port: u16,
    /// The etcd process id, found in /proc by its data dir, to measure its CPU.
    pub etcd_pid: Option<u32>,
    pub etcd: Option<EtcdProcess>,
    pub dir: tempfile::TempDir,
}

impl BenchServer {
    /// Starts `weir server` with `extra_args` and waits until it is ready.
    pub async fn start(weir: &Path, store: StoreKind, extra_args: &[&str]) -> Result<BenchServer> {
        let etcd = match store {
            StoreKind::Embedded => None,
            StoreKind::Etcd => Some(EtcdProcess::start().context("starting etcd (Debian package etcd-server)")?),
        };
        let dir = tempfile::Builder::new()
            .prefix("weir-bench-")
            .tempdir()
            .context("creating the server's data dir")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let mut cmd = Command::new(weir);
        cmd.arg("server")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--secure-port")
            .arg(port.to_string())
            .arg("--bind-address")
            .arg("127.0.0.1")
            .args(extra_args);
        if let Some(etcd) = &etcd {
            cmd.arg("--datastore").arg(format!("etcd://{}", etcd.endpoint));
        }
        cmd.stdin(Stdio::null())
            .stdout(File::create(dir.path().join("weir.stdout"))?)
            .stderr(File::create(dir.path().join("weir.stderr"))?);
        let child = cmd.spawn().with_context(|| format!("spawning {}", weir.display()))?;
        let etcd_pid = etcd
            .as_ref()
            .and_then(|e| find_pid_with_arg(&e.dir().to_string_lossy()));
        let mut server = BenchServer {
            child: Some(child),
            port,
            etcd_pid,
            etcd,
            dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The admin kubeconfig the server wrote into its data dir.
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut problem = String::from("admin.token / pki/ca.crt not written yet");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(exit)) = child.try_wait()
            {
                self.child = None;
                bail!("weir server exited early with {exit}\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!(
                    "weir server not ready within {READY_TIMEOUT:?} ({problem})\n{}",
                    self.logs()
                );
            }
            if self.dir.path().join("admin.token").exists() && self.dir.path().join("pki/ca.crt").exists() {
                match self.readyz().await {
                    Ok(()) => return Ok(()),
                    Err(e) => problem = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn readyz(&self) -> Result<()> {
        let response = self
            .client(Some(REQUEST_TIMEOUT))?
            .get(self.url("/readyz"))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::OK {
            bail!("GET /readyz answered {}", response.status());
        }
        Ok(())
    }

    /// An HTTPS client (its own connection pool, so its own HTTP/2 connection) that trusts the
    /// cluster CA and sends the admin bearer token. `timeout` bounds each whole request; watch
    /// clients pass `None` and bound every read instead.
    pub fn client(&self, timeout: Option<Duration>) -> Result<reqwest::Client> {
        let ca_path = self.dir.path().join("pki/ca.crt");
        let ca = std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
        let token_path = self.dir.path().join("admin.token");
        let token =
            std::fs::read_to_string(&token_path).with_context(|| format!("reading {}", token_path.display()))?;
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
        auth.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).context("parsing pki/ca.crt")?)
            .tls_built_in_root_certs(false)
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10));
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        Ok(builder.build()?)
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["weir.stdout", "weir.stderr"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!("----- {name} (last {} lines) -----\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Resident memory of the server process, from /proc (KiB).
    pub fn rss_kib(&self) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// CPU time (user + system) the server process used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.pid().to_string())
    }
}

/// The process whose command line has an argument containing `needle`.
pub fn find_pid_with_arg(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            .then_some(pid)
    })
}

/// The 1-minute load average, to tell a busy machine from a slow server.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) of a process (`self` for this one) so far, from /proc.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux we run on.
    Some((utime + stime) / 100.0)
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// `12345.6` with 0 decimals → `12,346`.
pub fn format_number(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// A benchmark's command line as `--flag value` pairs, in order; `-h`/`--help` prints `usage`
/// and exits.
pub fn flag_pairs(usage: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{usage}"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}

/// `value` of `flag` as a positive number.
pub fn positive(flag: &str, value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| anyhow::anyhow!("{flag} needs a positive number, got {value:?}"))
}

/// The body of a benchmark binary's `main`: a bad command line exits 2, a failed run 1,
/// Ctrl-C 130. On Ctrl-C the run's future is dropped, so its guards stop the servers it
/// started (by PID) and remove their data dirs before the exit.
pub async fn run_main<A>(name: &str, args: Result<A>, run: impl AsyncFnOnce(&A) -> Result<()>) -> ! {
    let args = match args {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::exit(2);
        }
    };
    let code = tokio::select! {
        result = run(&args) => match result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{name}: {e:#}");
                1
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("{name}: interrupted; servers stopped");
            130
        }
    };
    std::process::exit(code);
}
