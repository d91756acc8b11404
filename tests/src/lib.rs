//! Shared harness for the end-to-end tests: starts real `weir server` processes (embedded or
//! etcd store) in throwaway data dirs and hands out kubectl, raw HTTPS and kube-rs clients.
//! Owns only the processes and temp dirs it creates; never touches the user's ~/.kube.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use weir_control_plane::store::etcd_process::EtcdProcess;

pub mod bench;
pub mod cluster;
pub mod fake;

/// How long a server gets to bind, write its kubeconfig and answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one kubectl invocation; a hung kubectl fails the test instead of the CI run.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(90);

/// Which store the server under test keeps its objects in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The default: an embedded file inside the data dir.
    Embedded,
    /// A real etcd process started for this server alone.
    Etcd,
}

/// One running `weir server` with its own data dir (and etcd, for [`Backend::Etcd`]).
/// Dropping it kills the process and removes the data dir, also when the test panicked.
pub struct TestServer {
    backend: Backend,
    bin: PathBuf,
    extra_args: Vec<String>,
    port: u16,
    child: Option<Child>,
    // Field order matters for Drop: the child is killed explicitly first, then etcd stops,
    // then the data dir goes.
    etcd: Option<EtcdProcess>,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server on a free port and waits until it is ready.
    pub async fn start(backend: Backend) -> Result<TestServer> {
        TestServer::start_with_args(backend, &[]).await
    }

    /// Like [`TestServer::start`], passing `extra_args` to `weir server` (on restarts too).
    pub async fn start_with_args(backend: Backend, extra_args: &[&str]) -> Result<TestServer> {
        let bin = required_binary("WEIR_BIN", target_dir().join("debug/weir"), "the weir binary")?;
        let etcd = match backend {
            Backend::Embedded => None,
            Backend::Etcd => {
                // EtcdProcess looks for the binary itself; check first so a missing etcd gives
                // the same actionable message as the other binaries.
                required_binary("WEIR_ETCD", PathBuf::from("/usr/bin/etcd"), "etcd")?;
                Some(EtcdProcess::start().context("starting etcd")?)
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("weir-e2e-")
            .tempdir()
            .context("creating the server's data dir")?;
        let mut server = TestServer {
            backend,
            bin,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            port: 0,
            child: None,
            etcd,
            dir,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `127.0.0.1:PORT` of the etcd behind this server, for [`Backend::Etcd`].
    pub fn etcd_endpoint(&self) -> Option<&str> {
        self.etcd.as_ref().map(|etcd| etcd.endpoint.as_str())
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn token(&self) -> Result<String> {
        let path = self.dir.path().join("admin.token");
        let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(token.trim().to_string())
    }

    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        let path = self.dir.path().join("pki/ca.crt");
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `base_url()` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// An HTTPS client that trusts the cluster CA and sends the admin bearer token.
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.token()?))?;
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        Ok(self.http_client_builder()?.default_headers(headers).build()?)
    }

    /// An HTTPS client that trusts the cluster CA but sends no credentials.
    pub fn anonymous_http_client(&self) -> Result<reqwest::Client> {
        Ok(self.http_client_builder()?.build()?)
    }

    fn http_client_builder(&self) -> Result<reqwest::ClientBuilder> {
        let ca = reqwest::Certificate::from_pem(&self.ca_pem()?).context("parsing pki/ca.crt")?;
        Ok(reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60)))
    }

    /// A kube-rs client built from the admin kubeconfig (client certificate auth).
    pub async fn kube_client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A kubectl command pointed at this server, not yet run; for background or env tweaks.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let kubectl = required_binary("WEIR_KUBECTL", target_dir().join("tools/kubectl"), "kubectl")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = Command::new(kubectl);
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .env_remove("KUBECTL_EXTERNAL_DIFF");
        cmd
    }

    /// Runs kubectl to completion (bounded by [`KUBECTL_TIMEOUT`]).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        run_bounded(self.kubectl_command(args), None, KUBECTL_TIMEOUT)
    }

    /// Runs kubectl with `input` on its standard input (for `-f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        run_bounded(self.kubectl_command(args), Some(input.as_bytes()), KUBECTL_TIMEOUT)
    }

    /// Runs kubectl, panics with its output unless it succeeded, returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        expect_success(&format!("kubectl {}", args.join(" ")), self.kubectl(args))
    }

    /// Like [`TestServer::kubectl_ok`], with `input` on standard input.
    pub fn kubectl_stdin_ok(&self, args: &[&str], input: &str) -> String {
        expect_success(&format!("kubectl {}", args.join(" ")), self.kubectl_stdin(args, input))
    }

    /// Stops the server gracefully (SIGTERM, SIGKILL after 10 s) and starts it again on the
    /// same data dir and store.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_gracefully();
        self.spawn_and_wait().await
    }

    /// SIGKILLs the server at once, as a crash would; [`TestServer::restart`] brings it back.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the server's stdout and stderr, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["weir.stdout", "weir.stderr"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            out.push_str(&format!("----- {name} (last {} lines) -----\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn stop_gracefully(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let dir = self.dir.path().to_path_buf();
        // A kubeconfig left by the previous run would make us talk to a dead port.
        let kubeconfig = self.kubeconfig();
        if kubeconfig.exists() {
            std::fs::remove_file(&kubeconfig).context("removing the stale admin.kubeconfig")?;
        }
        self.port = free_port()?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("server")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--secure-port")
            .arg(self.port.to_string())
            .arg("--bind-address")
            .arg("127.0.0.1");
        if let Some(etcd) = &self.etcd {
            cmd.arg("--datastore").arg(format!("etcd://{}", etcd.endpoint));
        }
        cmd.args(&self.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(append_log(&dir.join("weir.stdout"))?)
            .stderr(append_log(&dir.join("weir.stderr"))?);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_problem = String::from("admin.kubeconfig not written yet");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!("weir server exited early with {status}\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!(
                    "weir server not ready within {READY_TIMEOUT:?} ({last_problem})\n{}",
                    self.logs()
                );
            }
            if kubeconfig.exists() {
                match self.readyz().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last_problem = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn readyz(&self) -> Result<()> {
        let response = self.anonymous_http_client()?.get(self.url("/readyz")).send().await?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            bail!(
                "GET /readyz answered {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        // libtest shows this only for failing tests, which is when it is wanted.
        eprintln!("weir server logs ({}):\n{}", self.dir.path().display(), self.logs());
    }
}

fn append_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A port that was free a moment ago; the server binds it right after.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
}

/// The binary named by `env_var`, else `fallback`; an error (never a silent skip) when missing.
pub fn required_binary(env_var: &str, fallback: PathBuf, what: &str) -> Result<PathBuf> {
    let path = std::env::var_os(env_var).map(PathBuf::from).unwrap_or(fallback);
    if !path.is_file() {
        bail!(
            "{what} not found at {} (set {env_var}): run the end-to-end tests through \
             `cargo xtask test`, which builds weir and sets it up; `cargo xtask setup` installs \
             kubectl, etcd and the Python client",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `cmd` with piped output, feeding it `input`, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("spawning {cmd:?}: {e}"),
    };
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                break (child.wait().expect("waiting for a killed child"), true);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = stderr.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n[killed after {timeout:?}]\n").as_bytes());
    }
    Output { status, stdout, stderr }
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Panics with the command's output unless it exited 0; returns its stdout.
pub fn expect_success(what: &str, output: Output) -> String {
    if !output.status.success() {
        panic!("{what} failed ({}):\n{}", output.status, describe(&output));
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Reads a response as JSON and returns it with its status; a non-JSON body becomes an error
/// that shows the body.
pub async fn json_response(response: reqwest::Response) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    let status = response.status();
    let body = response.text().await?;
    let value = serde_json::from_str(&body).map_err(|e| anyhow!("{status} with a non-JSON body ({e}): {body}"))?;
    Ok((status, value))
}

/// Asserts `response` is a Kubernetes `Status` failure with HTTP `code` and `reason`; returns it.
pub async fn expect_status(response: reqwest::Response, code: u16, reason: &str) -> Result<serde_json::Value> {
    let (status, body) = json_response(response).await?;
    if status.as_u16() != code {
        bail!("expected HTTP {code} {reason}, got {status}: {body}");
    }
    if body["kind"] != "Status" || body["apiVersion"] != "v1" {
        bail!("expected a v1 Status body, got {body}");
    }
    if body["status"] != "Failure" || body["code"] != code || body["reason"] != reason {
        bail!("expected Status Failure code {code} reason {reason}, got {body}");
    }
    Ok(body)
}

/// Asserts `response` succeeded with exactly `code` and returns its JSON body.
pub async fn expect_ok(response: reqwest::Response, code: u16) -> Result<serde_json::Value> {
    let (status, body) = json_response(response).await?;
    if status.as_u16() != code {
        bail!("expected HTTP {code}, got {status}: {body}");
    }
    Ok(body)
}

/// Whether `ip` is inside the default Service CIDR, 10.96.0.0/12.
pub fn in_service_cidr(ip: &str) -> bool {
    match ip.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            let [a, b, _, _] = ip.octets();
            a == 10 && (96..=111).contains(&b)
        }
        Err(_) => false,
    }
}

/// A minimal ConfigMap manifest as JSON.
pub fn config_map(name: &str, data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name },
        "data": data,
    })
}

/// Creates a namespace through the API and returns once the server acknowledged it.
pub async fn create_namespace(client: &reqwest::Client, server: &TestServer, name: &str) -> Result<()> {
    let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    let response = client.post(server.url("/api/v1/namespaces")).json(&body).send().await?;
    expect_ok(response, 201)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// The events of one watch response, read line by line (`?watch=true` streams JSON lines).
pub struct WatchEvents {
    response: reqwest::Response,
    buffer: Vec<u8>,
    keep_bookmarks: bool,
}

impl WatchEvents {
    pub fn new(response: reqwest::Response) -> WatchEvents {
        WatchEvents {
            response,
            buffer: Vec::new(),
            keep_bookmarks: false,
        }
    }

    /// Also return BOOKMARK events from `next`.
    pub fn with_bookmarks(mut self) -> WatchEvents {
        self.keep_bookmarks = true;
        self
    }

    /// The next event (`{"type": .., "object": ..}`), skipping BOOKMARKs unless `with_bookmarks`;
    /// an error when the
    /// stream ends or nothing arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if line.trim().is_empty() {
                    continue;
                }
                let event: serde_json::Value =
                    serde_json::from_str(&line).with_context(|| format!("watch event is not JSON: {line}"))?;
                if self.keep_bookmarks || event["type"] != "BOOKMARK" {
                    return Ok(event);
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => bail!(
                    "no watch event within {timeout:?} (partial line: {:?})",
                    String::from_utf8_lossy(&self.buffer)
                ),
                Ok(Err(e)) => bail!("watch stream failed: {e}"),
                Ok(Ok(None)) => bail!(
                    "watch stream ended (partial line: {:?})",
                    String::from_utf8_lossy(&self.buffer)
                ),
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
            }
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`; the error says
/// what was last seen. For waiting on controllers, which normally act within milliseconds.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: String;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "condition not met".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
