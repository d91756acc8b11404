//! Privileged tests of NodePort/LoadBalancer translation by TC and XDP: real programs in
//! the real kernel, real packets between network namespaces.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`).
//! Each test builds its own namespaces, named after the process and a counter:
//!
//! ```text
//!  client 10.1.0.2 ─veth─ 10.1.0.1 [ext]  node  [pod] 10.2.0.1 ─veth─ 10.2.0.2 backend
//!                                         node  [rem] 10.3.0.1 ─veth─ 10.3.0.2 remote node
//!                                                                      (+ 10.4.0.2, its "pod")
//! ```
//!
//! The node forwards; TC (and XDP) attach to `ext` and `rem`, the external interfaces.
//! The remote node has no route to the client: only SNAT brings its replies back. DSR tests
//! add a direct link, and the remote node gets a datapath of its own (own pins and cgroup,
//! TC on both its links), as the backend's node:
//!
//! ```text
//!  client 10.5.0.2 ─veth─ 10.5.0.1 remote node (route to 10.1.0.0/24 this way)
//! ```
//! The test
//! thread enters the node namespace to load and attach (as the agent would run there);
//! servers and clients (python3) run in theirs through `ip netns exec`. Drop guards kill
//! the servers, remove pins and cgroup, and delete the namespaces (and with them the veths).

mod common;

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weir_agent::datapath::{
    Backend, Capacity, Config, ConntrackTimeouts, Datapath, Error, ExternalConfig, ExternalMode, InterfaceAttachment,
    NodeContext, Protocol, ServiceKey, ServiceSelection, XdpAttachment, XdpPolicy, desired_state_for_node,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 2);
/// Outside the client's subnet: the client routes it to the node (no ARP announcement here).
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61999;

/// A server: `proto address port name`. Answers each TCP connection or UDP datagram with
/// `<name> <peer ip>:<peer port>`: who it is, and whom it saw. A UDP server bound to
/// 0.0.0.0 answers from the address its route to the peer prefers, not necessarily the
/// one it was sent to: on a host with several addresses, bind the one the service uses.
const SERVER: &str = r#"
import socket, sys
proto, address, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((address, port))
if proto == "tcp":
    s.listen(128)
print("ready", flush=True)
while True:
    if proto == "tcp":
        c, peer = s.accept()
        c.sendall(("%s %s:%d" % (name, peer[0], peer[1])).encode())
        c.close()
    else:
        data, peer = s.recvfrom(256)
        s.sendto(("%s %s:%d" % (name, peer[0], peer[1])).encode(), peer)
"#;

/// The client: `proto host port count timeout sport`. One line per attempt: `ok
/// <answer>|<from>` (`from`: the address the answer came from) or `err <errno name or
/// timeout>`. Each attempt is a new socket, from source port `sport` unless it is 0.
const CLIENT: &str = r#"
import errno, socket, sys
proto, host, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
sport = int(sys.argv[6])
for _ in range(count):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    if sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
    try:
        if proto == "tcp":
            s.connect((host, port))
            src = s.getpeername()
            data = b""
            while True:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
        else:
            s.sendto(b"ping", (host, port))
            data, src = s.recvfrom(256)
        print("ok %s|%s:%d" % (data.decode(), src[0], src[1]), flush=True)
    except socket.timeout:
        print("err timeout", flush=True)
    except OSError as e:
        print("err %s" % errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    s.close()
"#;

/// A connected UDP socket sends one datagram to `host port` and waits for an answer, while
/// a raw socket watches for the ICMP destination-unreachable about it. Prints
/// `<outcome>|<icmp>`: the outcome `ok` or the errno name (or `timeout`); the ICMP error as
/// `<outer source> <quoted destination ip:port> <quoted header checksum ok|bad>`, or `none`.
const ICMP_CLIENT: &str = r#"
import errno, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3.0)
s.connect((host, port))
s.send(b"ping")
try:
    s.recv(256)
    outcome = "ok"
except socket.timeout:
    outcome = "timeout"
except OSError as e:
    outcome = errno.errorcode.get(e.errno, str(e.errno))
raw.settimeout(0.5)
icmp = "none"
try:
    while True:
        pkt = raw.recv(2048)
        ihl = (pkt[0] & 15) * 4
        if pkt[ihl] != 3:
            continue
        inner = pkt[ihl + 8:]
        iihl = (inner[0] & 15) * 4
        words = struct.unpack("!%dH" % (iihl // 2), inner[:iihl])
        total = sum(words)
        while total > 0xffff:
            total = (total & 0xffff) + (total >> 16)
        dport = struct.unpack("!H", inner[iihl + 2:iihl + 4])[0]
        icmp = "%s %s:%d %s" % (socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(inner[16:20]), dport,
                                "ok" if total == 0xffff else "bad")
        break
except socket.timeout:
    pass
print("%s|%s" % (outcome, icmp), flush=True)
"#;

/// A connected UDP socket with path MTU discovery (DF set) sends a `size`-byte datagram to
/// `host port` twice, half a second apart. Prints `<second send outcome>|<IP_MTU>`: `ok` or
/// the errno name, then the path MTU the socket learned.
const PMTU_CLIENT: &str = r#"
import errno, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect((host, port))
s.send(b"x" * size)
time.sleep(0.5)
try:
    s.send(b"x" * size)
    outcome = "ok"
except OSError as e:
    outcome = errno.errorcode.get(e.errno, str(e.errno))
print("%s|%d" % (outcome, s.getsockopt(socket.IPPROTO_IP, IP_MTU)), flush=True)
"#;

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    /// The server's name.
    server: String,
    /// The client address the server saw.
    seen: String,
    /// Where the answer came from, as the client saw it.
    from: String,
}

impl Answer {
    fn seen_ip(&self) -> Ipv4Addr {
        self.seen.split(':').next().unwrap().parse().unwrap()
    }

    fn seen_port(&self) -> u16 {
        self.seen.split(':').nth(1).unwrap().parse().unwrap()
    }
}

fn run(cmd: &mut Command) {
    let output = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The namespaces, veths, servers, cgroup and pins of one test.
struct Topology {
    id: String,
    client: String,
    node: String,
    backend: String,
    remote: String,
    servers: Vec<Child>,
    config: Config,
    /// The remote node's own datapath, once [`Topology::load_remote`] made it.
    remote_config: Option<Config>,
    in_node: Option<NetnsGuard>,
}

impl Topology {
    fn new() -> Topology {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the NodePort tests need root: run `cargo xtask test` as root"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id());
        let name = |role: &str| format!("weir-np-{id}-{role}");
        let cgroup = cgroup2_root().join(name("cg"));
        let mut topology = Topology {
            client: name("client"),
            node: name("node"),
            backend: name("backend"),
            remote: name("remote"),
            servers: Vec::new(),
            config: Config {
                cgroup_path: cgroup.clone(),
                pin_root: PathBuf::from("/sys/fs/bpf").join(name("pins")),
                capacity: Capacity::default(),
            },
            remote_config: None,
            in_node: None,
            id,
        };
        for ns in [&topology.client, &topology.node, &topology.backend, &topology.remote] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cgroup.display()));
        topology.link(&topology.ext(), &topology.client, "10.1.0.1/24", "10.1.0.2/24", true);
        topology.link(&topology.pod(), &topology.backend, "10.2.0.1/24", "10.2.0.2/24", true);
        topology.link(&topology.rem(), &topology.remote, "10.3.0.1/24", "10.3.0.2/24", false);
        ip(&["-n", &topology.remote, "addr", "add", "10.4.0.2/32", "dev", "lo"]);
        ip(&["-n", &topology.node, "route", "add", "10.4.0.0/24", "via", "10.3.0.2"]);
        topology.exec(
            &topology.node,
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && \
                 echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects && \
                 echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter",
            ],
        );
        topology.in_node = Some(NetnsGuard::enter(&topology.node));
        topology
    }

    fn ext(&self) -> String {
        format!("ext{}", self.id)
    }

    fn pod(&self) -> String {
        format!("pod{}", self.id)
    }

    fn rem(&self) -> String {
        format!("rem{}", self.id)
    }

    /// The direct link from the remote node to the client, remote side.
    fn dsr(&self) -> String {
        format!("dsr{}", self.id)
    }

    /// Adds the direct link (remote node 10.5.0.1, client 10.5.0.2) and the remote node's
    /// route to the client's subnet through it: its replies no longer need this node.
    fn dsr_link(&self) {
        let (remote_side, client_side) = (self.dsr(), format!("p{}", self.dsr()));
        ip(&[
            "link",
            "add",
            &remote_side,
            "netns",
            &self.remote,
            "type",
            "veth",
            "peer",
            "name",
            &client_side,
            "netns",
            &self.client,
        ]);
        ip(&["-n", &self.remote, "addr", "add", "10.5.0.1/24", "dev", &remote_side]);
        ip(&["-n", &self.remote, "link", "set", &remote_side, "up"]);
        ip(&["-n", &self.client, "addr", "add", "10.5.0.2/24", "dev", &client_side]);
        ip(&["-n", &self.client, "link", "set", &client_side, "up"]);
        ip(&["-n", &self.remote, "route", "add", "10.1.0.0/24", "via", "10.5.0.2"]);
        // Answers from the node's address arrive on a link that is not the route to it.
        self.exec(
            &self.client,
            &[
                "sh",
                "-c",
                &format!(
                    "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && \
                     echo 0 > /proc/sys/net/ipv4/conf/{client_side}/rp_filter"
                ),
            ],
        );
    }

    /// Runs `f` with this thread in the remote node's namespace.
    fn in_remote<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = NetnsGuard::enter(&self.remote);
        f()
    }

    /// The remote node's own datapath (own pins and cgroup), TC attached to its two links
    /// (`mode` for flows it balances itself), and NodePorts 30080/TCP, 30053/UDP and
    /// 30099/UDP (nothing listens) and LB_IP:80/TCP to its backend, as the cluster would
    /// program them there.
    fn load_remote(&mut self, mode: ExternalMode) -> Datapath {
        let name = |role: &str| format!("weir-np-{}-{role}", self.id);
        let config = Config {
            cgroup_path: cgroup2_root().join(name("cgr")),
            pin_root: PathBuf::from("/sys/fs/bpf").join(name("pinsr")),
            capacity: Capacity::default(),
        };
        std::fs::create_dir(&config.cgroup_path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", config.cgroup_path.display()));
        self.remote_config = Some(config.clone());
        let attachment = ExternalConfig {
            interfaces: vec![format!("p{}", self.rem()), self.dsr()],
            snat_address: Ipv4Addr::new(10, 3, 0, 2),
            snat_ports: SNAT_PORTS,
            xdp: XdpPolicy::Off,
            mode,
        };
        let mut datapath = self.in_remote(|| {
            let mut datapath = Datapath::load(&config).unwrap_or_else(|e| panic!("loading the remote datapath: {e}"));
            datapath
                .attach_external(&attachment)
                .unwrap_or_else(|e| panic!("attaching on the remote node: {e}"));
            datapath
        });
        program_node_ports(&mut datapath, REMOTE_BACKEND, false);
        datapath
            .upsert_service_with(
                node_port(30099, Protocol::Udp),
                vec![Backend::active(REMOTE_BACKEND, 5999)],
                external(),
            )
            .unwrap();
        datapath
            .upsert_service_with(lb_frontend(), vec![Backend::active(REMOTE_BACKEND, 8080)], external())
            .unwrap();
        datapath
    }

    /// A veth from the node (`node_side`, `node_addr`) to `peer_ns` (`peer_addr`, with a
    /// default route back through the node when `default_route`).
    fn link(&self, node_side: &str, peer_ns: &str, node_addr: &str, peer_addr: &str, default_route: bool) {
        let peer = format!("p{node_side}");
        ip(&[
            "link", "add", node_side, "netns", &self.node, "type", "veth", "peer", "name", &peer, "netns", peer_ns,
        ]);
        ip(&["-n", &self.node, "addr", "add", node_addr, "dev", node_side]);
        ip(&["-n", &self.node, "link", "set", node_side, "up"]);
        ip(&["-n", peer_ns, "addr", "add", peer_addr, "dev", &peer]);
        ip(&["-n", peer_ns, "link", "set", &peer, "up"]);
        if default_route {
            let gateway = node_addr.split('/').next().unwrap();
            ip(&["-n", peer_ns, "route", "add", "default", "via", gateway]);
        }
    }

    fn exec(&self, ns: &str, args: &[&str]) {
        run(Command::new("ip").args(["netns", "exec", ns]).args(args));
    }

    fn load(&self) -> Datapath {
        Datapath::load(&self.config).unwrap_or_else(|e| panic!("loading the datapath: {e}"))
    }

    fn external(&self, xdp: XdpPolicy) -> ExternalConfig {
        ExternalConfig {
            interfaces: vec![self.ext(), self.rem()],
            snat_address: SNAT_IP,
            snat_ports: SNAT_PORTS,
            xdp,
            mode: ExternalMode::Snat,
        }
    }

    /// Starts a server in `ns` on `address:port` and waits until it listens.
    fn server(&mut self, ns: &str, proto: &str, address: Ipv4Addr, port: u16, name: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", SERVER, proto])
            .args([address.to_string(), port.to_string(), name.to_owned()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a python3 server");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        self.servers.push(child);
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "server {name} did not start");
    }

    fn local_servers(&mut self) {
        let backend = self.backend.clone();
        self.server(&backend, "tcp", LOCAL_BACKEND, 8080, "local");
        self.server(&backend, "udp", LOCAL_BACKEND, 5353, "local");
    }

    fn remote_servers(&mut self) {
        let remote = self.remote.clone();
        self.server(&remote, "tcp", REMOTE_BACKEND, 8080, "remote");
        self.server(&remote, "udp", REMOTE_BACKEND, 5353, "remote");
    }

    /// Runs the client in the client namespace: `count` attempts, each a new socket.
    fn client(
        &self,
        proto: &str,
        host: Ipv4Addr,
        port: u16,
        count: usize,
        timeout: f64,
    ) -> Vec<Result<Answer, String>> {
        self.client_from(proto, 0, host, port, count, timeout)
    }

    /// [`Topology::client`] from source port `sport` (0: any).
    fn client_from(
        &self,
        proto: &str,
        sport: u16,
        host: Ipv4Addr,
        port: u16,
        count: usize,
        timeout: f64,
    ) -> Vec<Result<Answer, String>> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.client]);
        self.run_client(cmd, proto, sport, host, port, count, timeout)
    }

    /// A client process on the node itself (its namespace and the datapath's cgroup):
    /// socket-LB translates its connections at connect(), no packet reaches TC or XDP.
    fn node_client(&self, proto: &str, host: Ipv4Addr, port: u16, count: usize) -> Vec<Result<Answer, String>> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node]);
        // `ip netns exec` and python3 inherit the cgroup.
        common::run_in_cgroup(&mut cmd, &self.config.cgroup_path);
        self.run_client(cmd, proto, 0, host, port, count, 3.0)
    }

    #[allow(clippy::too_many_arguments, reason = "the client's command line, spelled out")]
    fn run_client(
        &self,
        mut cmd: Command,
        proto: &str,
        sport: u16,
        host: Ipv4Addr,
        port: u16,
        count: usize,
        timeout: f64,
    ) -> Vec<Result<Answer, String>> {
        let output = cmd
            .args(["python3", "-c", CLIENT, proto])
            .args([
                host.to_string(),
                port.to_string(),
                count.to_string(),
                timeout.to_string(),
            ])
            .arg(sport.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running the python3 client");
        assert!(output.status.success(), "client failed: {}", output.status);
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| match line.strip_prefix("ok ") {
                Some(rest) => {
                    let (answer, from) = rest.split_once('|').unwrap();
                    let (server, seen) = answer.split_once(' ').unwrap();
                    Ok(Answer {
                        server: server.to_owned(),
                        seen: seen.to_owned(),
                        from: from.to_owned(),
                    })
                }
                None => Err(line.trim_start_matches("err ").to_owned()),
            })
            .collect()
    }

    /// [`ICMP_CLIENT`] to `host:port`: `(outcome, icmp)`.
    fn icmp_client(&self, host: Ipv4Addr, port: u16) -> (String, String) {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.client, "python3", "-c", ICMP_CLIENT])
            .args([host.to_string(), port.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running the python3 ICMP client");
        assert!(output.status.success(), "ICMP client failed: {}", output.status);
        let line = String::from_utf8(output.stdout).unwrap();
        let (outcome, icmp) = line.trim().split_once('|').unwrap();
        (outcome.to_owned(), icmp.to_owned())
    }

    /// [`PMTU_CLIENT`] to `host:port` with `size`-byte datagrams: `(outcome, path MTU)`.
    fn pmtu_client(&self, host: Ipv4Addr, port: u16, size: usize) -> (String, u32) {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.client, "python3", "-c", PMTU_CLIENT])
            .args([host.to_string(), port.to_string(), size.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running the python3 path MTU client");
        assert!(output.status.success(), "path MTU client failed: {}", output.status);
        let line = String::from_utf8(output.stdout).unwrap();
        let (outcome, mtu) = line.trim().split_once('|').unwrap();
        (outcome.to_owned(), mtu.parse().unwrap())
    }

    /// Like [`Topology::client`], but every attempt must get an answer.
    fn answers(&self, proto: &str, host: Ipv4Addr, port: u16, count: usize) -> Vec<Answer> {
        self.client(proto, host, port, count, 3.0)
            .into_iter()
            .map(|result| result.unwrap_or_else(|e| panic!("{proto} to {host}:{port} failed: {e}")))
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut server in self.servers.drain(..) {
            let _ = server.kill();
            let _ = server.wait();
        }
        // Back to our own namespace before the node's goes.
        self.in_node = None;
        for config in std::iter::once(&self.config).chain(&self.remote_config) {
            if let Err(e) = Datapath::uninstall(config) {
                eprintln!("cleanup: removing pins under {}: {e}", config.pin_root.display());
            }
            if let Err(e) = std::fs::remove_dir(&config.cgroup_path) {
                eprintln!("cleanup: removing cgroup {}: {e}", config.cgroup_path.display());
            }
        }
        for ns in [&self.client, &self.node, &self.backend, &self.remote] {
            let status = Command::new("ip").args(["netns", "del", ns]).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("cleanup: ip netns del {ns}: {status:?}");
            }
        }
    }
}

/// Moves the calling thread into a named network namespace; goes back on drop.
struct NetnsGuard {
    original: OwnedFd,
}

impl NetnsGuard {
    fn enter(name: &str) -> NetnsGuard {
        let original: OwnedFd = File::open("/proc/thread-self/ns/net")
            .expect("opening our netns")
            .into();
        let target = File::open(format!("/var/run/netns/{name}")).expect("opening the node netns");
        // SAFETY: setns with an open netns fd; CLONE_NEWNET affects only the calling thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {name}: {}", std::io::Error::last_os_error());
        NetnsGuard { original }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: `original` is an open netns file descriptor.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!("cleanup: setns back: {}", std::io::Error::last_os_error());
        }
    }
}

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .map(|fields| PathBuf::from(fields[1]))
        .expect("no cgroup2 mount: the datapath needs the cgroup v2 hierarchy")
}

fn node_port(port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        address: NODE_IP.into(),
        port,
        protocol,
    }
}

/// LB_IP:80/TCP.
fn lb_frontend() -> ServiceKey {
    ServiceKey {
        address: LB_IP.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn external() -> ServiceSelection {
    ServiceSelection {
        external: true,
        ..ServiceSelection::default()
    }
}

/// NodePorts 30080/TCP and 30053/UDP to `backend` (port 8080 and 5353).
fn program_node_ports(datapath: &mut Datapath, backend: Ipv4Addr, remote: bool) {
    for (port, protocol, target) in [(30080, Protocol::Tcp, 8080), (30053, Protocol::Udp, 5353)] {
        let mut b = Backend::active(backend, target);
        if remote {
            b = b.on_remote_node();
        }
        datapath
            .upsert_service_with(node_port(port, protocol), vec![b], external())
            .unwrap();
    }
}

fn assert_xdp(report: &[InterfaceAttachment], expected: &XdpAttachment) {
    assert_eq!(report.len(), 2, "{report:?}");
    for attachment in report {
        assert_eq!(&attachment.xdp, expected, "{report:?}");
    }
}

/// NodePort TCP and UDP to a backend on this node: the client's address reaches it, the
/// answers come from the NodePort.
fn local_backend_through(xdp: XdpPolicy) {
    let mut topo = Topology::new();
    topo.local_servers();
    let mut datapath = topo.load();
    let report = datapath.attach_external(&topo.external(xdp)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);

    for answer in topo.answers("tcp", NODE_IP, 30080, 5) {
        assert_eq!(answer.server, "local");
        assert_eq!(answer.seen_ip(), CLIENT_IP, "{answer:?}");
    }
    for answer in topo.answers("udp", NODE_IP, 30053, 3) {
        assert_eq!(answer.server, "local");
        assert_eq!(answer.seen_ip(), CLIENT_IP, "{answer:?}");
        assert_eq!(answer.from, format!("{NODE_IP}:30053"), "the reply is reverse-NATed");
    }
    let stats = datapath.packet_stats().unwrap();
    assert!(
        stats.tc_egress_tracked >= 8,
        "replies leave through TC egress: {stats:?}"
    );
    match xdp {
        XdpPolicy::Native => {
            assert_xdp(&report, &XdpAttachment::Native);
            assert!(stats.xdp_new_flows >= 8, "{stats:?}");
            assert_eq!(stats.tc_ingress_new_flows, 0, "XDP translated first: {stats:?}");
        }
        _ => {
            assert!(matches!(report[0].xdp, XdpAttachment::None { .. }), "{report:?}");
            assert_eq!(stats.xdp_new_flows, 0, "{stats:?}");
            assert!(stats.tc_ingress_new_flows >= 8, "{stats:?}");
        }
    }
    // Each flow is tracked in both directions.
    let conntrack = datapath.conntrack().unwrap();
    assert!(conntrack.len() >= 16, "{conntrack:?}");
    assert!(conntrack.iter().all(|entry| !entry.snat), "{conntrack:?}");

    // No Datapath object: the pinned links and maps keep translating.
    drop(datapath);
    assert_eq!(topo.answers("tcp", NODE_IP, 30080, 3).len(), 3);
    // A new agent finds the links in place.
    let mut datapath = topo.load();
    let again = datapath.attach_external(&topo.external(xdp)).unwrap();
    assert_eq!(again, report);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tc_translates_node_port_tcp_and_udp_to_a_local_backend() {
    local_backend_through(XdpPolicy::Off);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn xdp_translates_node_port_tcp_and_udp_to_a_local_backend() {
    local_backend_through(XdpPolicy::Native);
}

/// NodePort to a backend on another node: it sees the node's SNAT address and a port of
/// the range; its answers come back through the node, which has the only route to the client.
fn remote_backend_through(xdp: XdpPolicy) {
    let mut topo = Topology::new();
    topo.remote_servers();
    let mut datapath = topo.load();
    let report = datapath.attach_external(&topo.external(xdp)).unwrap();
    program_node_ports(&mut datapath, REMOTE_BACKEND, true);

    for answer in topo
        .answers("tcp", NODE_IP, 30080, 5)
        .into_iter()
        .chain(topo.answers("udp", NODE_IP, 30053, 3))
    {
        assert_eq!(answer.server, "remote");
        assert_eq!(answer.seen_ip(), SNAT_IP, "{answer:?}");
        assert!(SNAT_PORTS.contains(&answer.seen_port()), "{answer:?}");
    }
    assert_eq!(
        topo.answers("udp", NODE_IP, 30053, 1)[0].from,
        format!("{NODE_IP}:30053")
    );
    let conntrack = datapath.conntrack().unwrap();
    assert!(conntrack.iter().all(|entry| entry.snat), "{conntrack:?}");
    // Ingress (XDP or TC) translates new flows and the replies arriving on `rem`; TC
    // egress SNATs on `rem` and gives replies their frontend source on `ext`.
    let stats = datapath.packet_stats().unwrap();
    let (new, replies) = if xdp == XdpPolicy::Native {
        assert_xdp(&report, &XdpAttachment::Native);
        assert_eq!(stats.tc_ingress_new_flows, 0, "{stats:?}");
        (stats.xdp_new_flows, stats.xdp_tracked)
    } else {
        assert_eq!(stats.xdp_new_flows, 0, "{stats:?}");
        (stats.tc_ingress_new_flows, stats.tc_ingress_tracked)
    };
    assert!(new >= 9 && replies >= 9, "{stats:?}");
    assert!(stats.tc_egress_tracked >= 18, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tc_snats_node_port_traffic_to_a_remote_backend_and_replies_come_back() {
    remote_backend_through(XdpPolicy::Off);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn xdp_snats_node_port_traffic_to_a_remote_backend_and_replies_come_back() {
    remote_backend_through(XdpPolicy::Native);
}

fn lb_service(policy: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".to_owned()),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_owned()),
            cluster_ip: Some("10.96.0.80".to_owned()),
            external_traffic_policy: Some(policy.to_owned()),
            ports: Some(vec![ServicePort {
                port: 80,
                node_port: Some(30090),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(LB_IP.to_string()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        }),
    }
}

/// Endpoints `(address, node name)` of service "web", port 8080.
fn web_slice(endpoints: &[(Ipv4Addr, &str)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-x1".to_owned()),
            namespace: Some("default".to_owned()),
            labels: Some([("kubernetes.io/service-name".to_owned(), "web".to_owned())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(address, node)| Endpoint {
                    addresses: vec![address.to_string()],
                    node_name: Some((*node).to_owned()),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

fn this_node() -> NodeContext {
    NodeContext {
        name: "node-a".to_owned(),
        addresses: vec![NODE_IP],
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn load_balancer_ip_and_node_port_of_a_reconciled_service_reach_local_and_remote_backends() {
    let mut topo = Topology::new();
    topo.local_servers();
    topo.remote_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Auto)).unwrap();
    let slice = web_slice(&[(LOCAL_BACKEND, "node-a"), (REMOTE_BACKEND, "node-b")]);
    let desired = desired_state_for_node(&[lb_service("Cluster")], &[slice], &this_node());
    datapath.reconcile(&desired).unwrap();

    for (host, port) in [(LB_IP, 80), (NODE_IP, 30090)] {
        let answers = topo.answers("tcp", host, port, 24);
        // Random choice: P(one backend gets none of 24) = 2^-23.
        let local: Vec<&Answer> = answers.iter().filter(|a| a.server == "local").collect();
        let remote: Vec<&Answer> = answers.iter().filter(|a| a.server == "remote").collect();
        assert!(!local.is_empty() && !remote.is_empty(), "{answers:?}");
        assert!(local.iter().all(|a| a.seen_ip() == CLIENT_IP), "{local:?}");
        assert!(remote.iter().all(|a| a.seen_ip() == SNAT_IP), "{remote:?}");
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn external_traffic_policy_local_keeps_the_client_ip_and_drops_without_a_local_backend() {
    let mut topo = Topology::new();
    topo.local_servers();
    topo.remote_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Off)).unwrap();
    let both = web_slice(&[(LOCAL_BACKEND, "node-a"), (REMOTE_BACKEND, "node-b")]);
    let desired = desired_state_for_node(&[lb_service("Local")], &[both], &this_node());
    datapath.reconcile(&desired).unwrap();

    // Only the local backend, which sees the client itself. At random over both,
    // P(24 connections all local) = 2^-24.
    for (host, port) in [(LB_IP, 80), (NODE_IP, 30090)] {
        for answer in topo.answers("tcp", host, port, 24) {
            assert_eq!(answer.server, "local", "{answer:?}");
            assert_eq!(answer.seen_ip(), CLIENT_IP, "{answer:?}");
        }
    }

    // The node has no endpoint of its own left: packets are dropped (kube-proxy does the same).
    let remote_only = web_slice(&[(REMOTE_BACKEND, "node-b")]);
    let desired = desired_state_for_node(&[lb_service("Local")], &[remote_only], &this_node());
    datapath.reconcile(&desired).unwrap();
    let before = datapath.packet_stats().unwrap().dropped_no_backend;
    let outcomes = topo.client("tcp", LB_IP, 80, 1, 1.0);
    assert_eq!(outcomes, vec![Err("timeout".to_owned())]);
    assert!(datapath.packet_stats().unwrap().dropped_no_backend > before);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn client_ip_affinity_keeps_an_external_client_on_one_backend() {
    let mut topo = Topology::new();
    topo.local_servers();
    topo.remote_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    let backends = vec![
        Backend::active(LOCAL_BACKEND, 8080),
        Backend::active(REMOTE_BACKEND, 8080).on_remote_node(),
    ];
    let affinity = ServiceSelection {
        affinity_timeout: Some(60),
        ..external()
    };
    datapath
        .upsert_service_with(node_port(30080, Protocol::Tcp), backends.clone(), affinity)
        .unwrap();
    // Every connection (a new source port each) goes where the first went. At random,
    // P(20 agree) = 2^-19.
    let answers = topo.answers("tcp", NODE_IP, 30080, 20);
    assert!(answers.iter().all(|a| a.server == answers[0].server), "{answers:?}");

    // Without affinity the same client is spread over both.
    datapath
        .upsert_service_with(node_port(30080, Protocol::Tcp), backends, external())
        .unwrap();
    let answers = topo.answers("tcp", NODE_IP, 30080, 20);
    assert!(answers.iter().any(|a| a.server != answers[0].server), "{answers:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn conntrack_sweep_removes_idle_flows_and_keeps_live_ones() {
    let mut topo = Topology::new();
    topo.local_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Off)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);

    topo.answers("tcp", NODE_IP, 30080, 3);
    topo.answers("udp", NODE_IP, 30053, 3);
    let entries = datapath.conntrack().unwrap();
    let count = |protocol: Protocol| entries.iter().filter(|e| e.protocol == protocol).count();
    assert_eq!((count(Protocol::Tcp), count(Protocol::Udp)), (6, 6), "{entries:?}");
    // The servers closed the TCP connections: FINs went through.
    assert!(
        entries
            .iter()
            .filter(|e| e.protocol == Protocol::Tcp)
            .any(|e| e.closing),
        "{entries:?}"
    );

    // Nothing is idle for the default timeouts.
    assert_eq!(datapath.sweep_conntrack(&ConntrackTimeouts::default()).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(1100));
    let hour = Duration::from_secs(3600);
    let closing_only = ConntrackTimeouts {
        tcp: hour,
        tcp_closing: Duration::from_secs(1),
        udp: hour,
    };
    assert_eq!(datapath.sweep_conntrack(&closing_only).unwrap(), 6);
    let left = datapath.conntrack().unwrap();
    assert!(left.iter().all(|e| e.protocol == Protocol::Udp), "{left:?}");

    // A fresh flow stays; the idle ones go. The timeout falls between their idle times
    // (a client's start-up time varies on a busy machine).
    let old: Vec<_> = left.iter().map(|e| (e.source, e.destination)).collect();
    topo.answers("udp", NODE_IP, 30053, 1);
    let entries = datapath.conntrack().unwrap();
    let (fresh, idle): (Vec<_>, Vec<_>) = entries.iter().partition(|e| !old.contains(&(e.source, e.destination)));
    assert_eq!((fresh.len(), idle.len()), (2, 6), "{entries:?}");
    let newest_idle = idle.iter().map(|e| e.idle).min().unwrap();
    let freshest = fresh.iter().map(|e| e.idle).max().unwrap();
    assert!(newest_idle > freshest + Duration::from_secs(1), "{entries:?}");
    let live = ConntrackTimeouts {
        udp: freshest + (newest_idle - freshest) / 2,
        ..ConntrackTimeouts::default()
    };
    assert_eq!(datapath.sweep_conntrack(&live).unwrap(), 6);
    let left = datapath.conntrack().unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|e| !old.contains(&(e.source, e.destination))),
        "{left:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_tracked_flow_whose_backend_goes_away_is_balanced_again() {
    let mut topo = Topology::new();
    topo.local_servers();
    topo.remote_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);
    // One UDP flow: the same source port each time.
    let ask = || {
        let answers = topo.client_from("udp", 40000, NODE_IP, 30053, 1, 3.0);
        answers.into_iter().next().unwrap().unwrap()
    };
    assert_eq!(ask().server, "local");
    assert_eq!(ask().server, "local");

    // The local backend leaves the service (it still runs): the tracked flow moves on.
    program_node_ports(&mut datapath, REMOTE_BACKEND, true);
    let moved = ask();
    assert_eq!(moved.server, "remote", "{moved:?}");
    assert_eq!(moved.seen_ip(), SNAT_IP, "{moved:?}");
    assert_eq!(moved.from, format!("{NODE_IP}:30053"));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_direct_connection_reusing_a_tracked_tuple_is_left_alone() {
    let mut topo = Topology::new();
    topo.local_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Off)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);
    let tcp_from = |host, port| {
        let answers = topo.client_from("tcp", 40001, host, port, 1, 3.0);
        answers.into_iter().next().unwrap()
    };
    // Through the NodePort, then straight to the backend from the same source port: the
    // same tuple between backend and client, but no longer the NodePort's connection. Its
    // SYN-ACK must not be rewritten to come from the NodePort.
    for _ in 0..2 {
        let answer = tcp_from(NODE_IP, 30080).unwrap();
        assert_eq!((answer.server.as_str(), answer.seen_ip()), ("local", CLIENT_IP));
        let direct = tcp_from(LOCAL_BACKEND, 8080);
        assert!(
            matches!(&direct, Ok(answer) if answer.from == format!("{LOCAL_BACKEND}:8080")),
            "{direct:?}"
        );
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_interface_created_again_gets_its_programs_again() {
    let mut topo = Topology::new();
    topo.local_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);
    assert_eq!(topo.answers("tcp", NODE_IP, 30080, 1)[0].server, "local");

    // The client's link goes and comes back (a driver reload, say): the pinned links of
    // the old device are detached, though still pinned.
    ip(&["-n", &topo.node, "link", "del", &topo.ext()]);
    topo.link(&topo.ext(), &topo.client, "10.1.0.1/24", "10.1.0.2/24", true);
    let outcome = topo.client("tcp", NODE_IP, 30080, 1, 1.0);
    assert!(
        outcome[0].is_err(),
        "nothing translates on the new device yet: {outcome:?}"
    );

    let report = datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    assert_xdp(&report, &XdpAttachment::Native);
    assert_eq!(topo.answers("tcp", NODE_IP, 30080, 3).len(), 3);
    assert!(datapath.packet_stats().unwrap().xdp_new_flows >= 4);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn attach_external_explains_a_missing_interface_and_a_bad_config() {
    let topo = Topology::new();
    let mut datapath = topo.load();
    let missing = ExternalConfig {
        interfaces: vec![topo.ext(), "nosuch0".to_owned()],
        ..topo.external(XdpPolicy::Off)
    };
    let err = datapath.attach_external(&missing).unwrap_err();
    assert!(
        matches!(&err, Error::NoInterface { name } if name == "nosuch0"),
        "{err}"
    );
    assert!(err.to_string().contains("ip link show"), "{err}");
    // Checked before anything was attached: no link on the interface that exists.
    assert_eq!(datapath.detach_external(&topo.ext()).unwrap(), 0);

    let empty_range = ExternalConfig {
        snat_ports: std::ops::RangeInclusive::new(2000, 1000),
        ..topo.external(XdpPolicy::Off)
    };
    let err = datapath.attach_external(&empty_range).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

    // Attach, then detach: every link goes.
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    assert_eq!(datapath.detach_external(&topo.ext()).unwrap(), 3);
    assert_eq!(datapath.detach_external(&topo.rem()).unwrap(), 3);

    // A device without native XDP (the node's loopback): an error when native is
    // required, TC alone (and the reason) with Auto.
    let no_xdp = "lo".to_owned();
    let on_lo = |xdp| ExternalConfig {
        interfaces: vec![no_xdp.clone()],
        ..topo.external(xdp)
    };
    let err = datapath.attach_external(&on_lo(XdpPolicy::Native)).unwrap_err();
    assert!(
        matches!(&err, Error::XdpUnsupported { interface, .. } if *interface == no_xdp),
        "{err}"
    );
    assert!(err.to_string().contains("XdpPolicy::Auto"), "{err}");
    let report = datapath.attach_external(&on_lo(XdpPolicy::Auto)).unwrap();
    assert!(
        matches!(&report[0].xdp, XdpAttachment::None { reason } if reason.contains("native XDP failed")),
        "{report:?}"
    );
    assert_eq!(datapath.detach_external(&no_xdp).unwrap(), 2, "TC ingress and egress");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn processes_on_the_node_reach_node_ports_and_load_balancer_ips_through_socket_lb() {
    let mut topo = Topology::new();
    topo.local_servers();
    topo.remote_servers();
    let mut datapath = topo.load();
    // No TC or XDP at all: only the cgroup programs can translate.
    let slice = web_slice(&[(LOCAL_BACKEND, "node-a"), (REMOTE_BACKEND, "node-b")]);
    let desired = desired_state_for_node(&[lb_service("Cluster")], &[slice], &this_node());
    datapath.reconcile(&desired).unwrap();

    for (host, port) in [(LB_IP, 80), (NODE_IP, 30090)] {
        let answers: Vec<Answer> = topo
            .node_client("tcp", host, port, 24)
            .into_iter()
            .map(|result| result.unwrap_or_else(|e| panic!("tcp to {host}:{port} from the node failed: {e}")))
            .collect();
        // Random choice: P(one backend gets none of 24) = 2^-23.
        assert!(answers.iter().any(|a| a.server == "local"), "{answers:?}");
        assert!(answers.iter().any(|a| a.server == "remote"), "{answers:?}");
        // getpeername shows the frontend; the local backend sees the node's own address on
        // its link (the kernel's source choice, nothing rewritten a packet).
        assert!(
            answers.iter().all(|a| a.from == format!("{host}:{port}")),
            "{answers:?}"
        );
        let node_on_pod_link = Ipv4Addr::new(10, 2, 0, 1);
        assert!(
            answers
                .iter()
                .filter(|a| a.server == "local")
                .all(|a| a.seen_ip() == node_on_pod_link),
            "{answers:?}"
        );
    }
    assert_eq!(datapath.packet_stats().unwrap(), Default::default(), "TC/XDP never ran");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_conntrack_sweeper_thread_removes_idle_flows_on_its_own() {
    let mut topo = Topology::new();
    topo.local_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Off)).unwrap();
    program_node_ports(&mut datapath, LOCAL_BACKEND, false);
    topo.answers("udp", NODE_IP, 30053, 2);
    assert_eq!(datapath.conntrack().unwrap().len(), 4);

    let timeouts = ConntrackTimeouts {
        udp: Duration::from_millis(500),
        ..ConntrackTimeouts::default()
    };
    let sweeper = datapath
        .spawn_conntrack_sweeper(timeouts, Duration::from_millis(200))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !datapath.conntrack().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper left {:?}",
            datapath.conntrack()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stopped: new flows stay however idle they get.
    drop(sweeper);
    topo.answers("udp", NODE_IP, 30053, 1);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(datapath.conntrack().unwrap().len(), 2);
}

/// DSR to a backend on the remote node: the backend sees the client's own address, the
/// replies (from the NodePort's address) reach the client over the direct link, and this
/// node keeps one DNAT entry per flow, nothing for SNAT or replies.
fn dsr_to_a_remote_backend_through(xdp: XdpPolicy) {
    let mut topo = Topology::new();
    topo.remote_servers();
    topo.dsr_link();
    let mut datapath = topo.load();
    let dsr = ExternalConfig {
        mode: ExternalMode::Dsr,
        ..topo.external(xdp)
    };
    let report = datapath.attach_external(&dsr).unwrap();
    program_node_ports(&mut datapath, REMOTE_BACKEND, true);
    datapath
        .upsert_service_with(
            node_port(30099, Protocol::Udp),
            vec![Backend::active(REMOTE_BACKEND, 5999).on_remote_node()],
            external(),
        )
        .unwrap();
    datapath
        .upsert_service_with(
            lb_frontend(),
            vec![Backend::active(REMOTE_BACKEND, 8080).on_remote_node()],
            external(),
        )
        .unwrap();
    let backend_node = topo.load_remote(ExternalMode::Snat);

    // A TCP connection completes only if the SYN-ACK comes from the frontend.
    for (proto, host, port, count) in [
        ("tcp", NODE_IP, 30080, 5),
        ("udp", NODE_IP, 30053, 3),
        ("tcp", LB_IP, 80, 3),
    ] {
        for answer in topo.answers(proto, host, port, count) {
            assert_eq!(answer.server, "remote", "{answer:?}");
            assert_eq!(answer.seen_ip(), CLIENT_IP, "the backend sees the client: {answer:?}");
            assert_eq!(answer.from, format!("{host}:{port}"), "{answer:?}");
        }
    }
    let lb_entries = datapath.conntrack().unwrap();
    assert_eq!(lb_entries.len(), 11, "one DNAT entry per flow: {lb_entries:?}");
    assert!(
        lb_entries.iter().all(|e| e.dsr && !e.snat && !e.reply && !e.egress),
        "{lb_entries:?}"
    );
    let stats = datapath.packet_stats().unwrap();
    assert!(stats.dsr_options_added >= 11, "8 SYNs and 3 datagrams: {stats:?}");
    assert_eq!(stats.tc_egress_tracked, 0, "no reply came through this node: {stats:?}");
    assert_eq!((stats.dropped_dsr, stats.dropped_no_snat), (0, 0), "{stats:?}");
    let new_flows = if xdp == XdpPolicy::Native {
        assert_xdp(&report, &XdpAttachment::Native);
        // XDP adds the option itself; TC ingress leaves it (and does not mistake this
        // node for the backend's: the conntrack count above).
        assert_eq!(stats.tc_ingress_new_flows, 0, "{stats:?}");
        stats.xdp_new_flows
    } else {
        assert_eq!(stats.xdp_new_flows, 0, "{stats:?}");
        stats.tc_ingress_new_flows
    };
    assert!(new_flows >= 11, "{stats:?}");

    let backend_entries = backend_node.conntrack().unwrap();
    let replies: Vec<_> = backend_entries.iter().filter(|e| e.reply).collect();
    assert_eq!(replies.len(), 11, "{backend_entries:?}");
    let mut frontends: Vec<String> = Vec::new();
    for reply in replies {
        assert!(reply.dsr && reply.egress && !reply.snat, "{reply:?}");
        assert_eq!(reply.source.ip(), &REMOTE_BACKEND, "{reply:?}");
        assert_eq!(reply.destination.ip(), &CLIENT_IP, "{reply:?}");
        let new_source = reply.new_source.unwrap_or_else(|| panic!("{reply:?}"));
        frontends.push(format!("{new_source} from :{}", reply.source.port()));
    }
    frontends.sort();
    let mut expected: Vec<String> = [
        (LB_IP, 80, 8080, 3),
        (NODE_IP, 30053, 5353, 3),
        (NODE_IP, 30080, 8080, 5),
    ]
    .into_iter()
    .flat_map(|(ip, port, from, n)| std::iter::repeat_n(format!("{ip}:{port} from :{from}"), n))
    .collect();
    expected.sort();
    assert_eq!(frontends, expected);
    let backend_stats = backend_node.packet_stats().unwrap();
    assert!(backend_stats.dsr_options_recorded >= 11, "{backend_stats:?}");
    assert!(backend_stats.tc_egress_tracked >= 11, "{backend_stats:?}");

    // The backend's node reverse-NATs the ICMP error of a port without a listener too.
    let (outcome, icmp) = topo.icmp_client(NODE_IP, 30099);
    assert_eq!(outcome, "ECONNREFUSED", "{icmp}");
    assert_eq!(icmp, format!("{NODE_IP} {NODE_IP}:30099 ok"));
    assert!(backend_node.packet_stats().unwrap().icmp_errors_translated >= 1);

    // A datagram that fits the client's link, but not with the option: this node answers
    // "fragmentation needed", which reaches the client's socket for the NodePort, with
    // room for the option taken off the MTU.
    let before = datapath.packet_stats().unwrap().icmp_errors_translated;
    let (outcome, mtu) = topo.pmtu_client(NODE_IP, 30053, 1500 - 28);
    assert_eq!((outcome.as_str(), mtu), ("EMSGSIZE", 1492));
    assert!(datapath.packet_stats().unwrap().icmp_errors_translated > before);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tc_dsr_keeps_the_client_address_and_the_backend_node_answers_directly() {
    dsr_to_a_remote_backend_through(XdpPolicy::Off);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn xdp_dsr_adds_the_option_itself() {
    dsr_to_a_remote_backend_through(XdpPolicy::Native);
}

/// A connected UDP socket to a NodePort whose backend port has no listener gets
/// ECONNREFUSED: the backend's port unreachable comes back from the NodePort's address,
/// quoting the datagram as the client sent it (to the NodePort), checksums intact.
fn icmp_port_unreachable_through(backend: Ipv4Addr, remote: bool) {
    let mut topo = Topology::new();
    let mut datapath = topo.load();
    // XDP too: it leaves ICMP to TC.
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    let mut target = Backend::active(backend, 5999);
    if remote {
        target = target.on_remote_node();
    }
    datapath
        .upsert_service_with(node_port(30099, Protocol::Udp), vec![target], external())
        .unwrap();
    // A server elsewhere on the backend, so the node is up and only the port is closed.
    if remote {
        topo.remote_servers();
    } else {
        topo.local_servers();
    }

    let (outcome, icmp) = topo.icmp_client(NODE_IP, 30099);
    assert_eq!(outcome, "ECONNREFUSED", "{icmp}");
    assert_eq!(icmp, format!("{NODE_IP} {NODE_IP}:30099 ok"));
    let stats = datapath.packet_stats().unwrap();
    // Remote: reverse SNAT at ingress on `rem`, then the frontend at egress on `ext`.
    let rewrites = if remote { 2 } else { 1 };
    assert_eq!(stats.icmp_errors_translated, rewrites, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn icmp_port_unreachable_from_a_local_backend_refuses_the_client() {
    icmp_port_unreachable_through(LOCAL_BACKEND, false);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn icmp_port_unreachable_from_a_remote_snat_backend_refuses_the_client() {
    icmp_port_unreachable_through(REMOTE_BACKEND, true);
}

/// The node's link to the remote node has a smaller MTU: the node itself answers a DF
/// datagram too big for it with "fragmentation needed", quoting the datagram as DNATed
/// (to the backend). Reverse-NATed, it reaches the client's socket, which learns the
/// path MTU to the NodePort and fails the next large send with EMSGSIZE.
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn icmp_fragmentation_needed_on_the_way_to_a_remote_backend_lowers_the_clients_path_mtu() {
    let mut topo = Topology::new();
    topo.remote_servers();
    let mut datapath = topo.load();
    datapath.attach_external(&topo.external(XdpPolicy::Native)).unwrap();
    program_node_ports(&mut datapath, REMOTE_BACKEND, true);
    ip(&["-n", &topo.node, "link", "set", &topo.rem(), "mtu", "1000"]);

    let (outcome, mtu) = topo.pmtu_client(NODE_IP, 30053, 1200);
    assert_eq!((outcome.as_str(), mtu), ("EMSGSIZE", 1000));
    assert!(datapath.packet_stats().unwrap().icmp_errors_translated >= 1);
    // Datagrams that fit still get through.
    assert_eq!(topo.answers("udp", NODE_IP, 30053, 1)[0].server, "remote");
}
