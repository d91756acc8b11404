//! Privileged tests of the pod network: real namespaces, veths, routes and TCP between pods.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`).
//! Each test makes two "nodes", network namespaces joined by a veth, each with its own
//! podCIDR, and runs the library inside them as the agent of that node would (a thread that
//! entered the node's namespace):
//!
//! ```text
//!  pod a1 ─┐                                                      ┌─ pod b1
//!          ├─ weir0 10.244.1.1  node a 10.250.0.1 ─veth─ 10.250.0.2 node b  weir0 10.244.2.1 ─┤
//!  pod a2 ─┘                                                      └─ pod b2
//! ```
//!
//! Names carry the process id and a counter; Drop guards unmount the pod namespaces and
//! delete the node namespaces (which takes their veths and routes along). Traffic goes only
//! to addresses inside these namespaces.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as k8s;
use weir_agent::network::{
    NODE_ROUTE_PROTOCOL, NodeRoute, POD_ROUTE_PROTOCOL, PodNetwork, PodNetworkConfig, PodSandboxNetwork, node_routes,
    sandbox::host_interface_name,
};

static NEXT: AtomicUsize = AtomicUsize::new(0);
const NETNS_DIR: &str = "/run/netns";
const PORT: u16 = 8080;

fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(path).unwrap_or_else(|e| panic!("opening netns {}: {e}", path.display()));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns with an open netns fd; it moves only this thread, which ends
                // with `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(future)
}

/// One node: its namespace, podCIDR, node IP and data directory.
struct Node {
    netns: String,
    cidr: IpNet,
    ip: Ipv4Addr,
    mtu: Option<u32>,
    data: tempfile::TempDir,
}

impl Node {
    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    fn config(&self) -> PodNetworkConfig {
        PodNetworkConfig {
            netns_dir: NETNS_DIR.into(),
            mtu: self.mtu,
            ..PodNetworkConfig::new(self.cidr, self.data.path())
        }
    }

    /// Runs `f` with this node's pod network, opened (again) in the node's namespace.
    fn with_network<T: Send>(&self, f: impl AsyncFnOnce(&PodNetwork) -> T + Send) -> T {
        let config = self.config();
        in_netns(&self.path(), move || {
            block_on(async move {
                let network = PodNetwork::open(config)
                    .await
                    .unwrap_or_else(|e| panic!("opening the pod network: {e}"));
                f(&network).await
            })
        })
    }

    fn create(&self, uid: &str) -> PodSandboxNetwork {
        self.with_network(async |net| net.create(uid).await)
            .unwrap_or_else(|e| panic!("creating the network of pod {uid}: {e}"))
    }

    fn delete(&self, uid: &str) {
        self.with_network(async |net| net.delete(uid).await)
            .unwrap_or_else(|e| panic!("deleting the network of pod {uid}: {e}"));
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.netns];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.netns, "link", "show", "dev", name])
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// Two nodes joined by a veth, and the pods made on them.
struct Cluster {
    id: String,
    n: usize,
    nodes: [Node; 2],
    pods: Vec<String>,
}

impl Cluster {
    fn new() -> Cluster {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the pod network tests need root: run `cargo xtask test` as root"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id());
        let node = |role: &str, cidr: &str, ip: Ipv4Addr, mtu| Node {
            netns: format!("weir-pn-{id}-{role}"),
            cidr: cidr.parse().unwrap(),
            ip,
            mtu,
            data: tempfile::tempdir().unwrap(),
        };
        let cluster = Cluster {
            nodes: [
                node("a", "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), None),
                // Node b's pods get a smaller MTU, as behind a link with less than 1500.
                node("b", "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), Some(1400)),
            ],
            pods: Vec::new(),
            id,
            n,
        };
        let [a, b] = &cluster.nodes;
        for node in [a, b] {
            ip(&["netns", "add", &node.netns]);
            node.ip(&["link", "set", "lo", "up"]);
        }
        // Node b checks source addresses strictly (as some distributions set it): the /32
        // routes must make every pod's packets pass.
        in_netns(&b.path(), || {
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter");
                std::fs::write(&path, "1").unwrap_or_else(|e| panic!("writing {path}: {e}"));
            }
        });
        let (a_if, b_if) = (format!("pn{}a", cluster.id), format!("pn{}b", cluster.id));
        ip(&[
            "link", "add", &a_if, "netns", &a.netns, "type", "veth", "peer", "name", &b_if, "netns", &b.netns,
        ]);
        for (node, link) in [(a, &a_if), (b, &b_if)] {
            node.ip(&["addr", "add", &format!("{}/24", node.ip), "dev", link]);
            node.ip(&["link", "set", link, "up"]);
        }
        cluster
    }

    /// A pod UID unique to this process and cluster.
    fn uid(&mut self, pod: usize) -> String {
        let uid = format!("{:08x}-0000-4000-8000-{:08x}{:04x}", std::process::id(), self.n, pod);
        self.pods.push(uid.clone());
        uid
    }

    /// Routes between the two nodes' podCIDRs, from Node objects as the agent would sync them.
    fn sync_routes(&self) {
        let nodes: Vec<k8s::Node> = self
            .nodes
            .iter()
            .map(|n| k8s::Node {
                metadata: Default::default(),
                spec: Some(k8s::NodeSpec {
                    pod_cidr: Some(n.cidr.to_string()),
                    pod_cidrs: Some(vec![n.cidr.to_string()]),
                    ..Default::default()
                }),
                status: Some(k8s::NodeStatus {
                    addresses: Some(vec![k8s::NodeAddress {
                        type_: "InternalIP".to_owned(),
                        address: n.ip.to_string(),
                    }]),
                    ..Default::default()
                }),
            })
            .collect();
        for node in &self.nodes {
            let routes = node_routes(&nodes);
            node.with_network(async move |net| net.sync_node_routes(&routes).await)
                .unwrap_or_else(|e| panic!("syncing node routes: {e}"));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for uid in &self.pods {
            let path = Path::new(NETNS_DIR).join(format!("weir-pod-{uid}"));
            let Ok(c) = std::ffi::CString::new(path.to_string_lossy().as_bytes()) else {
                continue;
            };
            // SAFETY: umount2 on a valid NUL-terminated path; failure (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = std::fs::remove_file(&path);
        }
        for node in &self.nodes {
            let status = Command::new("ip").args(["netns", "del", &node.netns]).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("cleanup: deleting netns {} failed: {status:?}", node.netns);
            }
        }
    }
}

/// A TCP server in the pod namespace at `netns` on `ip:PORT` that answers each of `count`
/// connections with `<name> <client ip>`; gives up after 10 s.
fn serve(netns: PathBuf, ip: IpAddr, name: String, count: usize) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let listener = TcpListener::bind((ip, PORT)).unwrap_or_else(|e| panic!("binding {ip}:{PORT}: {e}"));
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut served = 0;
            while served < count && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream.write_all(format!("{name} {}", peer.ip()).as_bytes()).unwrap();
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accepting on {ip}:{PORT}: {e}"),
                }
            }
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the server did not start listening");
    handle
}

/// Connects from the pod namespace at `netns` to `ip:PORT` and returns the answer.
fn connect(netns: &Path, ip: IpAddr) -> String {
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::new(ip, PORT), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting from {} to {ip}:{PORT}: {e}", netns.display()));
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pods_reach_each_other_within_and_across_nodes_without_nat() {
    let mut cluster = Cluster::new();
    let uids: Vec<String> = (0..4).map(|p| cluster.uid(p)).collect();
    let pods: Vec<(String, PodSandboxNetwork)> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| (uid.clone(), cluster.nodes[i / 2].create(uid)))
        .collect();
    cluster.sync_routes();

    let [a1, a2, b1, b2] = [&pods[0].1, &pods[1].1, &pods[2].1, &pods[3].1];
    assert_eq!(
        (a1.ip, a2.ip),
        ("10.244.1.2".parse().unwrap(), "10.244.1.3".parse().unwrap())
    );
    assert_eq!(
        (b1.ip, b2.ip),
        ("10.244.2.2".parse().unwrap(), "10.244.2.3".parse().unwrap())
    );
    assert_eq!(a1.gateway, "10.244.1.1".parse::<IpAddr>().unwrap());
    assert_eq!(a1.prefix_len, 24);

    // Inside the pod: eth0 with the pod IP, the default route via the gateway.
    let pod_ns = a1.netns.file_name().unwrap().to_str().unwrap();
    let addr = ip(&["-n", pod_ns, "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.244.1.2/24"), "{addr}");
    let routes = ip(&["-n", pod_ns, "route", "show", "default"]);
    assert!(routes.contains("default via 10.244.1.1 dev eth0"), "{routes}");
    // On the node: the /32 to the pod, of our protocol, and the route to the other node.
    let node_routes = cluster.nodes[0].ip(&["route", "show", "proto", &POD_ROUTE_PROTOCOL.to_string()]);
    assert!(
        node_routes.contains(&format!(
            "10.244.1.2 dev {} scope link src 10.244.1.1",
            a1.host_interface
        )),
        "{node_routes}"
    );
    let to_b = cluster.nodes[0].ip(&["route", "show", "proto", &NODE_ROUTE_PROTOCOL.to_string()]);
    assert_eq!(
        to_b.trim(),
        format!("10.244.2.0/24 via 10.250.0.2 dev pn{}a", cluster.id)
    );
    // The configured MTU on both ends of node b's veths, the kernel's on node a's.
    let b1_ns = b1.netns.file_name().unwrap().to_str().unwrap();
    assert!(ip(&["-n", b1_ns, "link", "show", "dev", "eth0"]).contains("mtu 1400 "));
    assert!(
        cluster.nodes[1]
            .ip(&["link", "show", "dev", &b1.host_interface])
            .contains("mtu 1400 ")
    );
    assert!(ip(&["-n", pod_ns, "link", "show", "dev", "eth0"]).contains("mtu 1500 "));

    // Every pod answers every other: same node and across nodes; each sees the client's
    // own pod IP.
    for (server_uid, server) in &pods {
        let handle = serve(server.netns.clone(), server.ip, server_uid.clone(), pods.len() - 1);
        for (_, client) in pods.iter().filter(|(uid, _)| uid != server_uid) {
            let answer = connect(&client.netns, server.ip);
            assert_eq!(
                answer,
                format!("{server_uid} {}", client.ip),
                "{} -> {}",
                client.ip,
                server.ip
            );
        }
        handle.join().unwrap();
    }

    // A pod reaches its node on the gateway address.
    let a = &cluster.nodes[0];
    let handle = serve(a.path(), a1.gateway, "node-a".to_owned(), 1);
    assert_eq!(connect(&a2.netns, a1.gateway), format!("node-a {}", a2.ip));
    handle.join().unwrap();
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_retried_sandbox_keeps_its_ip_and_allocations_survive_reopening() {
    let mut cluster = Cluster::new();
    let (first, second) = (cluster.uid(0), cluster.uid(1));
    let node = &cluster.nodes[0];
    let created = node.create(&first);
    // Again, as a retried RunPodSandbox would: same IP, same namespace, a working veth.
    let again = node.create(&first);
    assert_eq!(again, created);
    // Each with_network call opens the pod network anew (a restarted agent): the live
    // allocation is not handed out again.
    let other = node.create(&second);
    assert_ne!(other.ip, created.ip);
    let held = node.with_network(async |net| {
        let ipam = net.ipam();
        ipam.allocations().map(|(ip, o)| (ip, o.to_owned())).collect::<Vec<_>>()
    });
    assert_eq!(held, vec![(created.ip, first.clone()), (other.ip, second.clone())]);
    let file = node.data.path().join("ipam/10.244.1.0_24").join(created.ip.to_string());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{first}\n"));
    // The veth made on retry works: the two pods talk.
    let handle = serve(created.netns.clone(), created.ip, "first".to_owned(), 1);
    assert_eq!(connect(&other.netns, created.ip), format!("first {}", other.ip));
    handle.join().unwrap();
    let gateway = node.ip(&["-o", "-4", "addr", "show", "dev", "weir0"]);
    assert!(gateway.contains("inet 10.244.1.1/24"), "{gateway}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn delete_removes_netns_veth_route_and_allocation_and_can_be_repeated() {
    let mut cluster = Cluster::new();
    let uid = cluster.uid(0);
    let node = &cluster.nodes[0];
    let pod = node.create(&uid);
    assert!(pod.netns.exists());
    assert!(node.has_link(&pod.host_interface));
    let known = node.with_network(async |net| net.known_pods().unwrap());
    assert!(known.contains(&uid), "{known:?}");

    node.delete(&uid);
    assert!(!pod.netns.exists(), "the netns mount {} is gone", pod.netns.display());
    assert!(
        !node.has_link(&pod.host_interface),
        "veth {} is gone",
        pod.host_interface
    );
    let routes = node.ip(&["route", "show", "proto", &POD_ROUTE_PROTOCOL.to_string()]);
    assert_eq!(routes.trim(), "", "no /32 route is left");
    let (held, known) = node.with_network(async |net| {
        let held = net.ipam().address_of(&uid);
        (held, net.known_pods().unwrap())
    });
    assert_eq!(held, None);
    assert!(!known.contains(&uid), "{known:?}");
    node.delete(&uid);

    // A half-made sandbox: the namespace and an allocation, no veth.
    let half = cluster.uid(1);
    let node = &cluster.nodes[0];
    ip(&["netns", "add", &format!("weir-pod-{half}")]);
    node.with_network(async |net| net.ipam().allocate(&half)).unwrap();
    assert!(node.with_network(async |net| net.known_pods().unwrap()).contains(&half));
    node.delete(&half);
    assert!(!Path::new(NETNS_DIR).join(format!("weir-pod-{half}")).exists());
    assert_eq!(node.with_network(async |net| net.ipam().address_of(&half)), None);
    assert!(!node.has_link(&host_interface_name(&half)));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn node_routes_are_synced_exactly_and_foreign_routes_are_left_alone() {
    let cluster = Cluster::new();
    let node = &cluster.nodes[0];
    let link = format!("pn{}a", cluster.id);
    node.ip(&["route", "add", "10.99.0.0/24", "via", "10.250.0.9"]);
    let route = |cidr: &str, via: &str| NodeRoute {
        cidr: cidr.parse().unwrap(),
        via: via.parse().unwrap(),
    };
    let sync = |routes: Vec<NodeRoute>| {
        node.with_network(async move |net| net.sync_node_routes(&routes).await)
            .unwrap_or_else(|e| panic!("syncing node routes: {e}"));
    };
    let ours = || node.ip(&["route", "show", "proto", &NODE_ROUTE_PROTOCOL.to_string()]);

    sync(vec![
        route("10.244.1.0/24", "10.250.0.1"), // this node's own podCIDR: skipped
        route("10.244.2.0/24", "10.250.0.2"),
        route("10.244.3.0/24", "10.250.0.3"),
    ]);
    assert_eq!(
        ours(),
        format!("10.244.2.0/24 via 10.250.0.2 dev {link} \n10.244.3.0/24 via 10.250.0.3 dev {link} \n")
    );
    sync(vec![
        route("10.244.2.0/24", "10.250.0.2"),
        route("10.244.3.0/24", "10.250.0.4"),
    ]);
    assert_eq!(
        ours(),
        format!("10.244.2.0/24 via 10.250.0.2 dev {link} \n10.244.3.0/24 via 10.250.0.4 dev {link} \n")
    );
    // A podCIDR that someone else routes is not taken over.
    let err = node
        .with_network(async |net| net.sync_node_routes(&[route("10.99.0.0/24", "10.250.0.2")]).await)
        .unwrap_err();
    assert!(err.to_string().contains("did not make"), "{err}");
    sync(vec![]);
    assert_eq!(ours(), "");
    let all = node.ip(&["route", "show"]);
    assert!(
        all.contains("10.99.0.0/24 via 10.250.0.9"),
        "the foreign route stays: {all}"
    );
    // A node IP that is not on an attached network is refused with the reason.
    let err = node
        .with_network(async |net| net.sync_node_routes(&[route("10.244.5.0/24", "10.251.0.5")]).await)
        .unwrap_err();
    assert!(
        err.to_string().contains("not on a network this node is attached to"),
        "{err}"
    );
}
