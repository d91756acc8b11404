//! LoadBalancer addresses from `weir server --load-balancer-pool`, driven by the real kubectl:
//! services get addresses from a small pool, a requested address is honoured, a conflict and an
//! exhausted pool leave services pending with a Warning Event, a freed address goes to a pending
//! service, assignments survive a restart, and a bad pool keeps the server from starting.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use serde_json::{Value, json};
use weir_tests::{Backend, TestServer, eventually, required_binary, run_bounded, workspace_dir};

const SETTLE: Duration = Duration::from_secs(15);

fn service(name: &str, extra_spec: Value, annotations: Value) -> String {
    let mut spec = json!({"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"port": 80}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "annotations": annotations}, "spec": spec})
    .to_string()
}

fn ingress_ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

async fn wait_for_ip(services: &Api<Service>, name: &str) -> Result<String> {
    eventually(&format!("{name} gets an address"), SETTLE, || async {
        let ips = ingress_ips(&services.get(name).await?);
        Ok(ips.first().cloned())
    })
    .await
}

/// `kubectl describe svc` shows the controller's Event for `name`.
async fn wait_for_event(server: &TestServer, name: &str, text: &str) -> Result<String> {
    eventually(&format!("{name}'s event {text:?}"), SETTLE, || async {
        let described = server.kubectl_ok(&["describe", "svc", name]);
        Ok(described.contains(text).then_some(described))
    })
    .await
}

fn external_ip(server: &TestServer, name: &str) -> String {
    server
        .kubectl_ok(&["get", "svc", name, "--no-headers"])
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_string()
}

async fn addresses_come_from_the_pool(backend: Backend) -> Result<()> {
    let mut server = TestServer::start_with_args(backend, &["--load-balancer-pool", "192.0.2.10-192.0.2.12"]).await?;
    let client = server.kube_client().await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let apply = |manifest: String| server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest);

    apply(service("a", json!({}), json!({})));
    ensure!(wait_for_ip(&services, "a").await? == "192.0.2.10");
    let a = services.get("a").await?;
    let mode = a.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
        .ip_mode
        .clone();
    ensure!(mode.as_deref() == Some("VIP"), "ipMode {mode:?}");
    ensure!(external_ip(&server, "a") == "192.0.2.10");
    wait_for_event(&server, "a", "Assigned IP").await?;

    // A requested address is honoured; asking for a taken one fails with an Event.
    apply(service("b", json!({"loadBalancerIP": "192.0.2.12"}), json!({})));
    ensure!(wait_for_ip(&services, "b").await? == "192.0.2.12");
    apply(service(
        "c",
        json!({}),
        json!({"weir.dev/load-balancer-ips": "192.0.2.12"}),
    ));
    let described = wait_for_event(&server, "c", "AllocationFailed").await?;
    ensure!(
        described.contains("requested address 192.0.2.12 is already assigned to default/b"),
        "{described}"
    );
    apply(service("outside", json!({"loadBalancerIP": "10.1.2.3"}), json!({})));
    wait_for_event(&server, "outside", "is not in the load-balancer pool").await?;

    // Another class is someone else's business.
    apply(service(
        "foreign",
        json!({"loadBalancerClass": "example.com/lb"}),
        json!({}),
    ));

    // The last address, then the pool is exhausted.
    apply(service("d", json!({}), json!({})));
    ensure!(wait_for_ip(&services, "d").await? == "192.0.2.11");
    apply(service("e", json!({}), json!({})));
    let described = wait_for_event(&server, "e", "no available IPv4 address in the load-balancer pool").await?;
    ensure!(described.contains("Warning"), "{described}");
    ensure!(
        external_ip(&server, "e") == "<pending>",
        "{}",
        external_ip(&server, "e")
    );
    ensure!(ingress_ips(&services.get("c").await?).is_empty());
    ensure!(ingress_ips(&services.get("foreign").await?).is_empty());
    ensure!(
        !server
            .kubectl_ok(&["describe", "svc", "foreign"])
            .contains("AllocationFailed"),
        "the foreign service got an event"
    );

    // Freeing an address serves the waiting service.
    server.kubectl_ok(&["delete", "svc", "a"]);
    ensure!(wait_for_ip(&services, "e").await? == "192.0.2.10");
    // No longer a LoadBalancer: the address goes back. (The API server does not yet drop the
    // type's fields itself, as Kubernetes does; the patch removes them.)
    server.kubectl_ok(&[
        "patch",
        "svc",
        "d",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/type","value":"ClusterIP"},
            {"op":"remove","path":"/spec/ports/0/nodePort"},
            {"op":"remove","path":"/spec/allocateLoadBalancerNodePorts"},
            {"op":"remove","path":"/spec/externalTrafficPolicy"}]"#,
    ]);
    eventually("d released its address", SETTLE, || async {
        Ok(ingress_ips(&services.get("d").await?).is_empty().then_some(()))
    })
    .await?;

    // After a restart the table is rebuilt from the statuses: nothing moves, nothing is
    // handed out twice, and the freed address goes to the next service.
    server.restart().await?;
    let client = server.kube_client().await?;
    let services: Api<Service> = Api::namespaced(client, "default");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &service("f", json!({}), json!({})));
    ensure!(wait_for_ip(&services, "f").await? == "192.0.2.11");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(ingress_ips(&services.get("b").await?) == ["192.0.2.12"]);
    ensure!(ingress_ips(&services.get("e").await?) == ["192.0.2.10"]);
    ensure!(ingress_ips(&services.get("c").await?).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_come_from_the_pool_embedded() -> Result<()> {
    addresses_come_from_the_pool(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_come_from_the_pool_etcd() -> Result<()> {
    addresses_come_from_the_pool(Backend::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pool_services_stay_pending_and_say_why() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &service("web", json!({}), json!({})));
    let described = wait_for_event(&server, "web", "no load-balancer address pool is configured").await?;
    ensure!(described.contains("--load-balancer-pool"), "{described}");
    ensure!(external_ip(&server, "web") == "<pending>");
    Ok(())
}

#[test]
fn a_bad_pool_keeps_the_server_from_starting() -> Result<()> {
    let bin = required_binary("WEIR_BIN", workspace_dir().join("target/debug/weir"), "the weir binary")?;
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "server",
        "--secure-port",
        "0",
        "--load-balancer-pool",
        "192.0.2.20-192.0.2.10",
    ])
    .arg("--data-dir")
    .arg(dir.path());
    let out = run_bounded(cmd, None, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started with a bad pool: {stderr}");
    ensure!(
        stderr.contains("--load-balancer-pool") && stderr.contains("\"192.0.2.20-192.0.2.10\" ends before it starts"),
        "{stderr}"
    );
    Ok(())
}
