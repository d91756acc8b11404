//! Privileged tests of the socket-LB datapath: real programs in the real kernel.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`).
//! Each test makes its own network namespace (only `lo`, so a ClusterIP that is not
//! translated is unreachable and no packet can leave the machine), its own cgroup v2
//! directory and pin directory, attaches the programs to that cgroup only, starts backends
//! on 127.x addresses, and runs the client (python3, installed by `cargo xtask setup`) in
//! a child process moved into the cgroup before it connects. Drop guards undo all of it.

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weir_agent::datapath::{
    Backend, Capacity, Config, Datapath, Error, LB_ALGORITHM_ANNOTATION, LbAlgorithm, Protocol, ServiceKey,
    ServiceSelection, desired_state,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 123, 45);

/// The client: `mode host port count`; prints one JSON list with, per attempt, the
/// backend that answered and the peer address the socket reported, or the errno name.
const CLIENT: &str = r#"
import errno, json, socket, sys, time
mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
def show(a):
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % a[:2]
out = []
def fail(e, started):
    return {"error": errno.errorcode.get(e.errno, str(e.errno)), "ms": (time.monotonic() - started) * 1000}
for _ in range(count):
    started = time.monotonic()
    if mode == "tcp":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            peer = s.getpeername()
            data = b""
            while True:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            out.append({"backend": data.decode().strip(), "peer": show(peer)})
        except OSError as e:
            out.append(fail(e, started))
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(5)
        try:
            if mode == "udp-connected":
                s.connect((host, port))
                s.send(b"ping")
                data = s.recv(256)
                src = s.getpeername()
            else:
                s.sendto(b"ping", (host, port))
                data, src = s.recvfrom(256)
            out.append({"backend": data.decode().strip(), "peer": show(src)})
        except OSError as e:
            out.append(fail(e, started))
    s.close()
print(json.dumps(out))
"#;

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// `backend` answered; the socket said its peer was `peer`.
    Reached {
        backend: String,
        peer: String,
    },
    Failed {
        errno: String,
        ms: f64,
    },
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Everything one test owns; dropping it detaches, unpins, removes the cgroup and leaves
/// the network namespace.
struct Fixture {
    config: Config,
    cgroup: PathBuf,
    backends: Vec<BackendServer>,
    _netns: NetnsGuard,
}

impl Fixture {
    fn new() -> Fixture {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the datapath tests need root: run `cargo xtask test` as root"
        );
        let netns = NetnsGuard::enter();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("weir-test-{}-{n}", std::process::id());
        let cgroup = cgroup2_root().join(&name);
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cgroup.display()));
        Fixture {
            config: Config {
                cgroup_path: cgroup.clone(),
                pin_root: PathBuf::from("/sys/fs/bpf").join(&name),
                capacity: Capacity::default(),
            },
            cgroup,
            backends: Vec::new(),
            _netns: netns,
        }
    }

    fn load(&self) -> Datapath {
        Datapath::load(&self.config).unwrap_or_else(|e| panic!("loading the datapath: {e}"))
    }

    fn tcp_backend(&mut self, address: impl Into<IpAddr>, port: u16) -> Backend {
        let address = address.into();
        self.backends.push(BackendServer::tcp(address, port));
        Backend::active(address, port)
    }

    fn udp_backend(&mut self, address: impl Into<IpAddr>, port: u16) -> Backend {
        let address = address.into();
        self.backends.push(BackendServer::udp(address, port));
        Backend::active(address, port)
    }

    /// Runs the client inside the test cgroup.
    fn client(&self, mode: &str, port: u16, count: usize) -> Vec<Outcome> {
        run_client(Some(&self.cgroup), mode, port, count)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for backend in self.backends.drain(..) {
            backend.stop();
        }
        if let Err(e) = Datapath::uninstall(&self.config) {
            eprintln!("cleanup: removing pins under {}: {e}", self.config.pin_root.display());
        }
        // The links are gone with their pins; the cgroup is empty once the clients exited.
        for attempt in 0.. {
            match std::fs::remove_dir(&self.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if attempt < 50 => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("cleanup: removing cgroup {}: {e}", self.cgroup.display());
                    break;
                }
            }
        }
    }
}

fn run_client(cgroup: Option<&Path>, mode: &str, port: u16, count: usize) -> Vec<Outcome> {
    run_client_to(cgroup, mode, &CLUSTER_IP.to_string(), port, count)
}

/// [`run_client`] to `host` (an IPv6 host makes the client use IPv6 sockets).
fn run_client_to(cgroup: Option<&Path>, mode: &str, host: &str, port: u16, count: usize) -> Vec<Outcome> {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", CLIENT, mode, host, &port.to_string(), &count.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close);
        // "0" moves the writing process itself, so nothing is formatted or allocated.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    let output = cmd
        .output()
        .expect("running the python3 client (cargo xtask setup installs python3)");
    assert!(output.status.success(), "client failed: {}", output.status);
    let stdout = String::from_utf8(output.stdout).unwrap();
    parse_outcomes(stdout.trim())
}

/// A tiny reader for the client's one-line JSON (`[{"backend": "..", "peer": ".."}, ...]`).
fn parse_outcomes(json: &str) -> Vec<Outcome> {
    let field = |object: &str, name: &str| -> Option<String> {
        let start = object.find(&format!("\"{name}\": "))? + name.len() + 4;
        let rest = &object[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            Some(quoted[..quoted.find('"')?].to_owned())
        } else {
            Some(rest[..rest.find([',', '}']).unwrap_or(rest.len())].trim().to_owned())
        }
    };
    json.trim_start_matches('[')
        .trim_end_matches(']')
        .split("}, {")
        .filter(|object| !object.trim().is_empty())
        .map(|object| match field(object, "error") {
            Some(errno) => Outcome::Failed {
                errno,
                ms: field(object, "ms").and_then(|ms| ms.parse().ok()).unwrap_or(f64::NAN),
            },
            None => Outcome::Reached {
                backend: field(object, "backend").unwrap_or_default(),
                peer: field(object, "peer").unwrap_or_default(),
            },
        })
        .collect()
}

fn reached(outcomes: &[Outcome]) -> Vec<&str> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Reached { backend, .. } => backend.as_str(),
            Outcome::Failed { errno, .. } => panic!("a connection failed with {errno}: {outcomes:?}"),
        })
        .collect()
}

fn tcp_service(port: u16) -> ServiceKey {
    ServiceKey {
        address: CLUSTER_IP.into(),
        port,
        protocol: Protocol::Tcp,
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

/// A backend that answers every TCP connection or UDP datagram with its own address.
struct BackendServer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl BackendServer {
    fn tcp(address: IpAddr, port: u16) -> BackendServer {
        let me = SocketAddr::new(address, port);
        let listener = TcpListener::bind(me).unwrap_or_else(|e| panic!("binding a TCP backend on {me}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let me = me.to_string();
        BackendServer::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(me.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })
    }

    fn udp(address: IpAddr, port: u16) -> BackendServer {
        let me = SocketAddr::new(address, port);
        let socket = UdpSocket::bind(me).unwrap_or_else(|e| panic!("binding a UDP backend on {me}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let me = me.to_string();
        BackendServer::spawn(move |stop| {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(me.as_bytes(), from);
                }
            }
        })
    }

    fn spawn(serve: impl FnOnce(&AtomicBool) + Send + 'static) -> BackendServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(&flag));
        BackendServer { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Moves the calling thread (and the threads and processes it starts) into a new network
/// namespace with only `lo` up; goes back on drop.
struct NetnsGuard {
    original: OwnedFd,
}

impl NetnsGuard {
    fn enter() -> NetnsGuard {
        let original: OwnedFd = File::open("/proc/thread-self/ns/net")
            .expect("opening our netns")
            .into();
        // SAFETY: plain syscalls; CLONE_NEWNET affects only the calling thread.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNET),
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
        }
        set_loopback_up();
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

fn set_loopback_up() {
    #[repr(C)]
    struct IfreqFlags {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut req = IfreqFlags {
        name: [0; 16],
        flags: 0,
        pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: an ifreq-shaped buffer for SIOC[GS]IFFLAGS on a socket we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0, "SIOCGIFFLAGS lo");
        req.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req), 0, "SIOCSIFFLAGS lo");
        libc::close(fd);
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tcp_connect_to_cluster_ip_reaches_the_backend_and_getpeername_shows_the_service() {
    let mut fx = Fixture::new();
    let backend = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let mut datapath = fx.load();
    datapath.upsert_service(tcp_service(80), vec![backend]).unwrap();

    let outcomes = fx.client("tcp", 80, 3);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Reached {
                backend: "127.0.0.2:8080".to_owned(),
                peer: format!("{CLUSTER_IP}:80"),
            };
            3
        ]
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn processes_outside_the_cgroup_are_not_translated() {
    let mut fx = Fixture::new();
    let backend = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let mut datapath = fx.load();
    datapath.upsert_service(tcp_service(80), vec![backend]).unwrap();

    // The test's netns has only lo: an untranslated ClusterIP has no route at all.
    let outcomes = run_client(None, "tcp", 80, 1);
    assert!(
        matches!(&outcomes[..], [Outcome::Failed { errno, .. }] if errno == "ENETUNREACH"),
        "{outcomes:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn udp_replies_appear_to_come_from_the_service_address() {
    let mut fx = Fixture::new();
    let backend = fx.udp_backend(Ipv4Addr::new(127, 0, 0, 3), 5353);
    let mut datapath = fx.load();
    let dns = ServiceKey {
        address: CLUSTER_IP.into(),
        port: 53,
        protocol: Protocol::Udp,
    };
    datapath.upsert_service(dns, vec![backend]).unwrap();

    let expected = Outcome::Reached {
        backend: "127.0.0.3:5353".to_owned(),
        peer: format!("{CLUSTER_IP}:53"),
    };
    assert_eq!(fx.client("udp", 53, 3), vec![expected.clone(); 3], "unconnected UDP");
    assert_eq!(fx.client("udp-connected", 53, 3), vec![expected; 3], "connected UDP");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn two_backends_share_the_connections_and_a_removed_one_gets_no_more() {
    let mut fx = Fixture::new();
    let a = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let b = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 3), 8080);
    let mut datapath = fx.load();
    datapath.upsert_service(tcp_service(80), vec![a, b]).unwrap();

    let outcomes = fx.client("tcp", 80, 40);
    let hits = reached(&outcomes);
    let to_a = hits.iter().filter(|h| **h == "127.0.0.2:8080").count();
    let to_b = hits.iter().filter(|h| **h == "127.0.0.3:8080").count();
    assert_eq!(to_a + to_b, 40, "{hits:?}");
    // Random choice: P(one backend gets none of 40) = 2^-39.
    assert!(to_a > 0 && to_b > 0, "a: {to_a}, b: {to_b}");

    let writes = datapath.upsert_service(tcp_service(80), vec![a]).unwrap();
    assert!(writes > 0);
    let outcomes = fx.client("tcp", 80, 20);
    assert!(
        reached(&outcomes).iter().all(|h| *h == "127.0.0.2:8080"),
        "{outcomes:?}"
    );
    assert_eq!(datapath.backends(&tcp_service(80)), Some(vec![a]));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn maglev_keeps_a_client_on_one_backend_and_moves_it_only_when_that_backend_goes() {
    let mut fx = Fixture::new();
    let all: Vec<Backend> = (2..=4)
        .map(|last| fx.tcp_backend(Ipv4Addr::new(127, 0, 0, last), 8080))
        .collect();
    let mut datapath = fx.load();
    let writes = datapath
        .upsert_service_with(tcp_service(80), all.clone(), maglev())
        .unwrap();
    assert!(writes >= 16381, "the Maglev table is written: {writes} writes");

    // One client (one netns): every connection goes to the same backend. At random,
    // P(30 connections agree) = 3^-29.
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    let chosen = hits[0].to_owned();
    assert!(hits.iter().all(|h| *h == chosen), "{hits:?}");

    // The same table again writes nothing.
    assert_eq!(
        datapath
            .upsert_service_with(tcp_service(80), all.clone(), maglev())
            .unwrap(),
        0
    );

    // Its backend goes: the client moves, again all together, to one of the others.
    let rest: Vec<Backend> = all
        .iter()
        .copied()
        .filter(|b| format!("{}:{}", b.address, b.port) != chosen)
        .collect();
    assert_eq!(rest.len(), 2);
    datapath
        .upsert_service_with(tcp_service(80), rest.clone(), maglev())
        .unwrap();
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    let moved = hits[0].to_owned();
    assert_ne!(moved, chosen);
    assert!(hits.iter().all(|h| *h == moved), "{hits:?}");

    // Back to random: the same client is spread again (P(30 agree) = 3^-29), and the
    // table is gone.
    let writes = datapath
        .upsert_service_with(tcp_service(80), all.clone(), ServiceSelection::default())
        .unwrap();
    assert!(writes >= 16381, "the Maglev table is removed: {writes} writes");
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    assert!(hits.iter().any(|h| *h != hits[0]), "{hits:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_lb_algorithm_annotation_makes_a_reconciled_service_maglev() {
    let mut fx = Fixture::new();
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 3), 8080);
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 4), 8080);
    let mut service = k8s_service("web", 80);
    service.metadata.annotations = Some([(LB_ALGORITHM_ANNOTATION.to_owned(), "maglev".to_owned())].into());
    let slice = k8s_slice("web", &["127.0.0.2", "127.0.0.3", "127.0.0.4"], 8080);
    let desired = desired_state(&[service], &[slice]);
    let mut datapath = fx.load();
    datapath.reconcile(&desired).unwrap();
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    assert!(hits.iter().all(|h| *h == hits[0]), "{hits:?}");

    // A new loader (the agent restarted) finds the table in place and writes nothing.
    drop(datapath);
    let mut datapath = fx.load();
    assert_eq!(datapath.reconcile(&desired).unwrap(), 0);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn client_ip_affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let mut fx = Fixture::new();
    let all: Vec<Backend> = (2..=4)
        .map(|last| fx.tcp_backend(Ipv4Addr::new(127, 0, 0, last), 8080))
        .collect();
    let mut datapath = fx.load();
    let affinity = ServiceSelection {
        algorithm: LbAlgorithm::Random,
        affinity_timeout: Some(1),
        ..ServiceSelection::default()
    };
    datapath
        .upsert_service_with(tcp_service(80), all.clone(), affinity)
        .unwrap();

    // Random selection, but one client: every connection follows the first one. At
    // random, P(30 connections agree) = 3^-29. Reconnecting keeps refreshing the entry.
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    let first = hits[0].to_owned();
    assert!(hits.iter().all(|h| *h == first), "{hits:?}");
    let outcomes = fx.client("tcp", 80, 10);
    assert!(reached(&outcomes).iter().all(|h| *h == first), "{outcomes:?}");

    // Rounds separated by more than the timeout start afresh: over 8 rounds some round
    // picks another backend (P(all 8 pick the first again) = 3^-8), and each round sticks.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        let outcomes = fx.client("tcp", 80, 5);
        let hits = reached(&outcomes);
        assert!(hits.iter().all(|h| *h == hits[0]), "{hits:?}");
        seen.insert(hits[0].to_owned());
    }
    assert!(seen.len() > 1, "after the timeout the choice is fresh: {seen:?}");

    // The client's backend leaves the service: its affinity goes with it, at once.
    let outcomes = fx.client("tcp", 80, 1);
    let current = reached(&outcomes)[0].to_owned();
    let rest: Vec<Backend> = all
        .iter()
        .copied()
        .filter(|b| format!("{}:{}", b.address, b.port) != current)
        .collect();
    datapath.upsert_service_with(tcp_service(80), rest, affinity).unwrap();
    let outcomes = fx.client("tcp", 80, 10);
    let hits = reached(&outcomes);
    assert!(hits.iter().all(|h| *h == hits[0] && *h != current), "{hits:?}");

    // Without affinity the same client is spread again.
    datapath
        .upsert_service_with(tcp_service(80), all, ServiceSelection::default())
        .unwrap();
    let outcomes = fx.client("tcp", 80, 30);
    let hits = reached(&outcomes);
    assert!(hits.iter().any(|h| *h != hits[0]), "{hits:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_service_without_backends_refuses_connections_at_once() {
    let fx = Fixture::new();
    let mut datapath = fx.load();
    datapath.upsert_service(tcp_service(80), Vec::new()).unwrap();

    let outcomes = fx.client("tcp", 80, 3);
    for outcome in &outcomes {
        match outcome {
            Outcome::Failed { errno, ms } => {
                assert_eq!(errno, "ECONNREFUSED", "{outcomes:?}");
                assert!(*ms < 500.0, "refusal took {ms} ms");
            }
            other => panic!("expected ECONNREFUSED, got {other:?}"),
        }
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn terminating_backends_take_traffic_only_when_no_backend_is_active() {
    let mut fx = Fixture::new();
    let active = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let draining = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 3), 8080);
    let draining = Backend::terminating(draining.address, draining.port);
    let mut datapath = fx.load();
    datapath
        .upsert_service(tcp_service(80), vec![active, draining])
        .unwrap();
    assert!(
        reached(&fx.client("tcp", 80, 20))
            .iter()
            .all(|h| *h == "127.0.0.2:8080")
    );

    datapath.upsert_service(tcp_service(80), vec![draining]).unwrap();
    assert!(reached(&fx.client("tcp", 80, 5)).iter().all(|h| *h == "127.0.0.3:8080"));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn translation_outlives_the_loader_and_a_new_load_reconciles_only_differences() {
    let mut fx = Fixture::new();
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 4), 8080);
    let services = [k8s_service("web", 80)];
    let first = [k8s_slice("web", &["127.0.0.2"], 8080)];

    let mut datapath = fx.load();
    let writes = datapath.reconcile(&desired_state(&services, &first)).unwrap();
    assert!(writes > 0);
    drop(datapath);

    // No Datapath object exists now: the pinned links and maps keep translating.
    assert!(reached(&fx.client("tcp", 80, 5)).iter().all(|h| *h == "127.0.0.2:8080"));

    // A new agent reopens the pins, finds the service, and rewrites only what changed.
    let mut datapath = fx.load();
    assert_eq!(datapath.services(), vec![tcp_service(80)]);
    assert_eq!(datapath.reconcile(&desired_state(&services, &first)).unwrap(), 0);
    let second = [k8s_slice("web", &["127.0.0.4"], 8080)];
    let writes = datapath.reconcile(&desired_state(&services, &second)).unwrap();
    // One backend in, one out: backend, slot, backend removal.
    assert_eq!(writes, 3);
    assert!(reached(&fx.client("tcp", 80, 5)).iter().all(|h| *h == "127.0.0.4:8080"));

    // A service that leaves the desired state leaves the maps: connects go untranslated.
    assert_eq!(datapath.reconcile(&desired_state(&[], &[])).unwrap(), 4);
    assert!(datapath.services().is_empty());
    let outcomes = fx.client("tcp", 80, 1);
    assert!(
        matches!(&outcomes[..], [Outcome::Failed { errno, .. }] if errno == "ENETUNREACH"),
        "{outcomes:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn load_explains_a_missing_cgroup_and_a_pin_root_off_bpffs() {
    let fx = Fixture::new();
    let missing = Config {
        cgroup_path: fx.cgroup.join("does-not-exist"),
        ..fx.config.clone()
    };
    let err = Datapath::load(&missing).err().expect("a missing cgroup must fail");
    assert!(matches!(err, Error::NoCgroup2 { .. }), "{err}");
    assert!(err.to_string().contains("mount -t cgroup2"), "{err}");

    let v1 = Config {
        cgroup_path: PathBuf::from("/proc"),
        ..fx.config.clone()
    };
    let err = Datapath::load(&v1).err().expect("a non-cgroup2 directory must fail");
    assert!(matches!(err, Error::NoCgroup2 { .. }), "{err}");

    let off_bpffs = Config {
        pin_root: std::env::temp_dir().join("weir-not-bpffs"),
        ..fx.config.clone()
    };
    let err = Datapath::load(&off_bpffs)
        .err()
        .expect("a pin root off bpffs must fail");
    assert!(matches!(err, Error::NoBpfFs { .. }), "{err}");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}

fn maglev() -> ServiceSelection {
    ServiceSelection {
        algorithm: LbAlgorithm::Maglev,
        affinity_timeout: None,
        ..ServiceSelection::default()
    }
}

fn k8s_service(name: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(CLUSTER_IP.to_string()),
            ports: Some(vec![ServicePort {
                port,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn k8s_slice(service: &str, addresses: &[&str], port: i32) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-x1")),
            namespace: Some("default".to_owned()),
            labels: Some([("kubernetes.io/service-name".to_owned(), service.to_owned())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(
            addresses
                .iter()
                .map(|address| Endpoint {
                    addresses: vec![(*address).to_owned()],
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(port),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn map_capacity_is_set_at_creation_kept_by_the_pins_and_a_full_map_says_what_to_raise() {
    let mut fx = Fixture::new();
    fx.config.capacity = Capacity {
        services: 3,
        service_slots: 16,
        backends: 8,
        ..Capacity::default()
    };
    let backend = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let mut datapath = fx.load();
    for port in 1..=3 {
        datapath.upsert_service(tcp_service(port), vec![backend]).unwrap();
    }
    let err = datapath.upsert_service(tcp_service(4), vec![backend]).unwrap_err();
    assert!(matches!(err, Error::IdsExhausted(_)), "{err}");
    assert!(err.to_string().contains("raise datapath::Capacity::services"), "{err}");
    assert_eq!(
        datapath.services().len(),
        3,
        "a refused service must leave the others alone"
    );
    drop(datapath);

    // Reopened with a larger configured capacity: the pinned maps keep their size.
    fx.config.capacity = Capacity::default();
    let mut datapath = fx.load();
    assert!(datapath.upsert_service(tcp_service(4), vec![backend]).is_err());
    datapath.remove_service(&tcp_service(1)).unwrap();
    datapath.upsert_service(tcp_service(4), vec![backend]).unwrap();
    let outcomes = fx.client("tcp", 4, 2);
    assert_eq!(reached(&outcomes), ["127.0.0.2:8080", "127.0.0.2:8080"]);
}

// IPv6 socket-LB. Backends listen on ::1 and on ULA addresses the test adds to lo in its
// own netns; the IPv6 ClusterIP has no route there, so an untranslated connect fails.

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x45);

/// `fd00:10::<last>`, added to lo by [`Fixture::ula`].
fn ula(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, last)
}

impl Fixture {
    /// Adds `fd00:10::<last>/128` to lo in the test's netns (gone with the netns) and
    /// returns it.
    fn ula(&self, last: u16) -> Ipv6Addr {
        let address = ula(last);
        let status = Command::new("ip")
            .args(["-6", "addr", "add", &format!("{address}/128"), "dev", "lo", "nodad"])
            .status()
            .expect("running ip (iproute2)");
        assert!(status.success(), "adding {address} to lo: {status}");
        address
    }

    /// Runs the client inside the test cgroup against `host`.
    fn client_to(&self, mode: &str, host: impl std::fmt::Display, port: u16, count: usize) -> Vec<Outcome> {
        run_client_to(Some(&self.cgroup), mode, &host.to_string(), port, count)
    }
}

fn service6(port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        address: CLUSTER_IP6.into(),
        port,
        protocol,
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_tcp_to_a_cluster_ip_reaches_the_backend_and_getpeername_shows_the_service() {
    let mut fx = Fixture::new();
    let address = fx.ula(2);
    let backend = fx.tcp_backend(address, 8080);
    let mut datapath = fx.load();
    datapath
        .upsert_service(service6(80, Protocol::Tcp), vec![backend])
        .unwrap();
    assert_eq!(datapath.backends(&service6(80, Protocol::Tcp)), Some(vec![backend]));

    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 3);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Reached {
                backend: "[fd00:10::2]:8080".to_owned(),
                peer: "[fd00:96::45]:80".to_owned(),
            };
            3
        ]
    );
    // Outside the cgroup nothing is translated, and the ClusterIP has no route.
    let outcomes = run_client_to(None, "tcp", &CLUSTER_IP6.to_string(), 80, 1);
    assert!(
        matches!(&outcomes[..], [Outcome::Failed { errno, .. }] if errno == "ENETUNREACH"),
        "{outcomes:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_udp_replies_appear_to_come_from_the_service_address() {
    let mut fx = Fixture::new();
    let backend = fx.udp_backend(Ipv6Addr::LOCALHOST, 5353);
    let mut datapath = fx.load();
    datapath
        .upsert_service(service6(53, Protocol::Udp), vec![backend])
        .unwrap();

    let expected = Outcome::Reached {
        backend: "[::1]:5353".to_owned(),
        peer: "[fd00:96::45]:53".to_owned(),
    };
    assert_eq!(
        fx.client_to("udp", CLUSTER_IP6, 53, 3),
        vec![expected.clone(); 3],
        "unconnected UDP"
    );
    assert_eq!(
        fx.client_to("udp-connected", CLUSTER_IP6, 53, 3),
        vec![expected; 3],
        "connected UDP"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_ipv6_service_without_backends_refuses_connections_at_once() {
    let fx = Fixture::new();
    let mut datapath = fx.load();
    datapath
        .upsert_service(service6(80, Protocol::Tcp), Vec::new())
        .unwrap();

    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 3);
    assert_eq!(outcomes.len(), 3);
    for outcome in &outcomes {
        match outcome {
            Outcome::Failed { errno, ms } => {
                assert_eq!(errno, "ECONNREFUSED", "{outcomes:?}");
                assert!(*ms < 500.0, "refusal took {ms} ms");
            }
            other => panic!("expected ECONNREFUSED, got {other:?}"),
        }
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_maglev_keeps_a_client_on_one_backend_and_moves_it_only_when_that_backend_goes() {
    let mut fx = Fixture::new();
    let all: Vec<Backend> = (2..=4)
        .map(|last| {
            let address = fx.ula(last);
            fx.tcp_backend(address, 8080)
        })
        .collect();
    let mut datapath = fx.load();
    let key = service6(80, Protocol::Tcp);
    let writes = datapath.upsert_service_with(key, all.clone(), maglev()).unwrap();
    assert!(writes >= 16381, "the Maglev table is written: {writes} writes");

    // One client: every connection to the same backend (at random P = 3^-29).
    let hits = fx.client_to("tcp", CLUSTER_IP6, 80, 30);
    let hits = reached(&hits);
    let chosen = hits[0].to_owned();
    assert!(hits.iter().all(|h| *h == chosen), "{hits:?}");

    let rest: Vec<Backend> = all
        .iter()
        .copied()
        .filter(|b| b.socket_addr().to_string() != chosen)
        .collect();
    assert_eq!(rest.len(), 2);
    datapath.upsert_service_with(key, rest, maglev()).unwrap();
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 30);
    let hits = reached(&outcomes);
    assert_ne!(hits[0], chosen);
    assert!(hits.iter().all(|h| *h == hits[0]), "{hits:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_client_ip_affinity_keeps_a_client_on_its_backend() {
    let mut fx = Fixture::new();
    let all: Vec<Backend> = (2..=4)
        .map(|last| {
            let address = fx.ula(last);
            fx.tcp_backend(address, 8080)
        })
        .collect();
    let mut datapath = fx.load();
    let key = service6(80, Protocol::Tcp);
    let affinity = ServiceSelection {
        affinity_timeout: Some(60),
        ..ServiceSelection::default()
    };
    datapath.upsert_service_with(key, all.clone(), affinity).unwrap();
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 30);
    let hits = reached(&outcomes);
    assert!(hits.iter().all(|h| *h == hits[0]), "{hits:?}");

    // Without affinity the same client is spread (P(30 agree) = 3^-29).
    datapath
        .upsert_service_with(key, all, ServiceSelection::default())
        .unwrap();
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 30);
    let hits = reached(&outcomes);
    assert!(hits.iter().any(|h| *h != hits[0]), "{hits:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_dual_stack_service_reconciled_from_kubernetes_objects_is_reached_over_both_families() {
    let mut fx = Fixture::new();
    fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let address = fx.ula(2);
    fx.tcp_backend(address, 8080);
    let mut service = k8s_service("web", 80);
    let spec = service.spec.as_mut().unwrap();
    spec.cluster_ips = Some(vec![CLUSTER_IP.to_string(), CLUSTER_IP6.to_string()]);
    spec.ip_families = Some(vec!["IPv4".to_owned(), "IPv6".to_owned()]);
    spec.ip_family_policy = Some("RequireDualStack".to_owned());
    let mut slice6 = k8s_slice("web", &["fd00:10::2"], 8080);
    slice6.metadata.name = Some("web-v6".to_owned());
    slice6.address_type = "IPv6".to_owned();
    let services = [service];
    let slices = [k8s_slice("web", &["127.0.0.2"], 8080), slice6];
    let desired = desired_state(&services, &slices);

    let mut datapath = fx.load();
    assert!(datapath.reconcile(&desired).unwrap() > 0);
    assert_eq!(datapath.services().len(), 2, "{:?}", datapath.services());
    let expect = |backend: &str, peer: &str| {
        vec![
            Outcome::Reached {
                backend: backend.to_owned(),
                peer: peer.to_owned(),
            };
            3
        ]
    };
    assert_eq!(
        fx.client("tcp", 80, 3),
        expect("127.0.0.2:8080", "10.96.123.45:80"),
        "IPv4"
    );
    assert_eq!(
        fx.client_to("tcp", CLUSTER_IP6, 80, 3),
        expect("[fd00:10::2]:8080", "[fd00:96::45]:80"),
        "IPv6"
    );
    // A dual-stack IPv6 socket reaches the IPv4 ClusterIP through its IPv4-mapped address.
    assert_eq!(
        fx.client_to("tcp", CLUSTER_IP.to_ipv6_mapped(), 80, 3),
        expect("127.0.0.2:8080", "[::ffff:10.96.123.45]:80"),
        "IPv4-mapped"
    );

    // A new agent reads both families back from the pins and writes nothing.
    drop(datapath);
    let mut datapath = fx.load();
    assert_eq!(datapath.reconcile(&desired).unwrap(), 0);
    // And removes both when the Service goes.
    assert_eq!(datapath.reconcile(&desired_state(&[], &[])).unwrap(), 8);
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 1);
    assert!(
        matches!(&outcomes[..], [Outcome::Failed { errno, .. }] if errno == "ENETUNREACH"),
        "{outcomes:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv4_mapped_udp_from_a_dual_stack_socket_is_translated_both_ways() {
    let mut fx = Fixture::new();
    let backend = fx.udp_backend(Ipv4Addr::new(127, 0, 0, 3), 5353);
    let mut datapath = fx.load();
    let dns = ServiceKey {
        address: CLUSTER_IP.into(),
        port: 53,
        protocol: Protocol::Udp,
    };
    datapath.upsert_service(dns, vec![backend]).unwrap();
    let expected = Outcome::Reached {
        backend: "127.0.0.3:5353".to_owned(),
        peer: "[::ffff:10.96.123.45]:53".to_owned(),
    };
    let mapped = CLUSTER_IP.to_ipv6_mapped();
    assert_eq!(
        fx.client_to("udp", mapped, 53, 3),
        vec![expected.clone(); 3],
        "unconnected UDP"
    );
    assert_eq!(
        fx.client_to("udp-connected", mapped, 53, 3),
        vec![expected; 3],
        "connected UDP"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_frontends_cannot_be_external_or_ipv4_mapped_and_backends_must_share_the_service_family() {
    let fx = Fixture::new();
    let mut datapath = fx.load();
    let external = ServiceSelection {
        external: true,
        ..ServiceSelection::default()
    };
    let err = datapath
        .upsert_service_with(service6(80, Protocol::Tcp), Vec::new(), external)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert!(err.to_string().contains("TC and XDP translate IPv4 only"), "{err}");

    let err = datapath
        .upsert_service(
            service6(80, Protocol::Tcp),
            vec![Backend::active(Ipv4Addr::LOCALHOST, 80)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("must be of its address family"), "{err}");

    let mapped = ServiceKey {
        address: CLUSTER_IP.to_ipv6_mapped().into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let err = datapath.upsert_service(mapped, Vec::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("give the service its IPv4 address 10.96.123.45"),
        "{err}"
    );
    assert!(datapath.services().is_empty());
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_ipv6_maps_are_sized_on_their_own_and_a_full_one_says_what_to_raise() {
    let mut fx = Fixture::new();
    fx.config.capacity = Capacity {
        services6: 1,
        service_slots6: 4,
        backends6: 2,
        ..Capacity::default()
    };
    let backend = fx.tcp_backend(Ipv6Addr::LOCALHOST, 8080);
    let mut datapath = fx.load();
    datapath
        .upsert_service(service6(80, Protocol::Tcp), vec![backend])
        .unwrap();
    let err = datapath
        .upsert_service(service6(81, Protocol::Tcp), vec![backend])
        .unwrap_err();
    assert!(err.to_string().contains("raise datapath::Capacity::services6"), "{err}");
    // IPv4 has its own room.
    let backend4 = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    datapath.upsert_service(tcp_service(80), vec![backend4]).unwrap();
    assert_eq!(reached(&fx.client_to("tcp", CLUSTER_IP6, 80, 1)), ["[::1]:8080"]);
    assert_eq!(reached(&fx.client("tcp", 80, 1)), ["127.0.0.2:8080"]);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_terminating_backends_take_traffic_only_when_no_backend_is_active() {
    let mut fx = Fixture::new();
    let (a, b) = (fx.ula(2), fx.ula(3));
    let active = fx.tcp_backend(a, 8080);
    let draining = fx.tcp_backend(b, 8080);
    let draining = Backend::terminating(draining.address, draining.port);
    let mut datapath = fx.load();
    let key = service6(80, Protocol::Tcp);
    datapath.upsert_service(key, vec![active, draining]).unwrap();
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 20);
    assert!(
        reached(&outcomes).iter().all(|h| *h == "[fd00:10::2]:8080"),
        "{outcomes:?}"
    );

    datapath.upsert_service(key, vec![draining]).unwrap();
    let outcomes = fx.client_to("tcp", CLUSTER_IP6, 80, 5);
    assert!(
        reached(&outcomes).iter().all(|h| *h == "[fd00:10::3]:8080"),
        "{outcomes:?}"
    );
}
