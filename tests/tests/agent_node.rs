//! The node agent's Node against a real server: registration with the machine's capacity,
//! Ready=False with the agent's reason until it says it is ready, Lease heartbeats that keep
//! the node lifecycle controller from marking it Unknown, a podCIDR from node IPAM, taking
//! over an existing Node of the same name, and the Lease going with its Node.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use tokio::sync::watch;
use weir_agent::node::{self, NodeConfig, Readiness};
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);

fn ready(node: &Node) -> Option<(String, String)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.message.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_its_node_heartbeats_and_reports_readiness() -> Result<()> {
    let server = TestServer::start_with_args(Backend::Embedded, &["--node-monitor-grace-period", "3s"]).await?;
    let client = server.kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let data_dir = tempfile::tempdir()?;
    let config = NodeConfig {
        heartbeat: Duration::from_millis(500),
        runtime_version: "containerd://1.6.20".into(),
        labels: [("weir.dev/test".to_owned(), "yes".to_owned())].into(),
        ..NodeConfig::new("agent-a", data_dir.path())
    };
    let (say, readiness) = watch::channel(Readiness::NotReady("container runtime is starting".into()));
    let registered = node::register(client.clone(), config.clone(), readiness).await?;

    let n = nodes.get("agent-a").await?;
    ensure!(
        ready(&n) == Some(("False".into(), "container runtime is starting".into())),
        "{:?}",
        n.status
    );
    let status = n.status.clone().unwrap();
    ensure!(status.capacity.as_ref().unwrap()["pods"].0 == "110");
    ensure!(status.node_info.as_ref().unwrap().container_runtime_version == "containerd://1.6.20");
    ensure!(n.metadata.labels.as_ref().unwrap()["weir.dev/test"] == "yes");
    let lease = leases.get("agent-a").await?;
    ensure!(lease.metadata.owner_references.as_ref().unwrap()[0].kind == "Node");

    say.send(Readiness::Ready)?;
    eventually("the node turns Ready", SETTLE, || async {
        Ok((ready(&nodes.get("agent-a").await?).map(|r| r.0) == Some("True".into())).then_some(()))
    })
    .await?;
    let pod_cidr = eventually("node IPAM gives the node a podCIDR", SETTLE, || async {
        Ok(nodes.get("agent-a").await?.spec.and_then(|s| s.pod_cidr))
    })
    .await?;
    // Three grace periods later the heartbeats have kept it Ready and untainted.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let n = nodes.get("agent-a").await?;
    ensure!(ready(&n).map(|r| r.0) == Some("True".into()), "{:?}", n.status);
    ensure!(
        n.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_none_or(|t| t.is_empty()),
        "{:?}",
        n.spec
    );
    let out = server.kubectl(&["get", "node", "agent-a", "--no-headers"]);
    ensure!(String::from_utf8_lossy(&out.stdout).contains(" Ready "), "{out:?}");

    // A restarted agent takes its Node over: labels updated, the podCIDR kept.
    registered.stop();
    let config = NodeConfig {
        labels: [("weir.dev/test".to_owned(), "again".to_owned())].into(),
        ..config
    };
    let (_say, readiness) = watch::channel(Readiness::Ready);
    let registered = node::register(client.clone(), config, readiness).await?;
    let n = nodes.get("agent-a").await?;
    ensure!(n.metadata.labels.as_ref().unwrap()["weir.dev/test"] == "again");
    ensure!(n.spec.as_ref().and_then(|s| s.pod_cidr.clone()) == Some(pod_cidr));

    // Stopped for good: the node lifecycle controller marks it Unknown.
    registered.stop();
    eventually("a silent node turns Unknown", SETTLE, || async {
        Ok((ready(&nodes.get("agent-a").await?).map(|r| r.0) == Some("Unknown".into())).then_some(()))
    })
    .await?;

    // The Lease is owned by the Node and goes with it.
    nodes.delete("agent-a", &Default::default()).await?;
    eventually("the lease is garbage-collected", SETTLE, || async {
        Ok(leases.get_opt("agent-a").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_node_name_is_refused_before_anything_is_written() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.kube_client().await?;
    let (_say, readiness) = watch::channel(Readiness::Ready);
    let data_dir = tempfile::tempdir()?;
    let err = match node::register(client, NodeConfig::new("Agent_A", data_dir.path()), readiness).await {
        Ok(_) => anyhow::bail!("an invalid name was accepted"),
        Err(e) => e,
    };
    ensure!(err.to_string().contains("not a valid Kubernetes name"), "{err}");
    Ok(())
}

/// Joining with the server's token gives the node a client certificate (system:node:<name>)
/// that the API server accepts; a token for another CA is refused before the secret is
/// sent, and a wrong secret is refused by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_the_token_and_a_wrong_token_is_refused() -> Result<()> {
    use weir_agent::join::{self, JoinError, Token};
    let server = TestServer::start(Backend::Embedded).await?;
    let token_text = std::fs::read_to_string(server.data_dir().join("node-token"))?;
    let token: Token = token_text.parse()?;
    let url = server.base_url();

    let credentials = join::join_with_addresses(&url, &token, "joined-a", &["127.0.0.1".parse()?]).await?;
    ensure!(credentials.client_cert.contains("BEGIN CERTIFICATE"));
    // The streaming server's certificate and key come with it, and are kept next to the
    // kubeconfig (the streaming tests check that the API server accepts it for the address).
    ensure!(credentials.serving_cert.contains("BEGIN CERTIFICATE") && credentials.serving_key.contains("PRIVATE KEY"));
    ensure!(credentials.serving_cert != credentials.client_cert);
    let dir = tempfile::tempdir()?;
    let (cert, key) = credentials.write_serving_certificate(dir.path())?;
    ensure!(std::fs::read_to_string(&cert)? == credentials.serving_cert);
    use std::os::unix::fs::PermissionsExt as _;
    ensure!(std::fs::metadata(&key)?.permissions().mode() & 0o777 == 0o600);
    let kubeconfig = dir.path().join("kubeconfig");
    credentials.write_kubeconfig(&kubeconfig, &url, "joined-a")?;
    let config =
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&kubeconfig)?, &Default::default())
            .await?;
    let client = kube::Client::try_from(config)?;
    let (_say, readiness) = watch::channel(Readiness::Ready);
    let data_dir = tempfile::tempdir()?;
    let _node = node::register(client.clone(), NodeConfig::new("joined-a", data_dir.path()), readiness).await?;
    let nodes: Api<Node> = Api::all(server.kube_client().await?);
    ensure!(nodes.get_opt("joined-a").await?.is_some());

    // A node's credentials do what a kubelet does, no more: reading is fine, creating a
    // namespace or changing another node is forbidden.
    let as_node: Api<Node> = Api::all(client.clone());
    ensure!(as_node.list(&Default::default()).await?.items.len() >= 1);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "made-by-a-node"}}))?;
    match namespaces.create(&Default::default(), &namespace).await {
        Err(kube::Error::Api(status)) if status.code == 403 => ensure!(
            status
                .message
                .contains("User \"system:node:joined-a\" cannot create resource \"namespaces\""),
            "{}",
            status.message
        ),
        other => anyhow::bail!("a node must not create namespaces: {other:?}"),
    }
    fake::node(
        &server.kube_client().await?,
        "other-node",
        "4",
        "8Gi",
        serde_json::json!({}),
        serde_json::json!([]),
    )
    .await?;
    let label = serde_json::json!({"metadata": {"labels": {"hijacked": "yes"}}});
    match as_node
        .patch("other-node", &Default::default(), &kube::api::Patch::Merge(&label))
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("a node must not change another node: {other:?}"),
    }

    // The right secret with another cluster's CA hash: refused here, nothing sent.
    let wrong_ca = Token {
        ca_hash: "00".repeat(32),
        ..token.clone()
    };
    match join::join(&url, &wrong_ca, "joined-b").await {
        Err(JoinError::CaMismatch { .. }) => {}
        other => anyhow::bail!("a token for another CA must be refused: {other:?}"),
    }
    // The right CA with a wrong secret: the server says no.
    let wrong_secret = Token {
        secret: "not-the-secret".into(),
        ..token
    };
    match join::join(&url, &wrong_secret, "joined-b").await {
        Err(JoinError::Refused(message)) => ensure!(message.contains("node-token"), "{message}"),
        other => anyhow::bail!("a wrong secret must be refused: {other:?}"),
    }
    Ok(())
}
