//! A throwaway single-member etcd for tests and benchmarks: starts `/usr/bin/etcd` on free
//! loopback ports in its own temp dir, and kills it (by PID) and removes the dir on drop.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// Where the Debian package `etcd-server` installs etcd; `WEIR_ETCD` overrides it.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts, since another process may take a port between our probe and etcd's bind.
const START_ATTEMPTS: usize = 3;

static STARTED: AtomicU32 = AtomicU32::new(0);

/// A running etcd. `endpoint` is `127.0.0.1:<client port>`, as `EtcdStore::connect` takes it.
pub struct EtcdProcess {
    pub endpoint: String,
    child: Child,
    dir: PathBuf,
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> anyhow::Result<Self> {
        let binary = std::env::var_os("WEIR_ETCD").map_or_else(|| PathBuf::from(ETCD_BINARY), PathBuf::from);
        if !binary.is_file() {
            bail!(
                "etcd binary not found at {}: run `cargo xtask setup` to install it (Debian package etcd-server)",
                binary.display()
            );
        }
        let mut failure = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binary) {
                Ok(process) => return Ok(process),
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.expect("at least one attempt"))
    }

    /// The etcd data and log directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn start_once(binary: &Path) -> anyhow::Result<Self> {
        let [client_port, peer_port] = free_ports()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let name = format!(
            "weir-etcd-{}-{}-{nanos}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = File::create(dir.join("etcd.log")).context("creating etcd.log")?;

        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let spawned = Command::new(binary)
            .arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg("--initial-cluster")
            .arg(format!("{name}={peer_url}"))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", &name])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log handle")?)
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error).with_context(|| format!("starting {}", binary.display()));
            }
        };
        // From here on, drop cleans up whatever happens.
        let mut process = Self {
            endpoint: format!("127.0.0.1:{client_port}"),
            child,
            dir,
        };
        process.wait_ready(SocketAddr::from(([127, 0, 0, 1], client_port)))?;
        Ok(process)
    }

    fn wait_ready(&mut self, client: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling etcd")? {
                bail!("etcd exited with {status} before it was ready:\n{}", self.log_tail());
            }
            if is_healthy(client) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two distinct free loopback ports (both held while probing, so they differ).
fn free_ports() -> anyhow::Result<[u16; 2]> {
    let first = TcpListener::bind("127.0.0.1:0").context("probing a free port")?;
    let second = TcpListener::bind("127.0.0.1:0").context("probing a free port")?;
    Ok([first.local_addr()?.port(), second.local_addr()?.port()])
}

fn is_healthy(client: SocketAddr) -> bool {
    let probe = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&client, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    probe().is_ok_and(|response| response.contains("\"health\":\"true\""))
}
