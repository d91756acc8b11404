//! Real clusters for the end-to-end tests, root only: the first node runs `weir up` (server
//! and agent in one process), further nodes run `weir agent --server URL --token TOKEN`,
//! each node in a network namespace of its own plugged into a bridge the lab made (the
//! lab's only mark on the host's network), with its own data dir, containerd, cgroup parent
//! and bpffs pins. The test talks to it with the real kubectl.
//!
//! Everything is named after the test process and a counter. Dropping the lab kills the
//! processes it started (the weir processes by PID; containerd, shims and containers found
//! by its data dirs and cgroups, which nothing else uses), unmounts and removes what they
//! made, and deletes the namespaces and the bridge, also after a failed test.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{KUBECTL_TIMEOUT, describe, required_binary, run_bounded, workspace_dir};

static LABS: AtomicU32 = AtomicU32::new(0);

/// The API server's port inside the first node's namespace.
pub const API_PORT: u16 = 6443;

/// The cgroup v2 hierarchy's root (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup_v2_root() -> &'static str {
    if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    }
}

/// Whether the lab can run here: root (namespaces, containerd, cgroups).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One node of a lab.
pub struct LabNode {
    pub name: String,
    /// The node's network namespace (under /run/netns).
    pub netns: String,
    pub ip: Ipv4Addr,
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl LabNode {
    /// The node's cgroup parent (relative to each hierarchy's root).
    fn cgroup_parent(&self, lab: &str) -> String {
        format!("/weir-{lab}-{}", self.name)
    }
}

/// A cluster of one or more nodes.
pub struct Lab {
    pub id: String,
    bridge: String,
    subnet: u8,
    pub nodes: Vec<LabNode>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    kubectl: PathBuf,
    token: String,
}

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: running {cmd:?}"))?;
    ensure!(output.status.success(), "{what}: {cmd:?} failed: {}", describe(&output));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(&format!("ip {}", args.join(" ")), Command::new("ip").args(args))
}

impl Lab {
    /// Starts a cluster of `nodes` nodes (the first runs `weir up`) with `up_args` passed to
    /// `weir up`, imports the test images (WEIR_IMAGES) on every node and waits until every
    /// node is Ready.
    pub async fn start(nodes: usize, up_args: &[&str]) -> Result<Lab> {
        ensure!(is_root(), "the cluster tests need root");
        let bin = required_binary("WEIR_BIN", workspace_dir().join("target/debug/weir"), "the weir binary")?;
        let kubectl = required_binary("WEIR_KUBECTL", workspace_dir().join("target/tools/kubectl"), "kubectl")?;
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{}{n}", pid % 100_000);
        let subnet = (200 + (pid as u64 * 7 + n as u64) % 50) as u8;
        let dir = tempfile::Builder::new().prefix("weir-lab-").tempdir()?;
        let mut lab = Lab {
            bridge: format!("wlb{id}"),
            id,
            subnet,
            nodes: Vec::new(),
            dir,
            bin,
            kubectl,
            token: String::new(),
        };
        lab.make_bridge()?;
        for i in 0..nodes {
            lab.add_node_namespace(i)?;
        }
        let first = &lab.nodes[0];
        let mut args: Vec<String> = [
            "up",
            "--data-dir",
            &first.data_dir.display().to_string(),
            "--secure-port",
            &API_PORT.to_string(),
            "--node-name",
            &first.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(lab.node_flags(0));
        args.extend(up_args.iter().map(|s| s.to_string()));
        lab.nodes[0].args = args;
        lab.spawn(0)?;
        let token_path = lab.nodes[0].data_dir.join("node-token");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(token_path.exists() && lab.nodes[0].data_dir.join("admin.kubeconfig").exists()) {
            lab.check_alive(0)?;
            ensure!(
                Instant::now() < deadline,
                "weir up wrote no token within 60 s:\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lab.token = std::fs::read_to_string(&token_path)?.trim().to_owned();
        // kubectl runs on the host: the server is at the node's address there.
        let admin = std::fs::read_to_string(lab.nodes[0].data_dir.join("admin.kubeconfig"))?;
        let url = format!("https://{}:{API_PORT}", lab.nodes[0].ip);
        let admin = admin
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("server:") {
                    format!("    server: {url}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(lab.kubeconfig(), admin)?;
        for i in 1..nodes {
            let node = &lab.nodes[i];
            let mut args: Vec<String> = [
                "agent",
                "--server",
                &url,
                "--token",
                &lab.token,
                "--node-name",
                &node.name,
                "--data-dir",
                &node.data_dir.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(lab.node_flags(i));
            lab.nodes[i].args = args;
            lab.spawn(i)?;
        }
        lab.wait_ready(Duration::from_secs(90)).await?;
        Ok(lab)
    }

    /// Flags both `weir up` and `weir agent` take, per node.
    fn node_flags(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let parent = node.cgroup_parent(&self.id);
        vec![
            "--cgroup-parent".into(),
            parent.clone(),
            "--service-cgroup".into(),
            format!("{}{parent}", cgroup_v2_root()),
            "--bpf-pin-root".into(),
            format!("/sys/fs/bpf/weir-{}-{}", self.id, node.name),
        ]
    }

    fn make_bridge(&self) -> Result<()> {
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.{}.{}.1/24", self.subnet, self.subnet),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        Ok(())
    }

    fn add_node_namespace(&mut self, i: usize) -> Result<()> {
        let name = format!("node-{i}");
        let netns = format!("weir-lab-{}-{i}", self.id);
        let host_veth = format!("wlv{}{i}", self.id);
        let node_ip = Ipv4Addr::new(10, self.subnet, self.subnet, 2 + i as u8);
        let data_dir = self.dir.path().join(&name);
        std::fs::create_dir_all(data_dir.join("images"))?;
        // The test images, imported by the agent at start (air-gap import).
        if let Some(images) = std::env::var_os("WEIR_IMAGES") {
            for entry in std::fs::read_dir(&images).with_context(|| format!("reading WEIR_IMAGES {images:?}"))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "tar") {
                    std::fs::copy(&path, data_dir.join("images").join(path.file_name().expect("a file")))?;
                }
            }
        }
        let log = self.dir.path().join(format!("{name}.log"));
        self.nodes.push(LabNode {
            name,
            netns: netns.clone(),
            ip: node_ip,
            data_dir,
            args: Vec::new(),
            child: None,
            log,
        });
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &host_veth, "master", &self.bridge, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{}.{}.1", self.subnet, self.subnet),
        ])?;
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroups and bpffs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(&self.bin)
            .args(&node.args)
            .env("WEIR_LOG", "info,kube=warn,tower=warn,hyper=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} for {}", self.bin.display(), node.name))?;
        node.child = Some(child);
        Ok(())
    }

    fn check_alive(&mut self, i: usize) -> Result<()> {
        if let Some(child) = self.nodes[i].child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("{} exited ({status}):\n{}", self.nodes[i].name, self.logs());
        }
        Ok(())
    }

    /// Waits until every node is Ready.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for i in 0..self.nodes.len() {
                self.check_alive(i)?;
            }
            let out = self.kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ]);
            let text = String::from_utf8_lossy(&out.stdout);
            let ready = self
                .nodes
                .iter()
                .all(|n| text.lines().any(|l| l == format!("{}=True", n.name)));
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "nodes not Ready within {timeout:?}: {text}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The admin kubeconfig (server at the first node's address).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// The join token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The API server URL as the host reaches it.
    pub fn server_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.nodes[0].ip)
    }

    /// Runs kubectl against the lab.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    /// Runs kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .args(args);
        run_bounded(cmd, input.map(str::as_bytes), KUBECTL_TIMEOUT)
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        ensure!(out.status.success(), "kubectl {}: {}", args.join(" "), describe(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
        ensure!(out.status.success(), "kubectl apply: {}", describe(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kube client with the admin credentials.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs `argv` in node `i`'s network namespace (e.g. `busybox wget` to a pod IP).
    pub fn in_node(&self, i: usize, argv: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.nodes[i].netns)).args(argv);
        run_bounded(cmd, None, timeout)
    }

    /// SIGKILLs node `i`'s weir process (the agent; on node 0 the server too), as a crash would.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs node `i`'s weir process and waits for it to exit.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{} did not stop within 40 s of SIGTERM", self.nodes[i].name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Starts node `i`'s weir process again with the same flags.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill9(i);
        self.spawn(i)
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            out.push_str(&format!("----- {} (last {} lines) -----\n", node.name, tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The PID of node `i`'s weir process, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Where the lab keeps its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        for node in &self.nodes {
            teardown_node(&node.data_dir, &node.cgroup_parent(&self.id));
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).status();
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/weir-{}-{}", self.id, node.name));
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// Kills and removes everything a node with `data_dir` and `cgroup_parent` left: its
/// containers (by cgroup), its containerd and shims (by the data dir in their command
/// lines), pod network namespaces, mounts, cgroups. Only for processes and files this node
/// made: nothing else uses its data dir or cgroup parent.
pub fn teardown_node(data_dir: &Path, cgroup_parent: &str) {
    let dir = data_dir.display().to_string();
    let parent_marker = format!("{cgroup_parent}/");
    for _ in 0..3 {
        let mut killed = 0;
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                if cmdline.contains(&dir) || cgroups.contains(&parent_marker) {
                    // SAFETY: kill(2) on a process of this node (its data dir or cgroup).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed += 1;
                }
            }
        }
        if killed == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Pod network namespaces: the pods' uids are the names of the pod dirs and IPAM owners.
    let mut uids: Vec<String> = std::fs::read_dir(data_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    for range in std::fs::read_dir(data_dir.join("ipam")).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(range.path()).into_iter().flatten().flatten() {
            if let Ok(owner) = std::fs::read_to_string(file.path()) {
                uids.push(owner.trim().to_owned());
            }
        }
    }
    for uid in uids {
        let path = format!("/run/netns/weir-pod-{uid}");
        if Path::new(&path).exists() {
            let _ = Command::new("umount").args(["-l", &path]).status();
            let _ = std::fs::remove_file(&path);
        }
    }
    // Mounts under the data dir (snapshots, shm), deepest first.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", &m]).status();
    }
    // cgroups in every hierarchy, deepest first.
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let root = h.path().join(cgroup_parent.trim_start_matches('/'));
            remove_cgroup_tree(&root);
        }
    }
    remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(cgroup_parent.trim_start_matches('/')));
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..10 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
