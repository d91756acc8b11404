//! A containerd for one privileged test, a network namespace for its pod, and their cleanup:
//! the fixture of the privileged tests (`runtime.rs`, `registry.rs`, `stream.rs` include it
//! with `#[path]`). See `runtime.rs` for the rules they follow.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weir_agent::runtime::{
    CONTAINER_NAME_LABEL, ContainerConfig, Containerd, ContainerdConfig, POD_UID_LABEL, Runtime,
};

pub const BUSYBOX: &str = "weir.local/busybox:latest";

pub static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// The images built by `cargo xtask images`, or `None` (the test then skips, saying why).
pub fn images() -> Option<PathBuf> {
    match std::env::var_os("WEIR_IMAGES") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            eprintln!(
                "SKIPPED: WEIR_IMAGES is not set; run `cargo xtask test` (it builds the images with `cargo xtask \
                 images` and sets WEIR_IMAGES=target/images)"
            );
            None
        }
    }
}

/// One test's containerd, runtime and everything to clean up.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    containerd: Option<Containerd>,
    pub runtime: Runtime,
    pub images: PathBuf,
    /// The cgroup directory (relative, in every hierarchy) this test's containers go under.
    pub cgroup_parent: String,
}

impl Fixture {
    pub async fn new(images: PathBuf) -> Fixture {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the runtime tests need root: run `cargo xtask test` as root"
        );
        let dir = tempfile::Builder::new()
            .prefix("weir-ctd-")
            .tempdir_in("/tmp")
            .expect("creating a directory under /tmp");
        let containerd = Containerd::start(&ContainerdConfig::managed(dir.path().join("containerd")))
            .await
            .expect("starting containerd");
        let runtime = Runtime::connect(containerd.socket(), &unique("weir-test"))
            .await
            .expect("connecting to containerd");
        Fixture {
            dir,
            containerd: Some(containerd),
            runtime,
            images,
            cgroup_parent: format!("/{}", unique("weir-test")),
        }
    }

    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("containerd is running")
    }

    pub async fn import(&self, file: &str) -> Vec<String> {
        let path = self.images.join(file);
        self.runtime
            .import_archive(&path)
            .await
            .unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
    }

    pub fn log(&self, id: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{id}.log"))
    }

    pub fn config(&self, image: &str, command: &[&str]) -> ContainerConfig {
        let id = unique("c");
        ContainerConfig {
            log_path: self.log(&id),
            id,
            image: image.into(),
            command: (!command.is_empty()).then(|| command.iter().map(|s| s.to_string()).collect()),
            labels: BTreeMap::from([
                (POD_UID_LABEL.to_string(), "uid-1".to_string()),
                (CONTAINER_NAME_LABEL.to_string(), "main".to_string()),
            ]),
            cgroups_path: Some(format!("{}/{}", self.cgroup_parent, unique("cg"))),
            ..Default::default()
        }
    }

    /// Creates, starts and waits for a container; returns its exit code and log.
    pub async fn run(&self, config: &ContainerConfig) -> (u32, String) {
        self.runtime.create_container(config).await.expect("create");
        self.runtime.start_container(&config.id).await.expect("start");
        let status = tokio::time::timeout(Duration::from_secs(30), self.runtime.wait_container(&config.id))
            .await
            .expect("the container exits within 30 s")
            .expect("wait");
        // The shim finishes copying the pipes into the log when the task is deleted.
        self.runtime.delete_container(&config.id).await.expect("delete");
        let log = std::fs::read_to_string(&config.log_path).unwrap_or_default();
        (status.code, log)
    }

    /// The end of every test, also a failed one: delete every container, stop containerd
    /// and check it is gone, remove the cgroups; then re-raise the body's panic, if any.
    pub async fn finish(mut self, outcome: std::thread::Result<()>) {
        let mut problems = Vec::new();
        match self.runtime.list_containers().await {
            Ok(containers) => {
                for c in containers {
                    let deleted =
                        tokio::time::timeout(Duration::from_secs(20), self.runtime.delete_container(&c.id)).await;
                    if !matches!(deleted, Ok(Ok(()))) {
                        problems.push(format!("deleting container {}: {deleted:?}", c.id));
                    }
                }
            }
            Err(e) => problems.push(format!("listing containers: {e}")),
        }
        let containerd = self.containerd.take().expect("containerd is running");
        let pid = containerd.pid();
        if let Err(e) = containerd.shutdown().await {
            problems.push(format!("stopping containerd: {e}"));
        }
        if let Some(pid) = pid
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            problems.push(format!("containerd {pid} still runs after shutdown"));
        }
        if outcome.is_err() || !problems.is_empty() {
            kill_leftovers(self.dir.path(), &self.cgroup_parent);
        }
        unmount_under(self.dir.path());
        remove_cgroups(&self.cgroup_parent);
        if let Err(panic) = outcome {
            if !problems.is_empty() {
                eprintln!("cleanup after the failure failed too: {problems:#?}");
            }
            std::panic::resume_unwind(panic);
        }
        assert!(problems.is_empty(), "cleanup failed: {problems:#?}");
    }
}

impl Drop for Fixture {
    /// The last resort when a test did not reach [`Fixture::finish`] (a panic outside the
    /// guarded body): stop containerd and unmount what is left. Containers it ran may
    /// outlive it; `finish` is the path that deletes them.
    fn drop(&mut self) {
        if let Some(containerd) = self.containerd.take() {
            let pid = containerd.pid();
            drop(containerd);
            if let Some(pid) = pid {
                // SAFETY: kill has no memory-safety preconditions; pid is the containerd we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        kill_leftovers(self.dir.path(), &self.cgroup_parent);
        unmount_under(self.dir.path());
        remove_cgroups(&self.cgroup_parent);
    }
}

/// After a failure: SIGKILL what this test started and could not stop through containerd:
/// containerds and shims (their command lines name the test's unique directory) and the
/// processes in the test's cgroups.
fn kill_leftovers(dir: &Path, cgroup_parent: &str) {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids: Vec<i32> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    let pids_root = Path::new("/sys/fs/cgroup/pids").join(cgroup_parent.trim_start_matches('/'));
    for cgroup in std::fs::read_dir(&pids_root).into_iter().flatten().flatten() {
        let procs = std::fs::read_to_string(cgroup.path().join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions; each pid belongs to this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Removes this test's cgroup directories (runc removes a container's own, not its parents).
fn remove_cgroups(parent: &str) {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for controller in controllers.flatten() {
        let dir = controller.path().join(parent.trim_start_matches('/'));
        if !dir.is_dir() {
            continue;
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        dirs.push(dir);
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// Detaches every mount under `dir` (snapshots of containers a failed test left).
pub fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let Ok(c) = std::ffi::CString::new(point) else { continue };
        // SAFETY: c is a valid NUL-terminated path; MNT_DETACH only detaches the mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A network namespace with a veth to the host: host side `.1`, namespace side `.2` (/30).
pub struct Netns {
    pub name: String,
    host_if: String,
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    pub fn new() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("weir-rt-{pid}-{n}");
        let host_if = format!("wrt{}h{n}", pid % 100_000);
        let peer_if = format!("wrt{}p{n}", pid % 100_000);
        let third = (pid % 250) as u8;
        let fourth = ((n % 60) * 4) as u8;
        let host_ip = Ipv4Addr::new(10, 251, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, 251, third, fourth + 2);
        let netns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_ip,
        };
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if]);
        ip(&["link", "set", &peer_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer_if]);
        ip(&["-n", &name, "link", "set", &peer_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        netns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
