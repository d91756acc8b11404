//! The agent's own containerd: writes its config, starts Debian's `/usr/bin/containerd` with
//! root, state and socket under one directory, waits until it answers, restarts it when it
//! dies and stops it on shutdown. Running containers outlive a containerd restart (their
//! runc shims are separate processes), so a restart costs nothing but a gap in the API.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Error;

/// Debian's containerd (package `containerd`, installed by `cargo xtask setup`).
pub const DEFAULT_BINARY: &str = "/usr/bin/containerd";

/// How long a freshly started containerd may take to answer before start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Restart back-off after an unexpected exit: doubles from the first value up to the second.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Where the agent's containerd lives, or which existing one to use.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    /// The directory that holds config.toml, root/, state/, the socket, the pid file and
    /// containerd.log, e.g. `<data-dir>/containerd`. Created when missing. Unused when
    /// `existing_socket` is set.
    pub dir: PathBuf,
    /// The containerd binary to run.
    pub binary: PathBuf,
    /// Use the containerd already listening here instead of starting one (`--containerd-socket`).
    pub existing_socket: Option<PathBuf>,
}

impl ContainerdConfig {
    /// A containerd of our own under `dir`, started from [`DEFAULT_BINARY`].
    pub fn managed(dir: impl Into<PathBuf>) -> ContainerdConfig {
        ContainerdConfig {
            dir: dir.into(),
            binary: PathBuf::from(DEFAULT_BINARY),
            existing_socket: None,
        }
    }

    /// The socket the managed containerd listens on: `<dir>/containerd.sock`.
    pub fn socket(&self) -> PathBuf {
        self.existing_socket
            .clone()
            .unwrap_or_else(|| self.dir.join("containerd.sock"))
    }
}

/// A running containerd: ours (supervised) or an existing one.
pub struct Containerd {
    socket: PathBuf,
    managed: Option<Managed>,
}

struct Managed {
    shutdown: watch::Sender<bool>,
    supervisor: Option<JoinHandle<()>>,
    status: Arc<SupervisorStatus>,
    pid_file: PathBuf,
}

#[derive(Default)]
struct SupervisorStatus {
    /// The current containerd's pid; 0 while none runs.
    pid: AtomicU32,
    /// How many times containerd was restarted after it died.
    restarts: AtomicU64,
    /// The last restart failure, for [`Containerd::wait_restarted`] to report.
    last_error: Mutex<Option<String>>,
}

impl Containerd {
    /// Starts containerd as `config` says (or checks the existing socket answers) and
    /// returns once it answers on its socket.
    pub async fn start(config: &ContainerdConfig) -> Result<Containerd, Error> {
        let socket = config.socket();
        if config.existing_socket.is_some() {
            wait_until_answering(&socket, READY_TIMEOUT, None).await?;
            info!(socket = %socket.display(), "using an existing containerd");
            return Ok(Containerd { socket, managed: None });
        }
        // sun_path holds 108 bytes with the terminating NUL; containerd would only say it
        // cannot listen.
        let ttrpc_socket_len = socket.as_os_str().len() + ".ttrpc".len();
        if ttrpc_socket_len > 107 {
            return Err(Error::Containerd(format!(
                "the socket path {}.ttrpc is {ttrpc_socket_len} bytes, over the 107 a unix socket allows: use a \
                 shorter data directory",
                socket.display()
            )));
        }
        if !config.binary.exists() {
            return Err(Error::Containerd(format!(
                "{} does not exist: install containerd and runc (`cargo xtask setup`, or `apt-get install \
                 containerd runc`) or pass an existing socket",
                config.binary.display()
            )));
        }
        let dir = &config.dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config_toml(dir, &socket))
            .map_err(|e| Error::io(format!("writing {}", config_path.display()), e))?;
        let pid_file = dir.join("containerd.pid");
        stop_stale(&pid_file, &config_path).await?;

        let launcher = Launcher {
            binary: config.binary.clone(),
            config: config_path,
            log: dir.join("containerd.log"),
            socket: socket.clone(),
            pid_file: pid_file.clone(),
        };
        let child = launcher.spawn_ready().await?;
        let status = Arc::new(SupervisorStatus::default());
        status.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(launcher, child, status.clone(), shutdown_rx));
        info!(socket = %socket.display(), dir = %dir.display(), "containerd started");
        Ok(Containerd {
            socket,
            managed: Some(Managed {
                shutdown,
                supervisor: Some(supervisor),
                status,
                pid_file,
            }),
        })
    }

    /// The socket to connect [`super::Runtime`] to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pid of the containerd we run, `None` for an existing one (or between restarts).
    pub fn pid(&self) -> Option<u32> {
        let pid = self.managed.as_ref()?.status.pid.load(Ordering::SeqCst);
        (pid != 0).then_some(pid)
    }

    /// How many times our containerd died and was started again.
    pub fn restarts(&self) -> u64 {
        self.managed
            .as_ref()
            .map_or(0, |m| m.status.restarts.load(Ordering::SeqCst))
    }

    /// Waits until containerd has been restarted more than `previous` times and answers, or
    /// `timeout` passes.
    pub async fn wait_restarted(&self, previous: u64, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let Some(managed) = &self.managed else {
            return Err(Error::Containerd(
                "this containerd was not started by the agent, so it is not restarted by it".into(),
            ));
        };
        while managed.status.restarts.load(Ordering::SeqCst) <= previous {
            if Instant::now() > deadline {
                let last = managed.status.last_error.lock().map(|e| e.clone()).unwrap_or_default();
                return Err(Error::Containerd(format!(
                    "containerd was not restarted within {timeout:?} (last failure: {}); see containerd.log",
                    last.as_deref().unwrap_or("none")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_until_answering(&self.socket, deadline.saturating_duration_since(Instant::now()), None).await
    }

    /// Stops containerd if we started it (SIGTERM, SIGKILL after 10 s); running containers
    /// keep running in their shims. An existing containerd is left alone.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let Some(mut managed) = self.managed.take() else {
            return Ok(());
        };
        let _ = managed.shutdown.send(true);
        if let Some(supervisor) = managed.supervisor.take() {
            supervisor
                .await
                .map_err(|e| Error::Containerd(format!("the containerd supervisor panicked: {e}")))?;
        }
        let _ = std::fs::remove_file(&managed.pid_file);
        info!(socket = %self.socket.display(), "containerd stopped");
        Ok(())
    }
}

impl Drop for Containerd {
    /// Without [`Containerd::shutdown`] (a panic, an early return) our containerd still gets
    /// SIGTERM, so no daemon outlives the agent unnoticed; the supervisor sees the shutdown
    /// flag and does not restart it.
    fn drop(&mut self) {
        if let Some(managed) = &self.managed {
            let _ = managed.shutdown.send(true);
            let pid = managed.status.pid.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill has no memory-safety preconditions; pid is our child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        }
    }
}

/// What it takes to (re)start containerd.
struct Launcher {
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Launcher {
    /// Spawns containerd and waits until it answers on its socket.
    async fn spawn_ready(&self) -> Result<Child, Error> {
        // A socket file left by a killed containerd would make the readiness check talk to
        // nothing; containerd removes and recreates it anyway.
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let mut child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .env("PATH", search_path())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for the agent must not reach containerd
            // before the agent decides to stop it.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", self.binary.display()), e))?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(&self.pid_file, format!("{pid}\n"))
            .map_err(|e| Error::io(format!("writing {}", self.pid_file.display()), e))?;
        if let Err(e) = wait_until_answering(&self.socket, READY_TIMEOUT, Some(&mut child)).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::Containerd(format!(
                "{e}; last lines of {}:\n{}",
                self.log.display(),
                tail(&self.log)
            )));
        }
        Ok(child)
    }
}

/// Restarts containerd whenever it exits until shutdown is asked for.
async fn supervise(
    launcher: Launcher,
    mut child: Child,
    status: Arc<SupervisorStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = RESTART_BACKOFF.0;
    loop {
        tokio::select! {
            exit = child.wait() => {
                status.pid.store(0, Ordering::SeqCst);
                if *shutdown.borrow() {
                    return;
                }
                warn!(?exit, "containerd exited; restarting it (running containers keep running)");
            }
            _ = shutdown.changed() => {
                stop(&mut child).await;
                status.pid.store(0, Ordering::SeqCst);
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            match launcher.spawn_ready().await {
                Ok(new) => {
                    child = new;
                    status.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
                    status.restarts.fetch_add(1, Ordering::SeqCst);
                    info!(pid = child.id(), "containerd restarted");
                    backoff = RESTART_BACKOFF.0;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "restarting containerd failed; trying again");
                    if let Ok(mut last) = status.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    backoff = (backoff * 2).min(RESTART_BACKOFF.1);
                }
            }
        }
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions; pid is our child, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_err() {
        warn!("containerd did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

/// A containerd left running by an agent that died without stopping it holds the root's
/// lock; it is stopped so ours can start (its containers live on in their shims). Only a
/// process whose command line names our config file is touched.
async fn stop_stale(pid_file: &Path, config: &Path) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    let is_ours = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == config.as_os_str().as_encoded_bytes())
            })
            .unwrap_or(false)
    };
    if !is_ours(pid) {
        return Ok(());
    }
    warn!(pid, "stopping a containerd left running by an earlier agent");
    // SAFETY: kill has no memory-safety preconditions; the pid runs our containerd config.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while is_ours(pid) {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Polls containerd's version API until it answers. With `child`, fails early when the
/// process exits instead.
async fn wait_until_answering(socket: &Path, timeout: Duration, mut child: Option<&mut Child>) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("the socket does not exist yet");
    loop {
        if let Some(child) = child.as_deref_mut()
            && let Ok(Some(exit)) = child.try_wait()
        {
            return Err(Error::Containerd(format!("containerd exited while starting ({exit})")));
        }
        if socket.exists() {
            match containerd_client::connect(socket).await {
                Ok(channel) => {
                    let mut version = containerd_client::services::v1::version_client::VersionClient::new(channel);
                    match version.version(()).await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = format!("version call failed: {}", e.message()),
                    }
                }
                Err(e) => last = format!("connecting failed: {e}"),
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Containerd(format!(
                "containerd did not answer on {} within {timeout:?} ({last})",
                socket.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// containerd finds `containerd-shim-runc-v2` (/usr/bin) and the shim finds `runc`
/// (/usr/sbin) through PATH, which may be minimal where the agent was started.
fn search_path() -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !path.split(':').any(|p| p == dir) {
            if !path.is_empty() {
                path.push(':');
            }
            path.push_str(dir);
        }
    }
    path
}

/// The last lines of containerd's log, for start errors.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// containerd's config: everything under `dir`, the CRI plugin off (the agent is the
/// Kubernetes side), no debug or metrics listeners.
pub(crate) fn config_toml(dir: &Path, socket: &Path) -> String {
    let mut toml = String::new();
    let quote = |p: &Path| format!("{:?}", p.display().to_string());
    let _ = writeln!(
        toml,
        "# Written by the weir agent on every start; edits are overwritten."
    );
    let _ = writeln!(toml, "version = 2");
    let _ = writeln!(toml, "root = {}", quote(&dir.join("root")));
    let _ = writeln!(toml, "state = {}", quote(&dir.join("state")));
    let _ = writeln!(toml, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]");
    let _ = writeln!(toml, "\n[grpc]\n  address = {}", quote(socket));
    let _ = writeln!(
        toml,
        "\n[ttrpc]\n  address = {}",
        quote(&socket.with_extension("sock.ttrpc"))
    );
    let _ = writeln!(toml, "\n[debug]\n  address = \"\"");
    let _ = writeln!(toml, "\n[metrics]\n  address = \"\"");
    toml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_under_the_directory() {
        let toml = config_toml(
            Path::new("/var/lib/weir/containerd"),
            Path::new("/var/lib/weir/containerd/c.sock"),
        );
        assert!(toml.contains("root = \"/var/lib/weir/containerd/root\""), "{toml}");
        assert!(toml.contains("state = \"/var/lib/weir/containerd/state\""), "{toml}");
        assert!(toml.contains("address = \"/var/lib/weir/containerd/c.sock\""), "{toml}");
        assert!(
            toml.contains("address = \"/var/lib/weir/containerd/c.sock.ttrpc\""),
            "{toml}"
        );
        assert!(
            toml.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"),
            "{toml}"
        );
    }

    #[tokio::test]
    async fn a_socket_path_too_long_for_unix_sockets_is_refused_up_front() {
        let dir = PathBuf::from("/tmp").join("d".repeat(100));
        let err = Containerd::start(&ContainerdConfig::managed(&dir))
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("shorter data directory"), "{err}");
        assert!(!dir.exists(), "nothing is created");
    }

    #[test]
    fn search_path_adds_the_sbin_directories_once() {
        let path = search_path();
        assert_eq!(path.split(':').filter(|p| *p == "/usr/sbin").count(), 1, "{path}");
    }
}
