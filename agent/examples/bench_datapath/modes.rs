//! The ways a connection reaches the backend, and how each is programmed with N services:
//! the datapath's maps (socket-LB, TC, XDP), kube-proxy's iptables rules (nft and legacy)
//! and IPVS. Everything is written into the measurement's own node namespace.

use std::fmt;
use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::ValueEnum;
use weir_agent::datapath::{
    Backend, Capacity, DesiredState, ExternalConfig, ExternalMode, Protocol, ServiceKey, ServiceSelection,
    XdpAttachment, XdpPolicy,
};

use crate::topology::{BACKEND, NODE_IP, NODE_POD_SIDE_IP, NetnsGuard, Topology, ip};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Mode {
    /// Straight to the backend's address: the baseline.
    Direct,
    /// ClusterIP, translated at connect() by the cgroup programs.
    SocketLb,
    /// NodePort on the node's client-facing interface, TC only.
    Tc,
    /// The same NodePort, XDP (native, on the veth) in front of TC.
    Xdp,
    /// ClusterIP through kube-proxy-style DNAT rules, iptables-nft-restore.
    IptablesNft,
    /// The same rules through iptables-legacy-restore.
    IptablesLegacy,
    /// ClusterIP through IPVS (ipvsadm, masquerading), VIPs on a dummy interface.
    Ipvs,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Direct,
        Mode::SocketLb,
        Mode::Tc,
        Mode::Xdp,
        Mode::IptablesNft,
        Mode::IptablesLegacy,
        Mode::Ipvs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::SocketLb => "socket-lb",
            Mode::Tc => "tc",
            Mode::Xdp => "xdp",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::Ipvs => "ipvs",
        }
    }

    /// Whether the client runs in the cgroup the socket-LB programs are attached to.
    pub fn client_in_cgroup(self) -> bool {
        self == Mode::SocketLb
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The port of every ClusterIP and LoadBalancer frontend.
pub const SERVICE_PORT: u16 = 80;
/// The measured service's NodePort (TC and XDP).
pub const NODE_PORT: u16 = 30080;
/// The most services the address plan below has room for (198.18.0.0/15).
pub const MAX_SERVICES: usize = 1 << 17;

/// N services: service `i` has ClusterIP 10.96.0.0+1+i and one backend 10.128.0.0+1+i:8080
/// (never connected to), and as its external frontend LoadBalancer IP 198.18.0.0+i:80 —
/// except the measured one, in the middle (index N/2), whose backend is the real server and
/// whose external frontend is the NodePort on the node. Rules and map entries are written
/// in index order, so the measured service sits in the middle of KUBE-SERVICES.
pub struct Catalog {
    pub size: usize,
    pub measured: usize,
}

impl Catalog {
    pub fn new(size: usize) -> Catalog {
        Catalog {
            size,
            measured: size / 2,
        }
    }

    pub fn cluster_ip(&self, i: usize) -> Ipv4Addr {
        offset(Ipv4Addr::new(10, 96, 0, 0), 1 + i)
    }

    pub fn backend(&self, i: usize) -> SocketAddrV4 {
        if i == self.measured {
            BACKEND
        } else {
            SocketAddrV4::new(offset(Ipv4Addr::new(10, 128, 0, 0), 1 + i), BACKEND.port())
        }
    }

    fn external_frontend(&self, i: usize) -> SocketAddrV4 {
        if i == self.measured {
            SocketAddrV4::new(NODE_IP, NODE_PORT)
        } else {
            SocketAddrV4::new(offset(Ipv4Addr::new(198, 18, 0, 0), i), SERVICE_PORT)
        }
    }

    /// IPv4 map sizes with room for these services (one backend each), never below the
    /// defaults a node starts with.
    fn capacity(&self) -> Capacity {
        let default = Capacity::default();
        let needed = Capacity::for_services(u32::try_from(self.size).unwrap_or(u32::MAX), 1);
        Capacity {
            services: default.services.max(needed.services),
            service_slots: default.service_slots.max(needed.service_slots),
            backends: default.backends.max(needed.backends),
            ..default
        }
    }

    /// Where the client connects in `mode`.
    pub fn target(&self, mode: Mode) -> SocketAddrV4 {
        match mode {
            Mode::Direct => BACKEND,
            Mode::Tc | Mode::Xdp => self.external_frontend(self.measured),
            Mode::SocketLb | Mode::IptablesNft | Mode::IptablesLegacy | Mode::Ipvs => {
                SocketAddrV4::new(self.cluster_ip(self.measured), SERVICE_PORT)
            }
        }
    }

    /// The services as the datapath gets them: ClusterIPs, or external frontends.
    fn desired(&self, external: bool) -> DesiredState {
        let mut desired = DesiredState::default();
        for i in 0..self.size {
            let frontend = if external {
                self.external_frontend(i)
            } else {
                SocketAddrV4::new(self.cluster_ip(i), SERVICE_PORT)
            };
            let key = ServiceKey {
                address: (*frontend.ip()).into(),
                port: frontend.port(),
                protocol: Protocol::Tcp,
            };
            let backend = self.backend(i);
            desired
                .services
                .insert(key, vec![Backend::active(*backend.ip(), backend.port())]);
            if external {
                let selection = ServiceSelection {
                    external: true,
                    ..ServiceSelection::default()
                };
                desired.selections.insert(key, selection);
            }
        }
        desired
    }

    /// kube-proxy's iptables mode (nat table) for these services, one endpoint each, as
    /// `iptables-save` shows it: KUBE-SERVICES jumped to from PREROUTING and OUTPUT, one
    /// `-d VIP -p tcp --dport P -j KUBE-SVC-x` per service, KUBE-SVC-x → KUBE-SEP-y with the
    /// masquerade marks and the DNAT. Chain names have kube-proxy's shape (prefix and 16
    /// characters), not its hash. The pod CIDR holds client and backend (pod-to-service
    /// traffic, no masquerade), as for socket-LB. kube-proxy's filter-table rules are left out:
    /// they do not depend on the number of services.
    pub fn iptables_rules(&self) -> String {
        use fmt::Write as _;
        const POD_CIDR: &str = "10.0.0.0/8";
        let mut chains = String::new();
        let mut rules = String::new();
        let w = |s: &mut String, args: fmt::Arguments<'_>| s.write_fmt(args).expect("writing to a String");
        for i in 0..self.size {
            let (svc, sep) = (format!("KUBE-SVC-{i:016X}"), format!("KUBE-SEP-{i:016X}"));
            w(&mut chains, format_args!(":{svc} - [0:0]\n:{sep} - [0:0]\n"));
            let (vip, backend) = (self.cluster_ip(i), self.backend(i));
            let comment = format!("\"bench/svc-{i}:http cluster IP\"");
            w(
                &mut rules,
                format_args!(
                    "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment {comment} -m tcp --dport {SERVICE_PORT} -j {svc}\n\
                     -A {svc} ! -s {POD_CIDR} -d {vip}/32 -p tcp -m comment --comment {comment} -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ\n\
                     -A {svc} -m comment --comment \"bench/svc-{i}:http -> {backend}\" -j {sep}\n\
                     -A {sep} -s {ip}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ\n\
                     -A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {backend}\n",
                    ip = backend.ip(),
                ),
            );
        }
        format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
             {chains}\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             {rules}\
             -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
             COMMIT\n"
        )
    }

    /// `ipvsadm --restore` input: a virtual server per ClusterIP (round robin, as
    /// kube-proxy), its backend in masquerading (NAT) mode.
    fn ipvs_rules(&self) -> String {
        let mut out = String::new();
        for i in 0..self.size {
            let vip = SocketAddrV4::new(self.cluster_ip(i), SERVICE_PORT);
            let backend = self.backend(i);
            out.push_str(&format!("-A -t {vip} -s rr\n-a -t {vip} -r {backend} -m -w 1\n"));
        }
        out
    }
}

fn offset(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(i).expect("fewer than 2^32 services"))
}

/// Why a mode was not measured.
#[derive(Debug)]
pub enum NotMeasured {
    /// It cannot run on this machine (a tool or kernel feature is missing): skipped for the
    /// rest of the benchmark.
    Unavailable(String),
    /// This attempt failed (e.g. the services do not fit the maps).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for NotMeasured {
    fn from(error: anyhow::Error) -> NotMeasured {
        NotMeasured::Failed(error)
    }
}

/// Why `mode` cannot run here at all, found without building a topology.
pub fn unavailable(mode: Mode) -> Option<String> {
    let missing = |binary: &str, package: &str| {
        find_on_path(binary)
            .is_none()
            .then(|| format!("unavailable: {binary} not found; install Debian's {package} (`cargo xtask setup` does)"))
    };
    match mode {
        Mode::Direct | Mode::SocketLb | Mode::Tc | Mode::Xdp => None,
        Mode::IptablesNft => missing("iptables-nft-restore", "iptables"),
        Mode::IptablesLegacy => missing("iptables-legacy-restore", "iptables"),
        Mode::Ipvs => missing("ipvsadm", "ipvsadm").or_else(ipvs_unavailable),
    }
}

/// IPVS needs the kernel's IP Virtual Server: /proc/net/ip_vs appears once it is loaded.
fn ipvs_unavailable() -> Option<String> {
    let present = || Path::new("/proc/net/ip_vs").exists();
    if present() {
        return None;
    }
    if find_on_path("modprobe").is_some() {
        let _ = Command::new("modprobe")
            .arg("ip_vs")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if present() {
            return None;
        }
    }
    let built_without = read_kernel_config().is_some_and(|config| config.contains("# CONFIG_IP_VS is not set"));
    Some(if built_without {
        "unavailable: kernel built without CONFIG_IP_VS (IP Virtual Server)".to_owned()
    } else {
        "unavailable: /proc/net/ip_vs is missing and `modprobe ip_vs` did not load IP Virtual Server".to_owned()
    })
}

/// The running kernel's build configuration, from /proc/config.gz (gunzip: no crate for one
/// read) or /boot.
fn read_kernel_config() -> Option<String> {
    if Path::new("/proc/config.gz").exists() {
        let out = Command::new("gzip")
            .args(["-dc", "/proc/config.gz"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        return out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// How long programming N services took.
#[derive(Clone, Copy, Debug)]
pub struct Programming {
    /// Wall time: what the target is about.
    pub wall: Duration,
    /// CPU time spent on it (user and system; this thread's for map writes, the restore
    /// process's otherwise): a busy machine stretches it less than the wall time.
    pub cpu: Duration,
}

/// Programs `catalog`'s services for `mode` into `topology` and returns how long the
/// programming itself took (`None` for direct): the map writes of one
/// `Datapath::reconcile` from empty, or one run of the restore command.
pub fn program(mode: Mode, topology: &mut Topology, catalog: &Catalog) -> Result<Option<Programming>, NotMeasured> {
    match mode {
        Mode::Direct => Ok(None),
        Mode::SocketLb => program_maps(topology, catalog, None).map(Some),
        Mode::Tc => program_maps(topology, catalog, Some(XdpPolicy::Off)).map(Some),
        Mode::Xdp => program_maps(topology, catalog, Some(XdpPolicy::Native)).map(Some),
        Mode::IptablesNft => program_iptables(topology, catalog, "iptables-nft").map(Some),
        Mode::IptablesLegacy => program_iptables(topology, catalog, "iptables-legacy").map(Some),
        Mode::Ipvs => program_ipvs(topology, catalog).map(Some),
    }
}

/// ClusterIPs (`external` None) or external frontends with TC (and XDP by the policy)
/// attached to the node's client-facing interface.
fn program_maps(
    topology: &mut Topology,
    catalog: &Catalog,
    external: Option<XdpPolicy>,
) -> Result<Programming, NotMeasured> {
    let desired = catalog.desired(external.is_some());
    let ext = topology.ext.clone();
    // TC and XDP attach by interface name, which resolves in the node's namespace.
    let _in_node = NetnsGuard::enter(&topology.node)?;
    let datapath = topology.load_datapath(catalog.capacity())?;
    if let Some(xdp) = external {
        let config = ExternalConfig {
            interfaces: vec![ext],
            snat_address: NODE_POD_SIDE_IP,
            snat_ports: 61000..=61999,
            xdp,
            mode: ExternalMode::Snat,
        };
        let report = datapath
            .attach_external(&config)
            .context("attaching TC/XDP to the node's client-facing veth")?;
        if xdp == XdpPolicy::Native && report.iter().any(|a| a.xdp != XdpAttachment::Native) {
            return Err(anyhow!("XDP did not attach in native mode: {report:?}").into());
        }
    }
    let (started, cpu) = (Instant::now(), thread_cpu_time());
    let result = datapath.reconcile(&desired);
    let took = Programming {
        wall: started.elapsed(),
        cpu: thread_cpu_time().saturating_sub(cpu),
    };
    result.map_err(|e| {
        anyhow!(
            "{} services do not fit the datapath maps: {e}",
            crate::report::thousands(catalog.size as f64)
        )
    })?;
    Ok(took)
}

fn program_iptables(topology: &Topology, catalog: &Catalog, variant: &str) -> Result<Programming, NotMeasured> {
    // The kernel side (nf_tables or ip_tables with the nat table) may be missing even where
    // the tools are installed.
    let probe = topology
        .node
        .command(variant)
        .args(["-t", "nat", "-S"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {variant}"))?;
    if !probe.status.success() {
        return Err(NotMeasured::Unavailable(format!(
            "unavailable: `{variant} -t nat -S` failed: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        )));
    }
    let rules = RulesFile::write(&topology.id, variant, &catalog.iptables_rules())?;
    let restore = format!("{variant}-restore");
    timed(topology.node.command(&restore).stdin(rules.open()?), &restore).map_err(NotMeasured::Failed)
}

fn program_ipvs(topology: &Topology, catalog: &Catalog) -> Result<Programming, NotMeasured> {
    // kube-proxy binds every ClusterIP to the dummy kube-ipvs0, so the node accepts them
    // locally where IPVS picks them up. Not timed: only the IPVS programming is.
    let node = &topology.node.name;
    ip(&["-n", node, "link", "add", "kube-ipvs0", "type", "dummy"]).map_err(|e| {
        NotMeasured::Unavailable(format!("unavailable: creating the dummy interface kube-ipvs0: {e:#}"))
    })?;
    let mut addresses = String::new();
    for i in 0..catalog.size {
        addresses.push_str(&format!("address add {}/32 dev kube-ipvs0\n", catalog.cluster_ip(i)));
    }
    let batch = RulesFile::write(&topology.id, "ipvs-addresses", &addresses)?;
    let batch_path = batch.path.to_string_lossy().into_owned();
    ip(&["-n", node, "-batch", &batch_path])?;
    let rules = RulesFile::write(&topology.id, "ipvs", &catalog.ipvs_rules())?;
    timed(
        topology.node.command("ipvsadm").arg("--restore").stdin(rules.open()?),
        "ipvsadm --restore",
    )
    .map_err(NotMeasured::Failed)
}

/// Runs `cmd` (stdin already set) and returns its wall time, process start included (as
/// kube-proxy pays it too), and its CPU time.
fn timed(cmd: &mut Command, what: &str) -> Result<Programming> {
    // The benchmark waits for one child at a time, so the growth of the reaped children's
    // CPU time is this command's.
    let (started, cpu) = (Instant::now(), children_cpu_time());
    let output = cmd
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    let took = Programming {
        wall: started.elapsed(),
        cpu: children_cpu_time().saturating_sub(cpu),
    };
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(took)
}

fn thread_cpu_time() -> Duration {
    // SAFETY: clock_gettime with a valid clock id and out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// User and system time of the children reaped so far.
fn children_cpu_time() -> Duration {
    // SAFETY: getrusage with a valid `who` and a properly sized out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let micros = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// Restore input written to a file first, so the timed command reads it at disk-cache
/// speed instead of waiting on our writes; removed on drop.
struct RulesFile {
    path: PathBuf,
}

impl RulesFile {
    fn write(id: &str, what: &str, contents: &str) -> Result<RulesFile> {
        let path = std::env::temp_dir().join(format!("weir-bench-{id}-{what}.rules"));
        let rules = RulesFile { path };
        File::create(&rules.path)
            .and_then(|mut f| f.write_all(contents.as_bytes()))
            .with_context(|| format!("writing {}", rules.path.display()))?;
        Ok(rules)
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_service_is_in_the_middle_of_kube_services() {
        let catalog = Catalog::new(5);
        let rules = catalog.iptables_rules();
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d "))
            .collect();
        assert_eq!(services.len(), 5);
        let target = catalog.target(Mode::IptablesNft);
        assert!(services[2].contains(&format!("-d {}/32", target.ip())), "{services:?}");
        assert!(rules.contains(&format!("--to-destination {BACKEND}")));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn every_service_has_distinct_frontends_and_backends() {
        let catalog = Catalog::new(1000);
        for external in [false, true] {
            let desired = catalog.desired(external);
            assert_eq!(desired.services.len(), 1000);
            let backends: std::collections::BTreeSet<_> = desired.services.values().collect();
            assert_eq!(backends.len(), 1000);
        }
        assert_eq!(catalog.target(Mode::Tc), SocketAddrV4::new(NODE_IP, NODE_PORT));
        assert_eq!(Catalog::new(1).measured, 0);
    }
}
