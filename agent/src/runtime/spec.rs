//! The OCI runtime spec (runc's config.json) of one container, built from a
//! [`ContainerConfig`] and the image's defaults. Pure: no containerd, no files, so unit
//! tests check every rule. containerd-client carries the spec as opaque JSON; the typed
//! structs come from `oci-spec`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice, LinuxDeviceBuilder,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use super::Error;
use super::image::ImageDefaults;

/// Everything the agent decides about one container.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    /// containerd's container id; unique in the namespace (the agent derives it from the
    /// pod uid, the container name and the restart count).
    pub id: String,
    /// The image reference, as given (normalised before use: `busybox` is
    /// `docker.io/library/busybox:latest`).
    pub image: String,
    /// Labels on the containerd container, e.g. [`super::POD_UID_LABEL`] and
    /// [`super::CONTAINER_NAME_LABEL`], so a restarted agent recognises its own.
    pub labels: BTreeMap<String, String>,
    /// Kubernetes `command`: replaces the image's ENTRYPOINT (and drops its CMD).
    pub command: Option<Vec<String>>,
    /// Kubernetes `args`: replaces the image's CMD.
    pub args: Option<Vec<String>>,
    /// `NAME=value` pairs, after the image's own; a later name wins.
    pub env: Vec<(String, String)>,
    /// Kubernetes `workingDir`; the image's, else `/`, when `None`.
    pub working_dir: Option<String>,
    /// `runAsUser`; the image's numeric USER, else 0, when `None`.
    pub uid: Option<u32>,
    /// `runAsGroup`; the image's group, else 0, when `None`.
    pub gid: Option<u32>,
    /// Supplementary groups (`supplementalGroups`, `fsGroup`).
    pub additional_gids: Vec<u32>,
    /// The UTS hostname.
    pub hostname: Option<String>,
    /// Bind mounts from the host (volumes).
    pub mounts: Vec<BindMount>,
    /// Which network namespace the container joins.
    pub network: NetworkNamespace,
    /// runc's cgroupsPath, e.g. `/weir/pod<uid>/<container>` (cgroupfs driver: the same
    /// relative path in every v1 hierarchy, or under the v2 root).
    pub cgroups_path: Option<String>,
    /// CPU and memory limits.
    pub resources: Resources,
    /// securityContext.
    pub security: Security,
    /// The file the container's stdout and stderr are appended to (the shim writes it, so
    /// it keeps filling while containerd or the agent restart).
    pub log_path: PathBuf,
}

/// A host path mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    /// The host path.
    pub source: PathBuf,
    /// The path inside the container.
    pub destination: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// The network namespace of a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetworkNamespace {
    /// A new, empty one (only `lo`, down): a container without a pod network.
    #[default]
    New,
    /// Join the one at this path, e.g. the pod's `/var/run/netns/<name>`.
    Path(PathBuf),
    /// The host's (`hostNetwork: true`).
    Host,
}

/// cgroup limits; `None` leaves the runtime's default (unlimited).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// cpu.shares (v1) / weight (v2, converted by runc): Kubernetes gives
    /// `max(2, requests.cpu millicores * 1024 / 1000)`.
    pub cpu_shares: Option<u64>,
    /// CFS quota in µs per period: `limits.cpu millicores * period / 1000`.
    pub cpu_quota: Option<i64>,
    /// CFS period in µs (Kubernetes: 100000).
    pub cpu_period: Option<u64>,
    /// memory.limit_in_bytes (v1) / memory.max (v2).
    pub memory_limit: Option<i64>,
    /// pids.max.
    pub pids_limit: Option<i64>,
}

/// securityContext, as far as the runtime spec carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    /// Every capability, all devices allowed, /sys writable, nothing masked.
    pub privileged: bool,
    /// The root file system is mounted read-only.
    pub readonly_rootfs: bool,
    /// Capabilities added to the default set, as Kubernetes names them (`NET_ADMIN`; a
    /// `CAP_` prefix is accepted; `ALL` means every one).
    pub add_capabilities: Vec<String>,
    /// Capabilities removed from the default set (`ALL` removes every one first).
    pub drop_capabilities: Vec<String>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
}

/// containerd's and Docker's default capability set, which Kubernetes pods get.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability runc 1.1 knows, indexed by number (capabilities(7), 0 to 40).
const ALL_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The paths runc hides from unprivileged containers (containerd's defaults).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// The paths runc mounts read-only in unprivileged containers (containerd's defaults).
const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// The process a container runs after Kubernetes' rules merged it with the image's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedProcess {
    /// argv.
    pub args: Vec<String>,
    /// `NAME=value`.
    pub env: Vec<String>,
    /// The working directory.
    pub cwd: String,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

/// Kubernetes' rules: `command` replaces ENTRYPOINT and drops CMD; `args` replaces CMD;
/// env appends to the image's, a later name replacing an earlier one in place.
pub fn resolve_process(config: &ContainerConfig, image: &ImageDefaults) -> Result<ResolvedProcess, Error> {
    let args = match (&config.command, &config.args) {
        (Some(command), Some(args)) => command.iter().chain(args).cloned().collect(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => image.entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect::<Vec<_>>(),
    };
    if args.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "container {}: nothing to run: the image {} has no ENTRYPOINT or CMD; give the container a command",
            config.id, config.image
        )));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let image_env = image.env.iter().map(|kv| match kv.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (kv.clone(), String::new()),
    });
    for (name, value) in image_env.chain(config.env.iter().cloned()) {
        match env.iter_mut().find(|(n, _)| *n == name) {
            Some(existing) => existing.1 = value,
            None => env.push((name, value)),
        }
    }
    let (image_uid, image_gid) = parse_image_user(&image.user)?;
    let cwd = config
        .working_dir
        .clone()
        .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()))
        .unwrap_or_else(|| "/".into());
    Ok(ResolvedProcess {
        args,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd,
        uid: config.uid.or(image_uid).unwrap_or(0),
        gid: config.gid.or(image_gid).unwrap_or(0),
    })
}

/// The image's USER: `uid`, `uid:gid`, or empty. Names would need the image's /etc/passwd;
/// the error says to set runAsUser instead.
fn parse_image_user(user: &str) -> Result<(Option<u32>, Option<u32>), Error> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let numeric = |s: &str| {
        s.parse::<u32>().map_err(|_| {
            Error::InvalidSpec(format!(
                "the image's USER {user:?} is not numeric and user names are not looked up in the image; set \
                 securityContext.runAsUser (and runAsGroup)"
            ))
        })
    };
    Ok((Some(numeric(u)?), g.map(numeric).transpose()?))
}

/// The capability set after privileged, add and drop (containerd CRI's order: `ALL` in add,
/// then `ALL` in drop, then single adds, then single drops).
pub fn capabilities(security: &Security) -> Result<HashSet<Capability>, Error> {
    let parse = |name: &str| -> Result<Capability, Error> {
        let bare = name.trim().to_ascii_uppercase();
        let bare = bare.strip_prefix("CAP_").unwrap_or(&bare);
        Capability::from_str(bare).map_err(|_| {
            Error::InvalidSpec(format!(
                "unknown capability {name:?}: use the names of capabilities(7) without CAP_, e.g. NET_ADMIN"
            ))
        })
    };
    // `privileged` and `ALL` mean every capability the agent itself may hold (as containerd's
    // CRI does): runc cannot grant more, and fails the whole container if asked to.
    let bounding = own_bounding_set();
    let all = || {
        ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(number, _)| bounding & (1u64 << number) != 0)
            .map(|(_, c)| parse(c))
            .collect::<Result<HashSet<_>, _>>()
    };
    if security.privileged {
        return all();
    }
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    let mut caps = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| parse(c))
        .collect::<Result<HashSet<_>, _>>()?;
    if security.add_capabilities.iter().any(is_all) {
        caps = all()?;
    }
    if security.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    for add in security.add_capabilities.iter().filter(|c| !is_all(c)) {
        caps.insert(parse(add)?);
    }
    for drop in security.drop_capabilities.iter().filter(|c| !is_all(c)) {
        caps.remove(&parse(drop)?);
    }
    Ok(caps)
}

/// The host's device nodes under /dev, which a privileged container gets (as containerd's
/// CRI does): char and block devices, without the pseudo-terminals of the host's sessions.
pub fn host_devices() -> Vec<LinuxDevice> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let mut devices = Vec::new();
    let mut dirs = vec![PathBuf::from("/dev")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            // /dev/pts and /dev/shm, /dev/mqueue are the container's own mounts; /dev/console
            // belongs to the host's terminal.
            if ["/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/console"]
                .iter()
                .any(|p| path == Path::new(p))
            {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let file_type = meta.file_type();
            if file_type.is_dir() {
                dirs.push(path);
                continue;
            }
            let typ = if file_type.is_char_device() {
                LinuxDeviceType::C
            } else if file_type.is_block_device() {
                LinuxDeviceType::B
            } else {
                continue;
            };
            let rdev = meta.rdev();
            let device = LinuxDeviceBuilder::default()
                .path(path)
                .typ(typ)
                .major(i64::from(libc::major(rdev)))
                .minor(i64::from(libc::minor(rdev)))
                .file_mode(meta.mode() & 0o7777)
                .uid(meta.uid())
                .gid(meta.gid())
                .build();
            if let Ok(device) = device {
                devices.push(device);
            }
        }
    }
    devices.sort_by(|a, b| a.path().cmp(b.path()));
    devices
}

/// The agent's capability bounding set (`CapBnd` of /proc/self/status), all bits when it
/// cannot be read.
fn own_bounding_set() -> u64 {
    static SET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SET.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("CapBnd:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .unwrap_or(u64::MAX)
    })
}

/// The runtime spec. The root path is `rootfs`, where the shim mounts the snapshot.
/// `host_devices` (from [`host_devices`]) are given to privileged containers only.
pub fn runtime_spec(
    config: &ContainerConfig,
    image: &ImageDefaults,
    host_devices: &[LinuxDevice],
) -> Result<Spec, Error> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        Error::InvalidSpec(format!(
            "container {}: building the runtime spec ({what}): {e}",
            config.id
        ))
    };
    let process = resolve_process(config, image)?;
    let caps = capabilities(&config.security)?;
    let linux_caps = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        // The builder's defaults would put some in the ambient set, which hands them to
        // non-root users; containerd gives none.
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(|e| invalid("capabilities", &e))?;
    let user = UserBuilder::default()
        .uid(process.uid)
        .gid(process.gid)
        .additional_gids(config.additional_gids.clone())
        .build()
        .map_err(|e| invalid("user", &e))?;
    let oci_process = ProcessBuilder::default()
        .terminal(false)
        .args(process.args)
        .env(process.env)
        .cwd(process.cwd)
        .user(user)
        .capabilities(linux_caps)
        .no_new_privileges(config.security.no_new_privileges)
        // No rlimits: the process inherits containerd's (as under CRI), not the builder's
        // 1024 open files.
        .rlimits(Vec::new())
        .build()
        .map_err(|e| invalid("process", &e))?;

    let mut mounts = default_mounts(config.security.privileged).map_err(|e| invalid("mounts", &e))?;
    for bind in &config.mounts {
        let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
        options.push(if bind.readonly { "ro" } else { "rw" }.to_string());
        mounts.push(
            MountBuilder::default()
                .destination(&bind.destination)
                .typ("bind")
                .source(&bind.source)
                .options(options)
                .build()
                .map_err(|e| invalid("bind mount", &e))?,
        );
    }

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(|e| invalid("namespace", &e))?,
        );
    }
    match &config.network {
        NetworkNamespace::Host => {}
        NetworkNamespace::New => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .build()
                .map_err(|e| invalid("namespace", &e))?,
        ),
        NetworkNamespace::Path(path) => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(path)
                .build()
                .map_err(|e| invalid("namespace", &e))?,
        ),
    }

    // Deny every device, then runc adds its defaults (null, zero, full, tty, random,
    // urandom, ptmx, pts) to the cgroup and /dev; privileged containers get all.
    let devices = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(config.security.privileged)
            .access("rwm")
            .build()
            .map_err(|e| invalid("devices", &e))?,
    ];
    let r = &config.resources;
    let mut resources = LinuxResourcesBuilder::default().devices(devices);
    if r.cpu_shares.is_some() || r.cpu_quota.is_some() || r.cpu_period.is_some() {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(shares) = r.cpu_shares {
            cpu = cpu.shares(shares);
        }
        if let Some(quota) = r.cpu_quota {
            cpu = cpu.quota(quota);
        }
        if let Some(period) = r.cpu_period {
            cpu = cpu.period(period);
        }
        resources = resources.cpu(cpu.build().map_err(|e| invalid("cpu", &e))?);
    }
    if let Some(limit) = r.memory_limit {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .map_err(|e| invalid("memory", &e))?,
        );
    }
    if let Some(limit) = r.pids_limit {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(limit)
                .build()
                .map_err(|e| invalid("pids", &e))?,
        );
    }

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(|e| invalid("resources", &e))?);
    if let Some(path) = &config.cgroups_path {
        linux = linux.cgroups_path(PathBuf::from(path));
    }
    if config.security.privileged && !host_devices.is_empty() {
        linux = linux.devices(host_devices.to_vec());
    }
    // Set either way: oci-spec's builder would otherwise fill in its own defaults.
    let (masked, readonly): (&[&str], &[&str]) = if config.security.privileged {
        (&[], &[])
    } else {
        (MASKED_PATHS, READONLY_PATHS)
    };
    linux = linux
        .masked_paths(masked.iter().map(|p| p.to_string()).collect::<Vec<_>>())
        .readonly_paths(readonly.iter().map(|p| p.to_string()).collect::<Vec<_>>());

    let mut spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(config.security.readonly_rootfs)
                .build()
                .map_err(|e| invalid("root", &e))?,
        )
        .process(oci_process)
        .mounts(mounts)
        .linux(linux.build().map_err(|e| invalid("linux", &e))?);
    if let Some(hostname) = &config.hostname {
        spec = spec.hostname(hostname.clone());
    }
    spec.build().map_err(|e| invalid("spec", &e))
}

/// proc, dev, devpts, shm, mqueue, sys and the cgroup file system, as containerd sets them.
fn default_mounts(privileged: bool) -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    let ro = if privileged { "rw" } else { "ro" };
    let table: [(&str, &str, &str, Vec<&str>); 7] = [
        ("/proc", "proc", "proc", vec!["nosuid", "noexec", "nodev"]),
        (
            "/dev",
            "tmpfs",
            "tmpfs",
            vec!["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            vec!["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        (
            "/dev/shm",
            "tmpfs",
            "shm",
            vec!["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        ("/dev/mqueue", "mqueue", "mqueue", vec!["nosuid", "noexec", "nodev"]),
        ("/sys", "sysfs", "sysfs", vec!["nosuid", "noexec", "nodev", ro]),
        (
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            vec!["nosuid", "noexec", "nodev", "relatime", ro],
        ),
    ];
    table
        .into_iter()
        .map(|(destination, typ, source, options)| {
            MountBuilder::default()
                .destination(destination)
                .typ(typ)
                .source(source)
                .options(options.into_iter().map(String::from).collect::<Vec<_>>())
                .build()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busybox() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into(), "HOME=/root".into()],
            working_dir: String::new(),
            user: String::new(),
        }
    }

    fn config() -> ContainerConfig {
        ContainerConfig {
            id: "c1".into(),
            image: "weir.local/busybox:latest".into(),
            log_path: "/tmp/c1.log".into(),
            ..Default::default()
        }
    }

    fn spec_json(config: &ContainerConfig) -> serde_json::Value {
        serde_json::to_value(runtime_spec(config, &busybox(), &host_devices()).unwrap()).unwrap()
    }

    #[test]
    fn command_and_args_follow_kubernetes_rules() {
        let image = ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..busybox()
        };
        let mut c = config();
        assert_eq!(resolve_process(&c, &image).unwrap().args, ["/entry", "default"]);
        c.args = Some(vec!["a".into()]);
        assert_eq!(resolve_process(&c, &image).unwrap().args, ["/entry", "a"]);
        c.command = Some(vec!["/bin/x".into()]);
        assert_eq!(resolve_process(&c, &image).unwrap().args, ["/bin/x", "a"]);
        c.args = None;
        assert_eq!(resolve_process(&c, &image).unwrap().args, ["/bin/x"]);
        let empty = ImageDefaults {
            cmd: vec![],
            ..busybox()
        };
        let err = resolve_process(&config(), &empty).unwrap_err().to_string();
        assert!(err.contains("give the container a command"), "{err}");
    }

    #[test]
    fn env_overrides_the_image_in_place_and_user_and_cwd_default_from_the_image() {
        let image = ImageDefaults {
            user: "1000:1001".into(),
            working_dir: "/srv".into(),
            ..busybox()
        };
        let mut c = config();
        c.env = vec![("HOME".into(), "/home/x".into()), ("A".into(), "1".into())];
        let p = resolve_process(&c, &image).unwrap();
        assert_eq!(p.env, ["PATH=/bin", "HOME=/home/x", "A=1"]);
        assert_eq!((p.uid, p.gid, p.cwd.as_str()), (1000, 1001, "/srv"));
        c.uid = Some(5);
        c.working_dir = Some("/tmp".into());
        let p = resolve_process(&c, &image).unwrap();
        assert_eq!((p.uid, p.gid, p.cwd.as_str()), (5, 1001, "/tmp"));
        let named = ImageDefaults {
            user: "nobody".into(),
            ..busybox()
        };
        let err = resolve_process(&config(), &named).unwrap_err().to_string();
        assert!(err.contains("runAsUser"), "{err}");
    }

    #[test]
    fn capabilities_add_drop_all_and_privileged() {
        let names = |s: &Security| {
            let mut v: Vec<String> = capabilities(s).unwrap().iter().map(|c| c.to_string()).collect();
            v.sort();
            v
        };
        let default = names(&Security::default());
        assert_eq!(default.len(), DEFAULT_CAPABILITIES.len());
        assert!(default.contains(&"NET_RAW".to_string()), "{default:?}");
        let s = Security {
            add_capabilities: vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()],
            drop_capabilities: vec!["net_raw".into()],
            ..Default::default()
        };
        let v = names(&s);
        assert!(
            v.contains(&"NET_ADMIN".to_string()) && v.contains(&"SYS_TIME".to_string()),
            "{v:?}"
        );
        assert!(!v.contains(&"NET_RAW".to_string()), "{v:?}");
        let s = Security {
            add_capabilities: vec!["CHOWN".into()],
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        };
        assert_eq!(names(&s), ["CHOWN"]);
        let privileged = Security {
            privileged: true,
            ..Default::default()
        };
        assert_eq!(
            names(&privileged).len() as u32,
            (own_bounding_set() & ((1u64 << ALL_CAPABILITIES.len()) - 1)).count_ones()
        );
        let bad = Security {
            add_capabilities: vec!["FLY".into()],
            ..Default::default()
        };
        assert!(capabilities(&bad).unwrap_err().to_string().contains("NET_ADMIN"));
    }

    #[test]
    fn spec_carries_namespaces_mounts_resources_and_root() {
        let mut c = config();
        c.network = NetworkNamespace::Path("/var/run/netns/pod1".into());
        c.cgroups_path = Some("/weir/pod1/c1".into());
        c.hostname = Some("web-0".into());
        c.mounts = vec![BindMount {
            source: "/var/lib/weir/vol".into(),
            destination: "/data".into(),
            readonly: true,
        }];
        c.resources = Resources {
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            memory_limit: Some(64 << 20),
            pids_limit: None,
        };
        c.security.readonly_rootfs = true;
        let spec = spec_json(&c);
        assert_eq!(spec["root"], serde_json::json!({"path": "rootfs", "readonly": true}));
        assert_eq!(spec["hostname"], "web-0");
        assert_eq!(spec["process"]["terminal"], false);
        assert_eq!(spec["process"]["args"], serde_json::json!(["sh"]));
        let namespaces = spec["linux"]["namespaces"].as_array().unwrap();
        let network = namespaces.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(network["path"], "/var/run/netns/pod1");
        for t in ["pid", "ipc", "uts", "mount"] {
            assert!(namespaces.iter().any(|n| n["type"] == t), "{t} missing: {namespaces:?}");
        }
        assert_eq!(spec["linux"]["cgroupsPath"], "/weir/pod1/c1");
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["shares"], 512);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
        let mounts = spec["mounts"].as_array().unwrap();
        for d in ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"] {
            assert!(mounts.iter().any(|m| m["destination"] == d), "{d} missing");
        }
        let data = mounts.iter().find(|m| m["destination"] == "/data").unwrap();
        assert_eq!(data["type"], "bind");
        assert_eq!(data["options"], serde_json::json!(["rbind", "rprivate", "ro"]));
        assert!(spec["linux"]["maskedPaths"].as_array().unwrap().len() > 3);
        assert!(
            spec["linux"]["devices"].as_array().is_none_or(|d| d.is_empty()),
            "host devices are for privileged containers only"
        );
        assert_eq!(spec["process"]["capabilities"]["ambient"], serde_json::json!([]));
        assert_eq!(spec["process"]["rlimits"], serde_json::json!([]));
    }

    #[test]
    fn host_network_has_no_network_namespace_and_privileged_masks_nothing() {
        let mut c = config();
        c.network = NetworkNamespace::Host;
        c.security.privileged = true;
        let spec = spec_json(&c);
        let namespaces = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(!namespaces.iter().any(|n| n["type"] == "network"), "{namespaces:?}");
        assert_eq!(spec["linux"]["maskedPaths"], serde_json::json!([]));
        assert_eq!(spec["linux"]["readonlyPaths"], serde_json::json!([]));
        assert_eq!(spec["linux"]["resources"]["devices"][0]["allow"], true);
        let sys = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&"rw".into()));
    }
}
