//! The network of one measurement: three namespaces joined by veths and routed by the node,
//! a cgroup for socket-LB clients, the backend server, and the datapath when a mode loads it.
//! It owns only what it created (names carry the pid and a counter); Drop removes all of it.
//!
//! ```text
//!  client 10.1.0.2 ─veth─ 10.1.0.1 [ext]  node  [pod] 10.2.0.1 ─veth─ 10.2.0.2:8080 backend
//! ```

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result, bail};
use weir_agent::datapath::{Capacity, Config, Datapath};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
/// The node's address on the client's side: NodePorts listen here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The node's address on the backend's side: the SNAT address TC/XDP would use.
pub const NODE_POD_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
pub const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 2), 8080);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`) and an open handle on it for setns(2).
pub struct Netns {
    pub name: String,
    fd: OwnedFd,
}

impl Netns {
    /// A command that runs in this namespace: the child enters it before exec (setns
    /// instead of `ip netns exec`, which would remount /sys and hide bpffs and cgroups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` stays open in the child (no CLOEXEC
        // until exec) because `self` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || enter(fd));
        }
        cmd
    }
}

fn enter(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns with an open netns descriptor changes only the calling thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into a namespace; back to where it was on drop.
pub struct NetnsGuard {
    original: OwnedFd,
}

impl NetnsGuard {
    pub fn enter(netns: &Netns) -> Result<NetnsGuard> {
        let original: OwnedFd = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?
            .into();
        enter(netns.fd.as_raw_fd()).with_context(|| format!("setns into {}", netns.name))?;
        Ok(NetnsGuard { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = enter(self.original.as_raw_fd()) {
            eprintln!("cleanup: setns back to the original network namespace: {e}");
        }
    }
}

pub struct Topology {
    pub id: String,
    pub client: Netns,
    pub node: Netns,
    pub backend: Netns,
    /// The node's interface towards the client, where TC and XDP attach.
    pub ext: String,
    server: Option<Child>,
    datapath: Option<(Datapath, Config)>,
    // Fields drop after `Drop::drop` (server killed, pins removed), in this order.
    /// Socket-LB clients run in it; the datapath's cgroup programs attach to it.
    cgroup: OwnedCgroup,
    _namespaces: OwnedNamespaces,
}

impl Topology {
    pub fn create() -> Result<Topology> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let mut namespaces = OwnedNamespaces(Vec::new());
        let client = namespaces.add(&format!("weir-bench-{id}-client"))?;
        let node = namespaces.add(&format!("weir-bench-{id}-node"))?;
        let backend = namespaces.add(&format!("weir-bench-{id}-backend"))?;
        let cgroup = OwnedCgroup::create(cgroup2_root()?.join(format!("weir-bench-{id}")))?;
        let topology = Topology {
            ext: format!("e{id}"),
            id,
            client,
            node,
            backend,
            server: None,
            datapath: None,
            cgroup,
            _namespaces: namespaces,
        };
        let ext = topology.ext.clone();
        topology.link(&ext, &topology.client, NODE_IP, CLIENT_IP)?;
        let pod = format!("p{}", topology.id);
        topology.link(&pod, &topology.backend, NODE_POD_SIDE_IP, *BACKEND.ip())?;
        {
            let _in_node = NetnsGuard::enter(&topology.node)?;
            for (path, value) in [
                ("/proc/sys/net/ipv4/ip_forward", "1"),
                ("/proc/sys/net/ipv4/conf/all/send_redirects", "0"),
                ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
            ] {
                std::fs::write(path, value).with_context(|| format!("writing {value} to {path} in the node netns"))?;
            }
        }
        Ok(topology)
    }

    /// A veth from the node (`node_side`, `node_ip`) to `peer` (`peer_ip`, default route
    /// back through the node), in a /24.
    fn link(&self, node_side: &str, peer: &Netns, node_ip: Ipv4Addr, peer_ip: Ipv4Addr) -> Result<()> {
        let peer_side = format!("v{node_side}");
        let (node_addr, peer_addr) = (format!("{node_ip}/24"), format!("{peer_ip}/24"));
        ip(&[
            "link",
            "add",
            node_side,
            "netns",
            &self.node.name,
            "type",
            "veth",
            "peer",
            "name",
            &peer_side,
            "netns",
            &peer.name,
        ])?;
        ip(&["-n", &self.node.name, "addr", "add", &node_addr, "dev", node_side])?;
        ip(&["-n", &self.node.name, "link", "set", node_side, "up"])?;
        ip(&["-n", &peer.name, "addr", "add", &peer_addr, "dev", &peer_side])?;
        ip(&["-n", &peer.name, "link", "set", &peer_side, "up"])?;
        ip(&["-n", &peer.name, "route", "add", "default", "via", &node_ip.to_string()])
    }

    /// Starts the backend server (this binary, `server` role) in the backend namespace and
    /// waits until it listens.
    pub fn start_server(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("locating this binary to start the server")?;
        let mut child = self
            .backend
            .command(exe)
            .args(["server", "--listen", &BACKEND.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the backend server")?;
        let stdout = child.stdout.take().expect("piped");
        self.server = Some(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's ready line")?;
        if line.trim() != "ready" {
            bail!("the backend server did not start (said {line:?}); see its error above");
        }
        Ok(())
    }

    /// Loads the datapath with a pin root of its own, the topology's cgroup and maps of
    /// `capacity`; it is uninstalled when the topology goes.
    pub fn load_datapath(&mut self, capacity: Capacity) -> Result<&mut Datapath> {
        let config = Config {
            cgroup_path: self.cgroup.0.clone(),
            pin_root: PathBuf::from("/sys/fs/bpf").join(format!("weir-bench-{}", self.id)),
            capacity,
        };
        match Datapath::load(&config) {
            Ok(datapath) => {
                let (datapath, _) = self.datapath.insert((datapath, config));
                Ok(datapath)
            }
            Err(e) => {
                // A load that failed half-way may have pinned some maps already.
                if let Err(cleanup) = Datapath::uninstall(&config) {
                    eprintln!("cleanup: removing pins under {}: {cleanup}", config.pin_root.display());
                }
                Err(e).context("loading the datapath")
            }
        }
    }

    /// Runs `exe client ...` in the client namespace, in the topology's cgroup when
    /// `in_cgroup` (the cgroup is joined before exec, so the first connect is translated).
    pub fn client_command(&self, in_cgroup: bool) -> Result<Command> {
        let exe = std::env::current_exe().context("locating this binary to start the client")?;
        let mut cmd = self.client.command(exe);
        if in_cgroup {
            crate::common::run_in_cgroup(&mut cmd, &self.cgroup.0);
        }
        Ok(cmd)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some((datapath, config)) = self.datapath.take() {
            drop(datapath);
            if let Err(e) = Datapath::uninstall(&config) {
                eprintln!("cleanup: removing pins under {}: {e}", config.pin_root.display());
            }
        }
    }
}

/// The namespaces made so far; deleted on drop, which removes their veths, iptables rules
/// and IPVS services with them.
struct OwnedNamespaces(Vec<String>);

impl OwnedNamespaces {
    fn add(&mut self, name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        self.0.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        let fd = File::open(Path::new("/var/run/netns").join(name))
            .with_context(|| format!("opening /var/run/netns/{name}"))?
            .into();
        Ok(Netns {
            name: name.to_owned(),
            fd,
        })
    }
}

impl Drop for OwnedNamespaces {
    fn drop(&mut self) {
        for name in self.0.iter().rev() {
            let status = Command::new("ip")
                .args(["netns", "del", name])
                .stdin(Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("cleanup: ip netns del {name}: {status:?}");
            }
        }
    }
}

/// A cgroup v2 directory of our own; removed on drop (once its processes have exited).
struct OwnedCgroup(PathBuf);

impl OwnedCgroup {
    fn create(path: PathBuf) -> Result<OwnedCgroup> {
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(OwnedCgroup(path))
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("cleanup: removing cgroup {}: {e}", self.0.display());
        }
    }
}

pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Runs `cmd` to completion; its stderr goes into the error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {shown}; is it installed?"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .map(|fields| PathBuf::from(fields[1]))
        .context(
            "no cgroup2 mount: socket-LB needs the cgroup v2 hierarchy; mount it with \
             `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        )
}
