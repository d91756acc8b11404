//! `kubectl logs`, `exec`, `cp` and `port-forward` end to end: the real kubectl, a real weir
//! server proxying pods/log, pods/exec and pods/portforward to a node's streaming server (the
//! agent's, with the serving certificate the node got when it joined), and a real busybox
//! container on containerd in its own network namespace.
//!
//! Root only (containerd, runc, a network namespace): `#[ignore]`d, run by `cargo xtask test`
//! as root with WEIR_IMAGES, WEIR_BIN and WEIR_KUBECTL. The containerd fixture is the agent
//! tests' (`agent/tests/common/containerd.rs`), which cleans up also after a failure.

#[path = "../../agent/tests/common/containerd.rs"]
mod containerd;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::panic::AssertUnwindSafe;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd::{BUSYBOX, Fixture, Netns, images};
use futures::FutureExt as _;
use weir_agent::join::{self, Token};
use weir_agent::runtime::NetworkNamespace;
use weir_agent::stream::{ContainerRuntimeInfo, PodDirectory, PodRuntimeInfo, StreamServer};
use weir_tests::{Backend, KUBECTL_TIMEOUT, TestServer, describe, required_binary, run_bounded, workspace_dir};

#[derive(Default)]
struct Pods(Mutex<HashMap<(String, String), PodRuntimeInfo>>);

impl PodDirectory for Pods {
    fn lookup(&self, namespace: &str, pod: &str) -> Option<PodRuntimeInfo> {
        self.0
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), pod.to_string()))
            .cloned()
    }
}

/// kubectl, run off the async workers (the streaming server runs on them).
fn kubectl(server: &TestServer, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| server.kubectl(args))
}

fn kubectl_ok(server: &TestServer, args: &[&str]) -> String {
    let output = kubectl(server, args);
    assert!(
        output.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn kubectl_input(server: &TestServer, args: &[&str], input: &[u8]) -> Output {
    tokio::task::block_in_place(|| run_bounded(server.kubectl_command(args), Some(input), KUBECTL_TIMEOUT))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn kubectl_logs_exec_cp_and_port_forward_reach_the_pod_through_the_api_server() {
    let Some(images) = images() else { return };
    let weir = required_binary("WEIR_BIN", workspace_dir().join("target/debug/weir"), "the weir binary")
        .unwrap_or_else(|e| panic!("{e}"));
    let fixture = Fixture::new(images).await;
    let netns = Netns::new();
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;
        let runtime = fixture.runtime.clone().with_logger(&weir);
        let server = TestServer::start(Backend::Embedded).await.unwrap();

        // The node joins (its serving certificate names 127.0.0.1) and serves streams there.
        let token: Token = std::fs::read_to_string(server.data_dir().join("node-token"))
            .unwrap()
            .parse()
            .unwrap();
        let credentials = join::join_with_addresses(&server.base_url(), &token, "stream-node", &["127.0.0.1".parse().unwrap()])
            .await
            .unwrap();
        let pods = Arc::new(Pods::default());
        let stream_server = StreamServer::new(runtime.clone(), pods.clone(), &credentials.server_tls()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serving = tokio::spawn(Arc::new(stream_server).serve(listener));

        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "stream-node"}});
        let created = kubectl_input(&server, &["create", "-f", "-"], node.to_string().as_bytes());
        assert!(created.status.success(), "{}", describe(&created));
        let status = serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "stream-node"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
        kubectl_ok(
            &server,
            &["patch", "node", "stream-node", "--subresource=status", "--type=merge", "-p", &status.to_string()],
        );
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "stream-node", "containers": [{"name": "main", "image": BUSYBOX}]}});
        let created = kubectl_input(&server, &["create", "-f", "-"], pod.to_string().as_bytes());
        assert!(created.status.success(), "{}", describe(&created));

        // What the pod worker would report (kubectl port-forward insists on Running).
        let running = serde_json::json!({"status": {"phase": "Running"}});
        kubectl_ok(
            &server,
            &["patch", "pod", "web", "--subresource=status", "--type=merge", "-p", &running.to_string()],
        );

        // The pod's containers: a previous run that printed a line, and the current one.
        let mut previous = fixture.config(BUSYBOX, &["echo", "previous-run"]);
        previous.network = NetworkNamespace::Path(netns.path());
        runtime.create_container(&previous).await.unwrap();
        runtime.start_container(&previous.id).await.unwrap();
        runtime.wait_container(&previous.id).await.unwrap();
        runtime.delete_container(&previous.id).await.unwrap();
        let script = "mkdir -p /www && echo pf-ok > /www/index.html && httpd -p 127.0.0.1:8080 -h /www; \
                      echo one; echo two; sleep 2; echo three; exec sleep 3600";
        let mut current = fixture.config(BUSYBOX, &["sh", "-c", script]);
        current.network = NetworkNamespace::Path(netns.path());
        runtime.create_container(&current).await.unwrap();
        runtime.start_container(&current.id).await.unwrap();
        let info = |running: bool| PodRuntimeInfo {
            uid: "uid-web".into(),
            netns_path: Some(netns.path()),
            containers: vec![ContainerRuntimeInfo {
                name: "main".into(),
                container_id: Some(current.id.clone()),
                running,
                log_path: Some(current.log_path.clone()),
                previous_log_path: Some(previous.log_path.clone()),
            }],
            default_container: Some("main".into()),
        };
        pods.0
            .lock()
            .unwrap()
            .insert(("default".into(), "web".into()), info(true));

        // Discovery lists the subresources as Kubernetes does.
        let v1 = kubectl_ok(&server, &["get", "--raw", "/api/v1"]);
        for sub in ["pods/log", "pods/exec", "pods/portforward"] {
            assert!(v1.contains(&format!("\"{sub}\"")), "{sub} in /api/v1");
        }

        // kubectl logs -f from the start, in the background.
        let kubectl_bin = required_binary("WEIR_KUBECTL", workspace_dir().join("target/tools/kubectl"), "kubectl").unwrap();
        let mut follow = server.kubectl_command(&["logs", "-f", "web"]);
        follow.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut follow = follow.spawn().expect("starting kubectl logs -f");

        // kubectl logs, with its flags.
        let started = Instant::now();
        let all = loop {
            let out = kubectl(&server, &["logs", "web"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("three") {
                break text;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no 'three' in the logs: {}", describe(&out));
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert_eq!(all, "one\ntwo\nthree\n");
        assert_eq!(kubectl_ok(&server, &["logs", "web", "--tail=1"]), "three\n");
        assert_eq!(kubectl_ok(&server, &["logs", "pod/web", "-c", "main", "--limit-bytes=3"]), "one");
        let stamped = kubectl_ok(&server, &["logs", "web", "--timestamps", "--tail=1"]);
        let (time, text) = stamped.trim_end().split_once(' ').unwrap();
        assert!(time.parse::<jiff::Timestamp>().is_ok() && text == "three", "{stamped:?}");
        let since = format!("--since-time={time}");
        assert_eq!(kubectl_ok(&server, &["logs", "web", &since]), "three\n");
        assert_eq!(kubectl_ok(&server, &["logs", "web", "--since=1h"]), all);
        assert_eq!(kubectl_ok(&server, &["logs", "web", "--previous"]), "previous-run\n");
        let wrong = kubectl(&server, &["logs", "web", "-c", "nope"]);
        assert!(
            String::from_utf8_lossy(&wrong.stderr).contains("container nope is not valid for pod web"),
            "{}",
            describe(&wrong)
        );

        // kubectl exec: output and exit code; stdin to its end.
        let timed = Instant::now();
        kubectl_ok(&server, &["exec", "web", "--", "true"]);
        eprintln!("kubectl exec web -- true: {:?}", timed.elapsed());
        let out = kubectl(&server, &["exec", "web", "--", "sh", "-c", "echo hi; echo err >&2; exit 3"]);
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().next(), Some("err"));
        let out = kubectl_input(&server, &["exec", "-i", "web", "--", "cat"], b"piped\n");
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "piped\n");

        // kubectl cp both ways.
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(dir.path().join("up.bin"), &payload).unwrap();
        let local = dir.path().join("up.bin").display().to_string();
        let timed = Instant::now();
        kubectl_ok(&server, &["cp", &local, "web:/tmp/up.bin"]);
        eprintln!("kubectl cp of 300 kB into the pod: {:?}", timed.elapsed());
        let sum = kubectl_ok(&server, &["exec", "web", "--", "wc", "-c", "/tmp/up.bin"]);
        assert!(sum.starts_with("300000"), "{sum}");
        let back = dir.path().join("down.bin").display().to_string();
        kubectl_ok(&server, &["cp", "web:/tmp/up.bin", &back]);
        assert!(std::fs::read(&back).unwrap() == payload, "kubectl cp brought the file back whole");

        // kubectl port-forward to the web server on the pod's loopback.
        let mut forward = server.kubectl_command(&["port-forward", "pod/web", ":8080"]);
        forward.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut forward = forward.spawn().expect("starting kubectl port-forward");
        let mut first = String::new();
        let mut stdout = BufReader::new(forward.stdout.take().unwrap());
        stdout.read_line(&mut first).unwrap();
        // Keep reading: kubectl prints a line per connection and dies of SIGPIPE if nobody reads.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        // "Forwarding from 127.0.0.1:NNNNN -> 8080"
        let local_port: u16 = first
            .split_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = forward.kill();
                let mut stderr = String::new();
                let _ = forward.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!("no local port in {first:?}; kubectl port-forward said: {stderr}")
            });
        for _ in 0..2 {
            let body = tokio::task::block_in_place(|| {
                let mut conn = std::net::TcpStream::connect(("127.0.0.1", local_port)).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                conn.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n").unwrap();
                let mut response = String::new();
                conn.read_to_string(&mut response).map(|_| response)
            });
            let body = body.unwrap_or_else(|e| {
                let _ = forward.kill();
                let mut stderr = String::new();
                let _ = forward.stderr.take().unwrap().read_to_string(&mut stderr);
                let log = std::fs::read_to_string(server.data_dir().join("weir.stderr")).unwrap_or_default();
                panic!("reading through the port-forward: {e}; kubectl said: {stderr}\nserver: {log}")
            });
            assert!(body.starts_with("HTTP/1.") && body.contains("pf-ok"), "{body:?}");
        }
        let _ = forward.kill();
        let _ = forward.wait();

        // Who may: a node's credentials may not read logs or exec (system:masters only).
        let node_kubeconfig = dir.path().join("node.kubeconfig");
        credentials
            .write_kubeconfig(&node_kubeconfig, &server.base_url(), "stream-node")
            .unwrap();
        let mut as_node = std::process::Command::new(&kubectl_bin);
        as_node
            .arg("--kubeconfig")
            .arg(&node_kubeconfig)
            .args(["exec", "web", "--", "true"]);
        let denied = tokio::task::block_in_place(|| run_bounded(as_node, None, KUBECTL_TIMEOUT));
        assert!(
            !denied.status.success()
                && String::from_utf8_lossy(&denied.stderr)
                    .contains("User \"system:node:stream-node\" cannot create resource \"pods/exec\""),
            "{}",
            describe(&denied)
        );

        // Pods the proxy cannot serve say why.
        let pending = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending"},
            "spec": {"nodeSelector": {"nowhere": "true"}, "containers": [{"name": "main", "image": BUSYBOX}]}});
        kubectl_input(&server, &["create", "-f", "-"], pending.to_string().as_bytes());
        let out = kubectl(&server, &["logs", "pending"]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not have a host assigned"),
            "{}",
            describe(&out)
        );
        let lost_node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "lost-node"}});
        kubectl_input(&server, &["create", "-f", "-"], lost_node.to_string().as_bytes());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let status = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": closed}}}});
        kubectl_ok(
            &server,
            &["patch", "node", "lost-node", "--subresource=status", "--type=merge", "-p", &status.to_string()],
        );
        let lost = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lost"},
            "spec": {"nodeName": "lost-node", "containers": [{"name": "main", "image": BUSYBOX}]}});
        kubectl_input(&server, &["create", "-f", "-"], lost.to_string().as_bytes());
        let out = kubectl(&server, &["logs", "lost"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot reach node lost-node at 127.0.0.1"),
            "{}",
            describe(&out)
        );

        // kubectl logs -f saw everything and ends when the container does.
        runtime.stop_container(&current.id, Duration::from_secs(1)).await.unwrap();
        pods.0
            .lock()
            .unwrap()
            .insert(("default".into(), "web".into()), info(false));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if follow.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "kubectl logs -f did not end after the container stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut followed = String::new();
        follow.stdout.take().unwrap().read_to_string(&mut followed).unwrap();
        assert_eq!(followed, "one\ntwo\nthree\n");
        serving.abort();
    })
    .catch_unwind()
    .await;
    drop(netns);
    fixture.finish(outcome).await;
}
