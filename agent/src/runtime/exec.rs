//! Running another process in a running container (`kubectl exec`, exec probes), as `ctr
//! tasks exec` and CRI's ExecSync do: the process spec is the container's own process (env,
//! working directory, user, capabilities) with new arguments; its stdio are FIFOs in a fresh
//! temporary directory that the shim opens (containerd's `cio` does the same), and it is
//! deleted, with its FIFOs, when the handle is dropped.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, GetContainerRequest, KillRequest, ResizePtyRequest,
    StartRequest, WaitRequest,
};
use containerd_client::tonic::Code;
use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;
use tracing::debug;

use super::{Error, Runtime};

/// The type URL containerd registers OCI process specs under (`typeurl` of `specs.Process`).
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// What to run in the container.
#[derive(Clone, Debug, Default)]
pub struct ExecRequest {
    /// The command and its arguments (the image's entrypoint does not apply).
    pub args: Vec<String>,
    /// Run on a pseudo-terminal: stdout only (stderr goes to the same terminal).
    pub tty: bool,
    /// Give the process a stdin ([`ExecProcess::stdin`]); without it, it reads /dev/null.
    pub stdin: bool,
    /// Extra environment (`NAME=value`), after the container's own.
    pub env: Vec<String>,
}

/// A process started by [`Runtime::exec`]. Take its streams, then [`ExecProcess::wait`] for
/// it; dropping the handle kills a process still running and deletes it and its FIFOs.
pub struct ExecProcess {
    runtime: Runtime,
    container_id: String,
    exec_id: String,
    /// Its stdin, until taken.
    pub stdin: Option<pipe::Sender>,
    /// Its stdout (with a tty: the terminal's output), until taken.
    pub stdout: Option<pipe::Receiver>,
    /// Its stderr (none with a tty), until taken.
    pub stderr: Option<pipe::Receiver>,
    fifo_dir: Option<tempfile::TempDir>,
    deleted: bool,
}

static NEXT_EXEC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn mkfifo(path: &Path) -> Result<(), Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidSpec(format!("FIFO path {} contains a NUL byte", path.display())))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(Error::io(
            format!("creating the FIFO {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Opens the read end of an output FIFO. A non-blocking open would read end-of-file until the
/// shim opens the write end, so this opens blocking on a thread: it returns once the shim has
/// opened it (when the process starts). [`unblock`] releases it if the process never starts.
fn open_output(path: PathBuf) -> tokio::task::JoinHandle<std::io::Result<pipe::Receiver>> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new().read(true).open(&path)?;
        // `from_file` sets O_NONBLOCK and registers it with the reactor; needs a runtime context,
        // which spawn_blocking threads have.
        pipe::Receiver::from_file(file)
    })
}

/// Opens (and closes) the write end of `path` without blocking, so that a thread blocked in
/// [`open_output`] returns.
fn unblock(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

impl Runtime {
    /// Starts `request` in the running container `container_id`.
    pub async fn exec(&self, container_id: &str, request: &ExecRequest) -> Result<ExecProcess, Error> {
        if request.args.is_empty() {
            return Err(Error::InvalidSpec(
                "exec needs a command: give at least one argument".into(),
            ));
        }
        let container = ContainersClient::new(self.channel())
            .get(self.request(GetContainerRequest {
                id: container_id.to_string(),
            }))
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => Error::NotFound(container_id.to_string()),
                _ => Error::rpc("getting the container record")(status),
            })?
            .into_inner()
            .container
            .ok_or_else(|| Error::NotFound(container_id.to_string()))?;
        let spec: serde_json::Value = container
            .spec
            .as_ref()
            .map(|any| serde_json::from_slice(&any.value))
            .transpose()
            .map_err(|e| Error::InvalidSpec(format!("container {container_id}: its runtime spec is not JSON: {e}")))?
            .unwrap_or_default();
        let mut process = spec.get("process").cloned().unwrap_or_else(|| serde_json::json!({}));
        process["args"] = serde_json::json!(request.args);
        process["terminal"] = serde_json::json!(request.tty);
        if !request.env.is_empty() {
            let mut env: Vec<serde_json::Value> = process["env"].as_array().cloned().unwrap_or_default();
            env.extend(request.env.iter().map(|e| serde_json::json!(e)));
            process["env"] = serde_json::json!(env);
        }
        if request.tty && process.get("consoleSize").is_none() {
            process["consoleSize"] = serde_json::json!({"height": 24, "width": 80});
        }
        let process = serde_json::to_vec(&process)
            .map_err(|e| Error::InvalidSpec(format!("serialising the exec process spec: {e}")))?;

        let exec_id = format!(
            "exec-{}-{}",
            std::process::id(),
            NEXT_EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let fifo_dir = tempfile::Builder::new()
            .prefix("weir-exec-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for the exec FIFOs", e))?;
        let path = |name: &str| fifo_dir.path().join(format!("{exec_id}-{name}"));
        let (stdin_path, stdout_path, stderr_path) = (path("stdin"), path("stdout"), path("stderr"));
        let mut stdin = None;
        if request.stdin {
            mkfifo(&stdin_path)?;
            // Read-write keeps the open from failing (ENXIO) before the shim opens its end;
            // the shim sees end-of-file once this, the only writer, is dropped.
            stdin = Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&stdin_path)
                    .map_err(|e| Error::io(format!("opening {}", stdin_path.display()), e))?,
            );
        }
        mkfifo(&stdout_path)?;
        let stdout_open = open_output(stdout_path.to_path_buf());
        let stderr_open = if request.tty {
            None
        } else {
            mkfifo(&stderr_path)?;
            Some(open_output(stderr_path.to_path_buf()))
        };
        let uri = |p: &Path| p.display().to_string();
        let mut handle = ExecProcess {
            runtime: self.clone(),
            container_id: container_id.to_string(),
            exec_id: exec_id.clone(),
            stdin,
            stdout: None,
            stderr: None,
            fifo_dir: None,
            deleted: true,
        };
        let started = async {
            let mut tasks = TasksClient::new(self.channel());
            tasks
                .exec(self.request(ExecProcessRequest {
                    container_id: container_id.to_string(),
                    stdin: if request.stdin { uri(&stdin_path) } else { String::new() },
                    stdout: uri(&stdout_path),
                    stderr: if request.tty { String::new() } else { uri(&stderr_path) },
                    terminal: request.tty,
                    spec: Some(prost_types::Any {
                        type_url: PROCESS_TYPE_URL.into(),
                        value: process,
                    }),
                    exec_id: exec_id.clone(),
                }))
                .await
                .map_err(|status| match status.code() {
                    Code::NotFound | Code::FailedPrecondition => Error::Containerd(format!(
                        "cannot exec in container {container_id}: it is not running ({})",
                        status.message()
                    )),
                    _ => Error::rpc("creating the exec process")(status),
                })?;
            handle.deleted = false;
            tasks
                .start(self.request(StartRequest {
                    container_id: container_id.to_string(),
                    exec_id: exec_id.clone(),
                }))
                .await
                .map_err(|status| {
                    let mut e = Error::rpc("starting the exec process")(status);
                    if let Error::Rpc { message, .. } = &mut e
                        && (message.contains("executable file not found") || message.contains("no such file"))
                    {
                        *message = format!("{message} (the command does not exist in the container's image)");
                    }
                    e
                })?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = started {
            unblock(&stdout_path);
            unblock(&stderr_path);
            let _ = stdout_open.await;
            if let Some(open) = stderr_open {
                let _ = open.await;
            }
            handle.fifo_dir = Some(fifo_dir);
            handle.cleanup().await;
            return Err(e);
        }
        let opened = |joined: Result<std::io::Result<pipe::Receiver>, tokio::task::JoinError>, path: &Path| {
            joined
                .map_err(|e| Error::io(format!("opening {}", path.display()), std::io::Error::other(e)))?
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        };
        handle.stdout = Some(opened(stdout_open.await, &stdout_path)?);
        if let Some(open) = stderr_open {
            handle.stderr = Some(opened(open.await, &stderr_path)?);
        }
        handle.fifo_dir = Some(fifo_dir);
        debug!(container = container_id, exec = %exec_id, args = ?request.args, "exec started");
        Ok(handle)
    }

    /// Runs `args` in the container and collects its stdout and stderr (interleaved as they
    /// arrive, at most 16 MiB) and exit code, as CRI's ExecSync does for exec probes. After
    /// `timeout` the process is killed and this fails.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>), Error> {
        const LIMIT: usize = 16 << 20;
        let mut process = self
            .exec(
                container_id,
                &ExecRequest {
                    args: args.to_vec(),
                    ..Default::default()
                },
            )
            .await?;
        let stdout = process.stdout.take();
        let stderr = process.stderr.take();
        let run = async {
            let output = std::sync::Mutex::new(Vec::new());
            let collect = |reader: Option<pipe::Receiver>| {
                let output = &output;
                async move {
                    let Some(mut reader) = reader else { return };
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = reader.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
                        let room = LIMIT.saturating_sub(out.len());
                        out.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            };
            let (_, _, code) = tokio::join!(collect(stdout), collect(stderr), process.wait());
            Ok::<_, Error>((code?, output.into_inner().unwrap_or_else(|e| e.into_inner())))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => {
                process.cleanup().await;
                result
            }
            Err(_) => {
                process.cleanup().await;
                Err(Error::Containerd(format!(
                    "exec {args:?} in container {container_id} did not finish within {timeout:?}; it was killed"
                )))
            }
        }
    }
}

impl ExecProcess {
    /// Waits for the process to exit; its exit code (128 + n when killed by signal n).
    pub async fn wait(&self) -> Result<i32, Error> {
        let response = TasksClient::new(self.runtime.channel())
            .wait(self.runtime.request(WaitRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            }))
            .await
            .map_err(Error::rpc("waiting for the exec process"))?
            .into_inner();
        Ok(response.exit_status as i32)
    }

    /// A handle that resizes the terminal and closes stdin, for a task other than the one
    /// holding the process.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            runtime: self.runtime.clone(),
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        }
    }

    /// Closes its stdin: drops our end, and tells the shim (which holds a writer of the FIFO
    /// itself) to close it too, so the process reads end-of-file.
    pub async fn close_stdin(&mut self) -> Result<(), Error> {
        self.stdin = None;
        self.control().close_stdin().await
    }
}

/// Controls of an [`ExecProcess`] usable from another task.
#[derive(Clone)]
pub struct ExecControl {
    runtime: Runtime,
    container_id: String,
    exec_id: String,
}

impl ExecControl {
    /// Resizes its terminal (only for `tty` processes).
    pub async fn resize(&self, width: u32, height: u32) -> Result<(), Error> {
        TasksClient::new(self.runtime.channel())
            .resize_pty(self.runtime.request(ResizePtyRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                width,
                height,
            }))
            .await
            .map(|_| ())
            .map_err(Error::rpc("resizing the exec process's terminal"))
    }

    /// Tells the shim to close the process's stdin (after the caller dropped its writer):
    /// the shim holds a writer of the FIFO itself, so without this the process never reads
    /// end-of-file.
    pub async fn close_stdin(&self) -> Result<(), Error> {
        TasksClient::new(self.runtime.channel())
            .close_io(self.runtime.request(CloseIoRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                stdin: true,
            }))
            .await
            .map(|_| ())
            .map_err(Error::rpc("closing the exec process's stdin"))
    }
}

impl ExecProcess {
    /// The exec id containerd knows it by.
    pub fn id(&self) -> &str {
        &self.exec_id
    }

    /// Kills the process if it still runs, deletes it and removes its FIFOs.
    pub async fn cleanup(&mut self) {
        self.stdin = None;
        if !self.deleted {
            let mut tasks = TasksClient::new(self.runtime.channel());
            let _ = tasks
                .kill(self.runtime.request(KillRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                    signal: libc::SIGKILL as u32,
                    all: false,
                }))
                .await;
            let waited = tokio::time::timeout(Duration::from_secs(10), self.wait()).await;
            if !matches!(waited, Ok(Ok(_))) {
                debug!(exec = %self.exec_id, "the exec process did not report its exit after SIGKILL");
            }
            match tasks
                .delete_process(self.runtime.request(DeleteProcessRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                }))
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => debug!(exec = %self.exec_id, error = %status.message(), "deleting the exec process"),
            }
            self.deleted = true;
        }
        self.fifo_dir = None;
    }
}

impl Drop for ExecProcess {
    /// A handle dropped without [`ExecProcess::cleanup`] (a client that went away) cleans up
    /// in the background.
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let mut rest = ExecProcess {
            runtime: self.runtime.clone(),
            container_id: std::mem::take(&mut self.container_id),
            exec_id: std::mem::take(&mut self.exec_id),
            stdin: self.stdin.take(),
            stdout: None,
            stderr: None,
            fifo_dir: self.fifo_dir.take(),
            deleted: false,
        };
        self.deleted = true;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { rest.cleanup().await });
        } else {
            rest.deleted = true;
        }
    }
}
