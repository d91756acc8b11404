//! Privileged tests of the container runtime against a real containerd and runc.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`
//! after building the images with `cargo xtask images` and passing their directory in
//! `WEIR_IMAGES`). Each test starts its own containerd in a fresh directory under /tmp with
//! its own containerd namespace, makes its own network namespace when it needs one (unique
//! names with the pid and a counter), talks only to addresses inside that namespace, and a
//! Drop guard deletes its containers, stops its containerd, unmounts what is left and
//! removes the directory, also when an assertion fails.

#[path = "common/containerd.rs"]
mod containerd;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use containerd::{BUSYBOX, Fixture, Netns, images, unique, unmount_under};
use futures::FutureExt as _;
use weir_agent::runtime::{
    BindMount, Containerd, ContainerdConfig, Error, NetworkNamespace, POD_UID_LABEL, Resources, Runtime, Security,
    TaskStatus,
};

const ECHO: &str = "weir.local/echo:latest";

/// One HTTP GET; the body, or the error.
fn http_get(addr: SocketAddrV4) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string())
}

fn http_get_within(addr: SocketAddrV4, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(addr) {
            Ok(body) if !body.is_empty() => return body,
            result if Instant::now() > deadline => panic!("no HTTP answer from {addr} within {timeout:?}: {result:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn containerd_starts_in_a_private_dir_and_stops_cleanly() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        let dir = fixture.dir.path().join("containerd");
        assert!(fixture.containerd().socket().starts_with(&dir));
        assert!(dir.join("config.toml").exists());
        assert!(
            dir.join("root").is_dir(),
            "containerd's root is under {}",
            dir.display()
        );
        assert!(
            dir.join("state").is_dir(),
            "containerd's state is under {}",
            dir.display()
        );
        let pid = fixture.containerd().pid().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains(&dir.join("config.toml").display().to_string()));
        assert_eq!(fixture.runtime.list_containers().await.unwrap(), vec![]);

        // An existing containerd is used as it is and left running on shutdown.
        let existing = Containerd::start(&ContainerdConfig {
            existing_socket: Some(fixture.containerd().socket().to_path_buf()),
            ..ContainerdConfig::managed("/nonexistent")
        })
        .await
        .expect("using the running containerd by its socket");
        assert_eq!(existing.pid(), None);
        existing.shutdown().await.unwrap();
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the existing containerd was stopped"
        );
        assert!(!Path::new("/nonexistent").exists());
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn imports_oci_and_docker_archives() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        let started = Instant::now();
        assert_eq!(fixture.import("busybox.tar").await, [BUSYBOX]);
        assert_eq!(fixture.import("echo.tar").await, [ECHO]);
        eprintln!("imported busybox and echo in {:?}", started.elapsed());
        assert_eq!(fixture.runtime.list_images().await.unwrap(), [BUSYBOX, ECHO]);
        // A second import of the same archive changes nothing and succeeds.
        assert_eq!(fixture.import("busybox.tar").await, [BUSYBOX]);

        let image = fixture.runtime.ensure_image("weir.local/busybox").await.unwrap();
        assert_eq!(image.name, BUSYBOX);
        assert!(image.chain_id.starts_with("sha256:"), "{image:?}");
        assert_eq!(image.defaults.cmd, ["sh"]);
        let missing = fixture.runtime.ensure_image("weir.local/nothing:1").await.unwrap_err();
        assert!(matches!(missing, Error::ImageNotPresent { .. }), "{missing}");
        assert!(missing.to_string().contains("not present"), "{missing}");

        // An image whose layer snapshot has gone (as after `ctr images import --no-unpack`)
        // is unpacked again by ensure_image.
        let socket = fixture.containerd().socket().display().to_string();
        let removed = Command::new("ctr")
            .args([
                "-a",
                &socket,
                "-n",
                fixture.runtime.namespace(),
                "snapshots",
                "rm",
                &image.chain_id,
            ])
            .output()
            .expect("running ctr");
        assert!(
            removed.status.success(),
            "ctr snapshots rm: {}",
            String::from_utf8_lossy(&removed.stderr)
        );
        let again = fixture.runtime.ensure_image(BUSYBOX).await.unwrap();
        assert_eq!(again.chain_id, image.chain_id);
        let (code, log) = fixture.run(&fixture.config(BUSYBOX, &["echo", "unpacked-again"])).await;
        assert_eq!((code, log.trim()), (0, "unpacked-again"));

        // A gzipped archive.
        let gzipped = fixture.dir.path().join("busybox.tar.gz");
        let mut encoder =
            flate2::write::GzEncoder::new(std::fs::File::create(&gzipped).unwrap(), flate2::Compression::fast());
        std::io::copy(
            &mut std::fs::File::open(fixture.images.join("busybox.tar")).unwrap(),
            &mut encoder,
        )
        .unwrap();
        encoder.finish().unwrap();
        assert_eq!(fixture.runtime.import_archive(&gzipped).await.unwrap(), [BUSYBOX]);

        // The same image as `docker save` would write it (uncompressed layer.tar, RepoTags).
        let docker = fixture.dir.path().join("docker-save.tar");
        docker_save_from_oci(
            &fixture.images.join("busybox.tar"),
            "weir.local/docker-busybox:v1",
            &docker,
        );
        let names = fixture
            .runtime
            .import_archive(&docker)
            .await
            .expect("importing a docker save tarball");
        assert_eq!(names, ["weir.local/docker-busybox:v1"]);
        let config = fixture.config("weir.local/docker-busybox:v1", &["sh", "-c", "echo from-docker"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!((code, log.trim()), (0, "from-docker"));
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

/// Rewrites an OCI archive as `docker save` does: manifest.json with RepoTags, the config
/// as `<hex>.json`, each layer decompressed as `<n>/layer.tar`.
fn docker_save_from_oci(oci: &Path, tag: &str, out: &Path) {
    let mut members = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(oci).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        members.insert(path, data);
    }
    let blob = |digest: &str| members[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))].clone();
    let index: serde_json::Value = serde_json::from_slice(&members["index.json"]).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let mut builder = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data).unwrap();
    };
    let config_path = format!("{}.json", config_digest.trim_start_matches("sha256:"));
    add(&config_path, &blob(config_digest));
    let mut layers = Vec::new();
    for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&blob(layer["digest"].as_str().unwrap())[..])
            .read_to_end(&mut plain)
            .unwrap();
        let path = format!("{i}/layer.tar");
        add(&path, &plain);
        layers.push(path);
    }
    let save = serde_json::json!([{"Config": config_path, "RepoTags": [tag], "Layers": layers}]);
    add("manifest.json", &serde_json::to_vec(&save).unwrap());
    builder.finish().unwrap();
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn runs_processes_with_exit_code_logs_env_user_cwd_and_mounts() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;

        let config = fixture.config(BUSYBOX, &["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 3);
        assert!(
            log.contains("hi\n") && log.contains("oops\n"),
            "stdout and stderr in the log: {log:?}"
        );

        let mut config = fixture.config(
            BUSYBOX,
            &[
                "sh",
                "-c",
                "echo \"$GREETING|$0|$1|$(pwd)|$(id -u):$(id -g)|$(id -G)|$(hostname)\"",
            ],
        );
        config.args = Some(vec!["first".into(), "second".into()]);
        config.env = vec![("GREETING".into(), "hello world".into())];
        config.working_dir = Some("/tmp".into());
        config.uid = Some(1234);
        config.gid = Some(5678);
        config.additional_gids = vec![4000];
        config.hostname = Some("web-0".into());
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert_eq!(log.trim(), "hello world|first|second|/tmp|1234:5678|5678 4000|web-0");

        // Read-only root file system; a writable and a read-only bind mount.
        let rw = fixture.dir.path().join("rw");
        let ro = fixture.dir.path().join("ro");
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("given"), "from the host").unwrap();
        let mut config = fixture.config(
            BUSYBOX,
            &[
                "sh",
                "-c",
                "touch /x 2>/dev/null && echo root-writable || echo root-refused; \
             echo data > /rw/out && echo rw-ok; \
             touch /ro/y 2>/dev/null && echo ro-writable || echo ro-refused; cat /ro/given",
            ],
        );
        config.security.readonly_rootfs = true;
        config.mounts = vec![
            BindMount {
                source: rw.clone(),
                destination: "/rw".into(),
                readonly: false,
            },
            BindMount {
                source: ro.clone(),
                destination: "/ro".into(),
                readonly: true,
            },
        ];
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            ["root-refused", "rw-ok", "ro-refused", "from the host"]
        );
        assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "data\n");
        assert!(!ro.join("y").exists());

        // Capabilities: NET_ADMIN is not in the default set; added, it lets the container add
        // an address in its own (new, empty) network namespace.
        let script = [
            "sh",
            "-c",
            "ip addr add 10.9.9.9/32 dev lo 2>/dev/null && echo allowed || echo denied",
        ];
        let (_, log) = fixture.run(&fixture.config(BUSYBOX, &script)).await;
        assert_eq!(log.trim(), "denied");
        let mut config = fixture.config(BUSYBOX, &script);
        config.security = Security {
            add_capabilities: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        let (_, log) = fixture.run(&config).await;
        assert_eq!(log.trim(), "allowed");

        // Privileged: every capability and the host's devices.
        let script = [
            "sh",
            "-c",
            "ip addr add 10.9.9.9/32 dev lo 2>/dev/null && echo allowed || echo denied; \
             test -c /dev/kmsg && echo host-devices || echo no-host-devices",
        ];
        let (_, log) = fixture.run(&fixture.config(BUSYBOX, &script)).await;
        assert_eq!(log.lines().collect::<Vec<_>>(), ["denied", "no-host-devices"]);
        let mut config = fixture.config(BUSYBOX, &script);
        config.security.privileged = true;
        let (_, log) = fixture.run(&config).await;
        assert_eq!(log.lines().collect::<Vec<_>>(), ["allowed", "host-devices"]);
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn limits_reach_the_cgroup_and_an_oom_kill_is_reported() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;

        let mut config = fixture.config(BUSYBOX, &["sleep", "30"]);
        config.resources = Resources {
            cpu_shares: Some(256),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            memory_limit: Some(32 << 20),
            pids_limit: Some(64),
        };
        let cgroup = config.cgroups_path.clone().unwrap();
        fixture.runtime.create_container(&config).await.unwrap();
        fixture.runtime.start_container(&config.id).await.unwrap();
        let read = |controller: &str, file: &str| {
            let path = format!("/sys/fs/cgroup/{controller}{cgroup}/{file}");
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {path}: {e}"))
                .trim()
                .to_string()
        };
        assert_eq!(read("memory", "memory.limit_in_bytes"), (32u64 << 20).to_string());
        assert_eq!(read("cpu", "cpu.shares"), "256");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("pids", "pids.max"), "64");
        let status = fixture
            .runtime
            .stop_container(&config.id, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!status.oom_killed, "{status:?}");
        fixture.runtime.delete_container(&config.id).await.unwrap();

        // `tail` of an endless line buffers without bound: the OOM killer ends it.
        let mut config = fixture.config(BUSYBOX, &["tail", "/dev/zero"]);
        config.resources.memory_limit = Some(32 << 20);
        fixture.runtime.create_container(&config).await.unwrap();
        fixture.runtime.start_container(&config.id).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), fixture.runtime.wait_container(&config.id))
            .await
            .expect("the memory hog is killed within 60 s")
            .unwrap();
        assert_eq!(status.code, 137, "{status:?}");
        assert!(status.oom_killed, "{status:?}");
        fixture.runtime.delete_container(&config.id).await.unwrap();
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn twenty_containers_start_and_are_listed() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;
        let mut took = Vec::new();
        let mut ids = Vec::new();
        for i in 0..20 {
            let mut config = fixture.config(BUSYBOX, &["sleep", "300"]);
            let pod = if i % 2 == 0 { "pod-a" } else { "pod-\"b\"" };
            config.labels.insert(POD_UID_LABEL.into(), pod.into());
            let started = Instant::now();
            fixture.runtime.create_container(&config).await.unwrap();
            fixture.runtime.start_container(&config.id).await.unwrap();
            took.push(started.elapsed());
            ids.push(config.id);
        }
        took.sort();
        let (p50, max) = (took[took.len() / 2], took[took.len() - 1]);
        eprintln!("create + start of 20 containers, one after another: p50 {p50:?}, max {max:?}");
        assert!(p50 < Duration::from_secs(1), "create + start p50 {p50:?}");
        let listed = fixture.runtime.list_containers().await.unwrap();
        let running = listed
            .iter()
            .filter(|c| ids.contains(&c.id) && matches!(c.task, TaskStatus::Running { .. }))
            .count();
        assert_eq!(running, 20, "{listed:?}");
        for pod in ["pod-a", "pod-\"b\""] {
            let of_pod = fixture.runtime.list_pod_containers(pod).await.unwrap();
            assert_eq!(of_pod.len(), 10, "{pod}: {of_pod:?}");
            assert!(of_pod.iter().all(|c| c.labels[POD_UID_LABEL] == pod), "{of_pod:?}");
        }
        assert_eq!(fixture.runtime.list_pod_containers("pod-c").await.unwrap(), vec![]);
        let started = Instant::now();
        for id in &ids {
            fixture.runtime.delete_container(id).await.unwrap();
        }
        eprintln!("delete (SIGKILL) of 20 running containers: {:?}", started.elapsed());
        assert_eq!(fixture.runtime.list_containers().await.unwrap(), vec![]);
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;

        // Handles SIGTERM: exits with its own code, well before the grace period ends.
        let config = fixture.config(
            BUSYBOX,
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        fixture.runtime.create_container(&config).await.unwrap();
        fixture.runtime.start_container(&config.id).await.unwrap();
        wait_for_log(&config.log_path, "ready").await;
        let started = Instant::now();
        let status = fixture
            .runtime
            .stop_container(&config.id, Duration::from_secs(10))
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(status.code, 7, "{status:?}");
        assert!(
            took < Duration::from_secs(5),
            "SIGTERM was handled but stop took {took:?}"
        );
        fixture.runtime.delete_container(&config.id).await.unwrap();
        assert!(std::fs::read_to_string(&config.log_path).unwrap().contains("got-term"));

        // Ignores SIGTERM: killed when the grace period (1 s) ends.
        let config = fixture.config(
            BUSYBOX,
            &["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.1; done"],
        );
        fixture.runtime.create_container(&config).await.unwrap();
        fixture.runtime.start_container(&config.id).await.unwrap();
        wait_for_log(&config.log_path, "ready").await;
        let started = Instant::now();
        let status = fixture
            .runtime
            .stop_container(&config.id, Duration::from_secs(1))
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(status.code, 137, "{status:?}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(5),
            "SIGKILL came after {took:?}"
        );
        eprintln!("grace 1 s: killed after {took:?}");
        fixture.runtime.delete_container(&config.id).await.unwrap();
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

async fn wait_for_log(path: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(path).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "{} never said {text:?}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn echo_in_a_pod_netns_answers_and_survives_a_containerd_restart() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("echo.tar").await;
        let netns = Netns::new();

        let mut config = fixture.config(ECHO, &[]);
        config.network = NetworkNamespace::Path(netns.path());
        config.env = vec![("POD_NAME".into(), "echo-pod".into())];
        fixture.runtime.create_container(&config).await.unwrap();
        let started = Instant::now();
        fixture.runtime.start_container(&config.id).await.unwrap();
        let addr = SocketAddrV4::new(netns.ns_ip, 8080);
        let body = tokio::task::spawn_blocking(move || http_get_within(addr, Duration::from_secs(10)))
            .await
            .unwrap();
        eprintln!("echo answered {:?} after {:?}", body, started.elapsed());
        assert!(body.starts_with("echo-pod "), "{body}");
        assert!(body.contains(&netns.ns_ip.to_string()), "{body}");

        // Kill containerd: the supervisor restarts it, the container keeps serving throughout
        // and the new containerd still lists it as running.
        let restarts = fixture.containerd().restarts();
        let old_pid = fixture.containerd().pid().unwrap();
        // A wait in flight when containerd dies carries on against the restarted one.
        let waiter = {
            let runtime = fixture.runtime.clone();
            let id = config.id.clone();
            tokio::spawn(async move { runtime.wait_container(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: kill has no memory-safety preconditions; old_pid is the containerd we started.
        unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
        let killed = Instant::now();
        let during = tokio::task::spawn_blocking(move || http_get(addr)).await.unwrap();
        assert!(
            during.is_ok(),
            "the container stopped answering when containerd died: {during:?}"
        );
        fixture
            .containerd()
            .wait_restarted(restarts, Duration::from_secs(30))
            .await
            .expect("containerd restarted");
        eprintln!("containerd answered again {:?} after SIGKILL", killed.elapsed());
        assert_ne!(fixture.containerd().pid(), Some(old_pid));
        let body = tokio::task::spawn_blocking(move || http_get_within(addr, Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(body.starts_with("echo-pod "), "{body}");
        let listed = fixture
            .runtime
            .list_containers()
            .await
            .expect("listing after the restart");
        let ours = listed
            .iter()
            .find(|c| c.id == config.id)
            .expect("the echo container is still listed");
        assert!(matches!(ours.task, TaskStatus::Running { .. }), "{ours:?}");
        if std::env::var_os("WEIR_TEST_FORCE_FAILURE").is_some() {
            panic!("forced failure (WEIR_TEST_FORCE_FAILURE): the cleanup must still happen");
        }
        assert_eq!(ours.labels.get(POD_UID_LABEL).map(String::as_str), Some("uid-1"));
        assert_eq!(ours.log_path.as_deref(), Some(config.log_path.as_path()));

        // The restarted containerd still controls it.
        let status = fixture
            .runtime
            .stop_container(&config.id, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            status.code == 0 || status.code == 143 || status.code == 137,
            "{status:?}"
        );
        let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the wait started before the restart returns")
            .unwrap()
            .expect("the wait started before the restart succeeds");
        assert_eq!(waited.code, status.code);
        fixture.runtime.delete_container(&config.id).await.unwrap();
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn a_containerd_left_by_a_dead_agent_is_replaced_and_its_containers_readopted() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images).await;
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;
        let config = fixture.config(BUSYBOX, &["sh", "-c", "echo up; exec sleep 300"]);
        fixture.runtime.create_container(&config).await.unwrap();
        fixture.runtime.start_container(&config.id).await.unwrap();
        wait_for_log(&config.log_path, "up").await;

        // The "dead agent": a containerd for a second directory, started on a runtime that is
        // then dropped (the supervisor dies with it) and never shut down.
        let dir = fixture.dir.path().join("orphan");
        let orphan_config = ContainerdConfig::managed(&dir);
        let orphan_pid = {
            let orphan_config = orphan_config.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let containerd = Containerd::start(&orphan_config).await.expect("starting the orphan");
                    let pid = containerd.pid().unwrap();
                    // An agent killed by SIGKILL runs no destructor.
                    std::mem::forget(containerd);
                    pid
                })
            })
            .join()
            .unwrap()
        };
        let orphan_runtime = Runtime::connect(&orphan_config.socket(), "weir-orphan").await.unwrap();
        orphan_runtime
            .import_archive(&fixture.images.join("busybox.tar"))
            .await
            .unwrap();
        let mut orphan_container = fixture.config(BUSYBOX, &["sleep", "300"]);
        orphan_container.id = unique("orphan");
        orphan_runtime.create_container(&orphan_container).await.unwrap();
        let container_pid = orphan_runtime.start_container(&orphan_container.id).await.unwrap();
        if std::env::var_os("WEIR_TEST_FORCE_FAILURE").is_some() {
            panic!("forced failure (WEIR_TEST_FORCE_FAILURE): the orphan must be cleaned up too");
        }

        // The next agent starts containerd on the same directory: the old one is stopped, a
        // new one answers, and the container is still running and listed.
        let replacement = Containerd::start(&orphan_config)
            .await
            .expect("starting over the orphan");
        assert_ne!(replacement.pid(), Some(orphan_pid));
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z "))
                .unwrap_or(false)
        };
        assert!(!alive(orphan_pid), "the orphaned containerd {orphan_pid} still runs");
        // SAFETY: waitpid on our own (zombie) child; reaps it.
        unsafe { libc::waitpid(orphan_pid as i32, std::ptr::null_mut(), 0) };
        assert!(alive(container_pid), "the container died with its containerd");
        let agent = Runtime::connect(replacement.socket(), "weir-orphan").await.unwrap();
        let listed = agent.list_containers().await.unwrap();
        let found = listed.iter().find(|c| c.id == orphan_container.id).expect("re-adopted");
        assert_eq!(found.task, TaskStatus::Running { pid: container_pid });
        let status = agent
            .stop_container(&orphan_container.id, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            status.code, 137,
            "sleep ignores SIGTERM as pid 1: killed after the grace period"
        );
        agent.delete_container(&orphan_container.id).await.unwrap();
        replacement.shutdown().await.unwrap();
        unmount_under(&dir);

        // The fixture's own container never noticed.
        let mine = fixture.runtime.list_containers().await.unwrap();
        assert!(matches!(mine[0].task, TaskStatus::Running { .. }), "{mine:?}");
    })
    .catch_unwind()
    .await;
    fixture.finish(outcome).await;
}
