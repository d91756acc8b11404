//! `cargo xtask`: the project's own scripts. Installs what is missing, builds, tests,
//! starts a local server and regenerates committed data. CI calls `cargo xtask test`.

mod bench;
mod command;
mod images;
mod openapi;
mod protobuf;
mod setup;
mod wheel;
mod workspace;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::command::status;
use crate::workspace::Workspace;

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "Weir's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, the eBPF toolchain (rust-src for nightly,
    /// LLVM 22, bpf-linker), kubectl and helm (into target/tools/), the Python Kubernetes client.
    Setup,
    /// Build the eBPF programs alone (nightly, bpfel-unknown-none) into
    /// target/ebpf/bpfel-unknown-none/release/weir-ebpf. The agent's build.rs does the same.
    BuildEbpf,
    /// Setup, build the weir binary, then `cargo test --workspace` with the tool paths in
    /// WEIR_BIN, WEIR_KUBECTL, WEIR_HELM and WEIR_ETCD, then the privileged datapath,
    /// container runtime and image pull tests (as root, one at a time; the images built first,
    /// in WEIR_IMAGES).
    Test {
        /// Extra arguments for `cargo test --workspace`, after `--`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Install what is missing, build the images and weir (release) and run `weir up`: a
    /// single-node cluster (server and agent) on this machine.
    Up {
        /// Where weir keeps its store, certificates, admin kubeconfig, containerd and pods.
        #[arg(long, default_value = "/var/lib/weir")]
        data_dir: PathBuf,
        /// HTTPS port of the API server.
        #[arg(long, default_value_t = 6443)]
        secure_port: u16,
        /// More flags for `weir up`, after `--`.
        #[arg(last = true)]
        weir_args: Vec<String>,
    },
    /// Build the test and example images (weir.local/busybox:latest, weir.local/echo:latest)
    /// as OCI archives under target/images/, from busybox-static and the project's binaries.
    Images,
    /// Regenerate control-plane/openapi/definitions.json from Kubernetes' published schemas.
    GenOpenapi,
    /// Regenerate control-plane/openapi/protobuf.json (protobuf field numbers, from the crate
    /// k8s-pb) after definitions.json.
    GenProtobuf,
    /// Build in release mode, run one benchmark area against the peers that run here and
    /// write target/bench/<area>.json, .md (the table) and .png (the plot).
    Bench {
        area: bench::Area,
        /// More flags for the benchmark binary, after `--` (e.g. `-- --stores embedded`).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = Workspace::locate()?;
    match cli.task {
        Task::Setup => setup::run(&ws),
        Task::BuildEbpf => build_ebpf(&ws),
        Task::Test { cargo_test_args } => test(&ws, &cargo_test_args),
        Task::Up {
            data_dir,
            secure_port,
            weir_args,
        } => up(&ws, &data_dir, secure_port, &weir_args),
        Task::Images => images::run(&ws).map(|_| ()),
        Task::GenOpenapi => openapi::generate(&ws),
        Task::Bench { area, bench_args } => bench::run(&ws, area, &bench_args),
        Task::GenProtobuf => protobuf::generate(&ws),
    }
}

fn test(ws: &Workspace, cargo_test_args: &[String]) -> Result<()> {
    setup::run(ws)?;

    status("test: building the weir binary (cargo build -p weir)");
    command::run(
        "test: build weir",
        ws.cargo().args(["build", "-p", "weir"]),
        "fix the build errors above",
    )?;

    let weir = ws.target.join("debug").join("weir");
    let etcd = setup::etcd();
    status(format!(
        "test: cargo test --workspace {} (WEIR_BIN={}, WEIR_KUBECTL={}, WEIR_HELM={}, WEIR_ETCD={})",
        cargo_test_args.join(" "),
        weir.display(),
        ws.kubectl().display(),
        ws.helm().display(),
        etcd.display(),
    ));
    let mut tally = Tally::default();
    let workspace_ok = tally.run(
        ws.cargo()
            .args(["test", "--workspace"])
            .args(cargo_test_args)
            .env("WEIR_BIN", &weir)
            .env("WEIR_KUBECTL", ws.kubectl())
            .env("WEIR_HELM", ws.helm())
            .env("WEIR_PYTHON", ws.python())
            .env("WEIR_ETCD", &etcd),
    )?;
    let privileged_ok = privileged_tests(ws, &mut tally)?;
    if !(workspace_ok && privileged_ok) {
        tally.print();
        bail!("test: some tests failed: see the failing tests above");
    }
    status("test: all passed");
    tally.print();
    Ok(())
}

/// Test counts summed over every test binary, printed as one closing line
/// (`summary: N passed, N failed, N skipped`) so the whole run reads as one result, not as its
/// last binary's (often the doc-tests, with nothing in them).
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Run a libtest command, echoing its output and counting its `test result:` lines.
    /// Returns whether the command succeeded.
    fn run(&mut self, cmd: &mut std::process::Command) -> Result<bool> {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("test: starting cargo test")?;
        let stdout = child.stdout.take().context("test: cargo test stdout")?;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("test: reading cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.passed += count(" passed");
                self.failed += count(" failed");
                self.ignored += count(" ignored");
            }
        }
        Ok(child.wait().context("test: waiting for cargo test")?.success())
    }

    fn print(&self) {
        println!(
            "summary: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
    }
}

/// Tests that load eBPF programs, make cgroups, network namespaces and pod networks and run
/// containers: root only, one at a time (they share kernel state), marked `#[ignore]` so the
/// workspace run above leaves them out. The runtime tests run the images of `cargo xtask
/// images`, built first and passed in WEIR_IMAGES.
fn privileged_tests(ws: &Workspace, tally: &mut Tally) -> Result<bool> {
    if !setup::is_root() {
        status("test: privileged datapath and runtime tests: SKIPPED (not root; run `cargo xtask test` as root)");
        return Ok(true);
    }
    let images = images::run(ws)?;
    let images_dir = images
        .first()
        .and_then(|image| image.parent())
        .map(std::path::Path::to_path_buf)
        .context("test: `cargo xtask images` built no image")?;
    // The streaming tests run containers whose output goes through `weir log-driver` (the
    // binary `cargo xtask test` built first).
    let weir_binary = ws.target.join("debug").join("weir");
    status(format!(
        "test: privileged tests (WEIR_IMAGES={} WEIR_BIN={} cargo test -p weir-agent --test datapath --test \
         nodeport --test podnet --test runtime --test registry --test volumes --test stream -- --ignored \
         --test-threads=1)",
        images_dir.display(),
        weir_binary.display()
    ));
    let agent_ok = tally.run(
        ws.cargo()
            .args([
                "test",
                "-p",
                "weir-agent",
                "--test",
                "datapath",
                "--test",
                "nodeport",
                "--test",
                "podnet",
                "--test",
                "runtime",
                "--test",
                "registry",
                "--test",
                "volumes",
                "--test",
                "stream",
                "--",
            ])
            .args(["--ignored", "--test-threads=1"])
            .env("WEIR_IMAGES", &images_dir)
            .env("WEIR_BIN", &weir_binary),
    )?;
    // Real clusters (weir up, weir agent) in network namespaces of their own, and kubectl
    // logs/exec/cp/port-forward through a real server to a container, with kubectl.
    status(format!(
        "test: cluster tests (WEIR_IMAGES={} cargo test -p weir-tests --test cluster --test streaming -- --ignored \
         --test-threads=1)",
        images_dir.display()
    ));
    let clusters_ok = tally.run(
        ws.cargo()
            .args([
                "test",
                "-p",
                "weir-tests",
                "--test",
                "cluster",
                "--test",
                "streaming",
                "--",
            ])
            .args(["--ignored", "--test-threads=1"])
            .env("WEIR_IMAGES", &images_dir)
            .env("WEIR_BIN", &weir_binary)
            .env("WEIR_KUBECTL", ws.kubectl()),
    )?;
    Ok(agent_ok && clusters_ok)
}

fn build_ebpf(ws: &Workspace) -> Result<()> {
    let target_dir = ws.target.join("ebpf");
    status(format!(
        "build-ebpf: cargo +{} build --release --target bpfel-unknown-none -Z build-std=core (in ebpf/)",
        setup::EBPF_TOOLCHAIN
    ));
    // The same flags aya-build passes from agent/build.rs, so both objects are alike.
    let rustflags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    command::run(
        "build-ebpf",
        std::process::Command::new("rustup")
            .args(["run", setup::EBPF_TOOLCHAIN, "cargo", "build", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
            .arg(&target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .current_dir(ws.root.join("ebpf")),
        "run `cargo xtask setup` (nightly rust-src and bpf-linker) and fix the errors above",
    )?;
    let object = target_dir.join("bpfel-unknown-none/release/weir-ebpf");
    status(format!("build-ebpf: {}", object.display()));
    Ok(())
}

fn up(ws: &Workspace, data_dir: &std::path::Path, secure_port: u16, weir_args: &[String]) -> Result<()> {
    setup::run(ws)?;
    // The example images, imported by the agent from <data-dir>/images/ at start.
    let images_dir = data_dir.join("images");
    std::fs::create_dir_all(&images_dir).with_context(|| format!("up: creating {}", images_dir.display()))?;
    for image in images::run(ws)? {
        let name = image.file_name().context("up: an image archive without a file name")?;
        std::fs::copy(&image, images_dir.join(name))
            .with_context(|| format!("up: copying {} to {}", image.display(), images_dir.display()))?;
    }
    status("up: building weir in release mode (cargo build --release -p weir)");
    command::run(
        "up: build weir",
        ws.cargo().args(["build", "--release", "-p", "weir"]),
        "fix the build errors above",
    )?;
    let weir = ws.target.join("release").join("weir");
    status(format!(
        "up: {} up --data-dir {} --secure-port {secure_port} {}",
        weir.display(),
        data_dir.display(),
        weir_args.join(" ")
    ));
    // exec, so Ctrl-C and the exit code belong to weir itself.
    let err = std::process::Command::new(&weir)
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--secure-port")
        .arg(secure_port.to_string())
        .args(weir_args)
        .exec();
    Err(err).with_context(|| format!("up: could not start {}", weir.display()))
}
