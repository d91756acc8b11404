//! Privileged tests of the socket-LB datapath: real programs in the real kernel.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`).
//! Each test makes its own network namespace (only `lo`, so a ClusterIP that is not
//! translated is unreachable and no packet can leave the machine), its own cgroup v2
//! directory and pin directory, attaches the programs to that cgroup only, starts backends
//! on 127.x addresses, and runs the client (python3, installed by `cargo xtask setup`) in
//! a child process moved into the cgroup before it connects. Drop guards undo all of it.

mod common;

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weir_agent::datapath::{
    Backend, Capacity, Config, Datapath, DesiredState, Error, LB_ALGORITHM_ANNOTATION, LbAlgorithm, Protocol,
    ServiceKey, ServiceSelection, desired_state,
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

    /// A backend that answers every line on a TCP connection with its own address, for as
    /// long as the connection lasts.
    fn tcp_session_backend(&mut self, address: Ipv4Addr, port: u16) -> Backend {
        self.backends.push(BackendServer::tcp_session(address, port));
        Backend::active(address, port)
    }

    /// Starts `script` in the test cgroup, talking to it over its stdin and stdout.
    fn spawn(&self, script: &str, args: &[&str]) -> ChildProcess {
        let mut cmd = python_in_cgroup(Some(&self.cgroup), script, args);
        ChildProcess::spawn(cmd.stdin(Stdio::piped()))
    }

    /// Starts this test binary as a loader (see [`loader_child_hook`]) that loads the
    /// datapath, reconciles `port` to `backends` and says "ready".
    fn spawn_loader(&self, port: u16, backends: &[Backend]) -> ChildProcess {
        let backends: Vec<String> = backends.iter().map(|b| format!("{}:{}", b.address, b.port)).collect();
        let spec = format!(
            "{}\t{}\t{port}\t{}",
            self.config.cgroup_path.display(),
            self.config.pin_root.display(),
            backends.join(",")
        );
        let mut cmd = Command::new(std::env::current_exe().expect("the test binary's path"));
        cmd.env(LOADER_CHILD_ENV, spec)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        ChildProcess::spawn(&mut cmd)
    }
}

/// A child process this test started, spoken to line by line; killed (by its pid) and
/// reaped on drop if still running.
struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ChildProcess {
    fn spawn(cmd: &mut Command) -> ChildProcess {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("starting a child process");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ChildProcess { child, stdin, stdout }
    }

    /// The next line the child prints; panics when it exits first.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading a child's output");
        assert!(!line.is_empty(), "the child exited: {:?}", self.child.try_wait());
        line.trim_end().to_owned()
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("writing to a child");
    }

    /// Everything the child prints until it exits, which it must do successfully.
    fn rest(mut self) -> Vec<String> {
        self.stdin = None;
        let lines: Vec<String> = (&mut self.stdout).lines().map(Result::unwrap).collect();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the child failed: {status}; it printed {lines:?}");
        lines
    }

    /// SIGKILL, by pid, and reap.
    fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Set in the environment of a loader child: `cgroup\tpin root\tport\tip:port,ip:port`.
const LOADER_CHILD_ENV: &str = "WEIR_TEST_LOADER_CHILD";

// SAFETY: runs once, before main, like any ELF constructor. It reads the environment
// (set up by libc before constructors run) and returns at once unless this process is a
// loader child, which then never reaches main: it runs the loader and exits.
#[used]
#[unsafe(link_section = ".init_array")]
static LOADER_CHILD_HOOK: extern "C" fn() = loader_child_hook;

/// When started with [`LOADER_CHILD_ENV`], this test binary is a datapath loader instead:
/// load, reconcile one TCP service on [`CLUSTER_IP`], print "ready", sleep until killed.
/// (An ELF constructor rather than a test function: a helper must not show up as a test.)
extern "C" fn loader_child_hook() {
    let Ok(spec) = std::env::var(LOADER_CHILD_ENV) else {
        return;
    };
    let error = run_loader_child(&spec);
    eprintln!("loader child: {error}");
    std::process::exit(1);
}

fn run_loader_child(spec: &str) -> String {
    let fields: Vec<&str> = spec.split('\t').collect();
    let [cgroup, pin_root, port, backends] = fields[..] else {
        return format!("bad {LOADER_CHILD_ENV}: {spec:?}");
    };
    let Ok(port) = port.parse() else {
        return format!("bad port {port:?}");
    };
    let mut backends: Vec<Backend> = match backends
        .split(',')
        .map(|b| b.parse::<SocketAddrV4>().map(|b| Backend::active(*b.ip(), b.port())))
        .collect()
    {
        Ok(backends) => backends,
        Err(e) => return format!("bad backends {backends:?}: {e}"),
    };
    backends.sort();
    let config = Config {
        cgroup_path: PathBuf::from(cgroup),
        pin_root: PathBuf::from(pin_root),
        capacity: Capacity::default(),
    };
    let mut datapath = match Datapath::load(&config) {
        Ok(datapath) => datapath,
        Err(e) => return format!("loading the datapath: {e}"),
    };
    let mut desired = DesiredState::default();
    desired.services.insert(tcp_service(port), backends);
    if let Err(e) = datapath.reconcile(&desired) {
        return format!("reconciling: {e}");
    }
    println!("ready");
    if let Err(e) = std::io::stdout().flush() {
        return format!("writing to stdout: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
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
    let mut cmd = python_in_cgroup(cgroup, CLIENT, &[mode, host, &port.to_string(), &count.to_string()]);
    cmd.stdin(Stdio::null());
    let output = cmd
        .output()
        .expect("running the python3 client (cargo xtask setup installs python3)");
    assert!(output.status.success(), "client failed: {}", output.status);
    let stdout = String::from_utf8(output.stdout).unwrap();
    parse_outcomes(stdout.trim())
}

/// `python3 -c script args...`, moved into `cgroup` (when given) before it runs.
fn python_in_cgroup(cgroup: Option<&Path>, script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).args(args).stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        common::run_in_cgroup(&mut cmd, cgroup);
    }
    cmd
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

    fn tcp_session(address: Ipv4Addr, port: u16) -> BackendServer {
        let listener = TcpListener::bind(SocketAddrV4::new(address, port)).expect("binding a TCP backend");
        listener.set_nonblocking(true).unwrap();
        let me = format!("{address}:{port}\n");
        BackendServer::spawn(move |stop| {
            std::thread::scope(|scope| {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let me = me.as_bytes();
                    scope.spawn(move || {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                        let mut writer = &stream;
                        let mut reader = BufReader::new(&stream);
                        let mut line = String::new();
                        while !stop.load(Ordering::Relaxed) {
                            match reader.read_line(&mut line) {
                                Ok(0) => break,
                                Ok(_) if line.ends_with('\n') => {
                                    line.clear();
                                    if writer.write_all(me).is_err() {
                                        break;
                                    }
                                }
                                // A partial line, or the read timed out: look at `stop`, go on.
                                Ok(_) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
            });
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

/// One TCP connection to `argv[1]:argv[2]`; for each number n on stdin, n request/replies,
/// printed on one line (the replies, or `error:ERRNO`).
const SESSION_CLIENT: &str = r#"
import errno, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
for line in sys.stdin:
    replies = []
    for _ in range(int(line)):
        try:
            s.sendall(b"ping\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    raise OSError(0, "closed")
                data += chunk
            replies.append(data.decode().strip())
        except OSError as e:
            replies.append("error:" + errno.errorcode.get(e.errno, "closed"))
    print(" ".join(replies), flush=True)
"#;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_terminating_backend_keeps_its_connections_while_new_ones_go_to_the_active_backend() {
    let mut fx = Fixture::new();
    let a = fx.tcp_session_backend(Ipv4Addr::new(127, 0, 0, 2), 8080);
    let b = fx.tcp_backend(Ipv4Addr::new(127, 0, 0, 3), 8080);
    let mut datapath = fx.load();
    datapath.upsert_service(tcp_service(80), vec![a]).unwrap();
    let mut session = fx.spawn(SESSION_CLIENT, &[&CLUSTER_IP.to_string(), "80"]);
    session.say("3");
    assert_eq!(session.line(), ["127.0.0.2:8080"; 3].join(" "));

    // A starts terminating while B is active.
    let terminating = Backend::terminating(a.address, a.port);
    datapath.upsert_service(tcp_service(80), vec![terminating, b]).unwrap();
    assert_eq!(datapath.backends(&tcp_service(80)), Some(vec![b, terminating]));

    // The established connection goes on with A, before, between and after new
    // connections, all of which go to B (the plain TCP client would time out on A, which
    // waits for a line).
    session.say("5");
    assert_eq!(session.line(), ["127.0.0.2:8080"; 5].join(" "));
    let outcomes = fx.client("tcp", 80, 20);
    assert!(
        reached(&outcomes).iter().all(|h| *h == "127.0.0.3:8080"),
        "{outcomes:?}"
    );
    session.say("5");
    assert_eq!(session.line(), ["127.0.0.2:8080"; 5].join(" "));
    assert!(session.rest().is_empty());
}

/// Three connected UDP sockets: one to the service `argv[1]:argv[2]`, an IPv6 one to the
/// service (connected with an IPv4 address, as glibc's resolver may do: connect4 translates
/// it and its peer reads v4-mapped), one straight to `argv[3]:argv[4]`. Prints one
/// exchange on each; after a line on stdin, one more on each and one on a new socket to
/// the service. An exchange prints the reply, or
/// `send:ERRNO` / `recv:ERRNO` (after a failed send, recv still runs, to show the error the
/// socket holds).
const UDP_STALE_CLIENT: &str = r#"
import ctypes, errno, socket, struct, sys
host, port, direct_host, direct_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def name(e):
    return errno.errorcode.get(e.errno, "timeout" if isinstance(e, socket.timeout) else str(e.errno))
def exchange(s):
    try:
        s.send(b"ping")
    except OSError as e:
        failed = "send:" + name(e)
        try:
            s.recv(256)
        except OSError as e:
            return failed + ",recv:" + name(e)
        return failed
    try:
        return s.recv(256).decode().strip()
    except OSError as e:
        return "recv:" + name(e)
def connected(h, p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((h, p))
    return s
def connected_v6_with_v4_address(h, p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(2)
    sockaddr_in = struct.pack("=H", socket.AF_INET) + struct.pack("!H", p) + socket.inet_aton(h) + bytes(8)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.connect(s.fileno(), sockaddr_in, len(sockaddr_in)) != 0:
        raise OSError(ctypes.get_errno(), "connect")
    return s
service = connected(host, port)
mapped = connected_v6_with_v4_address(host, port)
direct = connected(direct_host, direct_port)
print(exchange(service), exchange(mapped), exchange(direct), flush=True)
sys.stdin.readline()
def fresh():
    try:
        return exchange(connected(host, port))
    except OSError as e:
        return "connect:" + name(e)
print(exchange(service), exchange(mapped), exchange(direct), fresh(), flush=True)
"#;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn connected_udp_sockets_of_a_departed_backend_are_closed_but_direct_ones_are_not() {
    let mut fx = Fixture::new();
    let a = fx.udp_backend(Ipv4Addr::new(127, 0, 0, 3), 5353);
    let b = fx.udp_backend(Ipv4Addr::new(127, 0, 0, 4), 5353);
    let mut datapath = fx.load();
    let dns = ServiceKey {
        address: CLUSTER_IP.into(),
        port: 53,
        protocol: Protocol::Udp,
    };
    datapath.upsert_service(dns, vec![a]).unwrap();
    let mut client = fx.spawn(
        UDP_STALE_CLIENT,
        &[
            &CLUSTER_IP.to_string(),
            "53",
            &a.address.to_string(),
            &a.port.to_string(),
        ],
    );
    assert_eq!(client.line(), "127.0.0.3:5353 127.0.0.3:5353 127.0.0.3:5353");

    // A leaves: the sockets connect4 sent to it are destroyed, the direct one stays. The
    // update runs from another network namespace than the client's, as an agent does on a
    // node whose pods have their own: the sockets are found through the client's pid.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _elsewhere = NetnsGuard::enter();
                let started = std::time::Instant::now();
                datapath.upsert_service(dns, vec![b]).unwrap();
                eprintln!("upsert with the namespace walk: {:?}", started.elapsed());
            })
            .join()
            .unwrap();
    });
    assert_eq!(datapath.destroyed_udp_sockets(), 2);
    client.say("go");
    let after = client.line();
    eprintln!("after A left: service socket, IPv6 service socket, direct socket, new socket: {after}");
    let after: Vec<&str> = after.split(' ').collect();
    assert_eq!(after.len(), 4, "{after:?}");
    // SOCK_DESTROY disconnects the socket (send: EDESTADDRREQ) and leaves ECONNABORTED as
    // its error (recv, as a resolver blocked in recv would see at once).
    assert_eq!(after[0], "send:EDESTADDRREQ,recv:ECONNABORTED", "{after:?}");
    assert_eq!(after[1], "send:EDESTADDRREQ,recv:ECONNABORTED", "{after:?}");
    assert_eq!(
        after[2], "127.0.0.3:5353",
        "the socket connected straight to A is left alone"
    );
    assert_eq!(after[3], "127.0.0.4:5353", "a new socket reaches B");
    assert!(client.rest().is_empty());

    // B leaves too, after its client exited: its entry is found, but no socket is left.
    datapath.upsert_service(dns, vec![a]).unwrap();
    assert_eq!(datapath.destroyed_udp_sockets(), 2);

    // Back to B; then the service goes (reconcile to nothing) while a client holds sockets
    // translated to B: they are closed too, and the ClusterIP is untranslated again.
    datapath.upsert_service(dns, vec![b]).unwrap();
    let mut client = fx.spawn(
        UDP_STALE_CLIENT,
        &[
            &CLUSTER_IP.to_string(),
            "53",
            &b.address.to_string(),
            &b.port.to_string(),
        ],
    );
    assert_eq!(client.line(), "127.0.0.4:5353 127.0.0.4:5353 127.0.0.4:5353");
    datapath.reconcile(&DesiredState::default()).unwrap();
    assert_eq!(datapath.destroyed_udp_sockets(), 4);
    client.say("go");
    assert_eq!(
        client.line(),
        "send:EDESTADDRREQ,recv:ECONNABORTED send:EDESTADDRREQ,recv:ECONNABORTED 127.0.0.4:5353 connect:ENETUNREACH"
    );
    assert!(client.rest().is_empty());
}

/// Connects to `argv[1]:argv[2]` over and over (connect, read the reply to EOF, close),
/// until "stop" (or EOF) on stdin; "mark" starts phase 1. Prints `total N`, `failed N
/// ERRNO...` (the first five), and `phaseP BACKEND COUNT` lines.
const LOAD_CLIENT: &str = r#"
import errno, select, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
phase, counts, failed, errors, total = 0, [{}, {}], 0, [], 0
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        if sys.stdin.readline().strip() == "mark":
            phase = 1
            continue
        break
    total += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, port))
        data = b""
        while True:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        backend = data.decode().strip()
        if not backend:
            raise OSError(0, "empty reply")
        counts[phase][backend] = counts[phase].get(backend, 0) + 1
    except OSError as e:
        failed += 1
        if len(errors) < 5:
            errors.append(errno.errorcode.get(e.errno, str(e).replace(" ", "_")))
    finally:
        s.close()
print("total", total)
print("failed", failed, *errors)
for p in (0, 1):
    for backend, n in sorted(counts[p].items()):
        print("phase%d" % p, backend, n)
"#;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn no_request_fails_while_the_loader_is_killed_and_restarted() {
    let mut fx = Fixture::new();
    let old: Vec<Backend> = (2..=3)
        .map(|last| fx.tcp_backend(Ipv4Addr::new(127, 0, 0, last), 8080))
        .collect();
    let new: Vec<Backend> = (4..=5)
        .map(|last| fx.tcp_backend(Ipv4Addr::new(127, 0, 0, last), 8080))
        .collect();
    let mut loader = fx.spawn_loader(80, &old);
    assert_eq!(loader.line(), "ready");
    let mut load = fx.spawn(LOAD_CLIENT, &[&CLUSTER_IP.to_string(), "80"]);
    std::thread::sleep(Duration::from_millis(300));

    // Each round SIGKILLs the running loader; most start one more and kill it after a few
    // milliseconds (a loader gets from exec to "ready" in 2-5 ms here, so this lands while
    // it loads or reconciles), then a loader runs to "ready". The backends flip between
    // old and new four times, and end new.
    let rounds: [(&[Backend], Option<u64>); 8] = [
        (&old, None),
        (&old, Some(0)),
        (&new, Some(2)),
        (&old, Some(3)),
        (&new, Some(4)),
        (&new, Some(1)),
        (&old, Some(2)),
        (&new, None),
    ];
    let mut kills = 0;
    let mut ready_ms = Vec::new();
    for (backends, early_kill_ms) in rounds {
        loader.kill();
        kills += 1;
        if let Some(ms) = early_kill_ms {
            let doomed = fx.spawn_loader(80, backends);
            std::thread::sleep(Duration::from_millis(ms));
            doomed.kill();
            kills += 1;
        }
        let started = std::time::Instant::now();
        loader = fx.spawn_loader(80, backends);
        assert_eq!(loader.line(), "ready");
        ready_ms.push(started.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(200));
    }
    load.say("mark");
    std::thread::sleep(Duration::from_millis(300));
    load.say("stop");
    let report = load.rest();
    loader.kill();

    let value = |prefix: &str| -> Vec<String> {
        let line = report.iter().find(|l| l.starts_with(prefix)).expect("a report line");
        line.split(' ').skip(1).map(str::to_owned).collect()
    };
    let total: usize = value("total ")[0].parse().unwrap();
    let failed = value("failed ");
    eprintln!("load loop: {total} requests, {kills} loader kills, restart to ready (ms) {ready_ms:?}, {report:?}");
    assert_eq!(failed[0], "0", "requests failed while the loader restarted: {report:?}");
    assert!(total > 100, "the load loop ran: {report:?}");
    let backends_in = |phase: &str| -> Vec<String> {
        report
            .iter()
            .filter_map(|l| l.strip_prefix(phase))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect()
    };
    let before = backends_in("phase0 ");
    assert!(
        before
            .iter()
            .any(|b| b.starts_with("127.0.0.2") || b.starts_with("127.0.0.3")),
        "{report:?}"
    );
    assert!(
        before
            .iter()
            .any(|b| b.starts_with("127.0.0.4") || b.starts_with("127.0.0.5")),
        "{report:?}"
    );
    let after = backends_in("phase1 ");
    assert!(!after.is_empty(), "{report:?}");
    assert!(
        after
            .iter()
            .all(|b| b.starts_with("127.0.0.4") || b.starts_with("127.0.0.5")),
        "traffic moved to the new backends: {report:?}"
    );
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

/// `service_host port direct_host direct_port` over IPv6: a UDP socket connected to the
/// service and one connected straight to the backend, one exchange each; after a line on
/// stdin, both again and a fresh socket to the service.
const UDP6_STALE_CLIENT: &str = r#"
import errno, socket, sys
host, port, direct_host, direct_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def name(e):
    return errno.errorcode.get(e.errno, "timeout" if isinstance(e, socket.timeout) else str(e.errno))
def exchange(s):
    try:
        s.send(b"ping")
        return s.recv(256).decode().strip()
    except OSError as e:
        return "err:" + name(e)
def connected(h, p):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((h, p))
    return s
service = connected(host, port)
direct = connected(direct_host, direct_port)
print(exchange(service), exchange(direct), flush=True)
sys.stdin.readline()
print(exchange(service), exchange(direct), exchange(connected(host, port)), flush=True)
"#;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn connected_ipv6_udp_sockets_of_a_departed_backend_are_closed_too() {
    let mut fx = Fixture::new();
    let (a, b) = (fx.ula(3), fx.ula(4));
    let a = fx.udp_backend(a, 5353);
    let b = fx.udp_backend(b, 5353);
    let mut datapath = fx.load();
    let dns = ServiceKey {
        address: CLUSTER_IP6.into(),
        port: 53,
        protocol: Protocol::Udp,
    };
    datapath.upsert_service(dns, vec![a]).unwrap();
    let args = [
        CLUSTER_IP6.to_string(),
        "53".to_owned(),
        a.address.to_string(),
        a.port.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut client = fx.spawn(UDP6_STALE_CLIENT, &args);
    assert_eq!(client.line(), "[fd00:10::3]:5353 [fd00:10::3]:5353");

    datapath.upsert_service(dns, vec![b]).unwrap();
    assert_eq!(datapath.destroyed_udp_sockets(), 1, "only the translated socket");
    client.say("go");
    let after = client.line();
    let after: Vec<&str> = after.split(' ').collect();
    assert!(after[0].starts_with("err:"), "the stale socket is closed: {after:?}");
    assert_eq!(after[1], "[fd00:10::3]:5353", "the direct socket is left alone");
    assert_eq!(after[2], "[fd00:10::4]:5353", "a new socket reaches B");
}
