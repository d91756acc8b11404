//! The API's contract over raw HTTPS: authentication, Status errors with Kubernetes' codes and
//! reasons (and nothing half written after them), IP and port allocation, generateName,
//! pagination, watch, finalizers and dry run.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weir_tests::{
    Backend, TestServer, WatchEvents, config_map, create_namespace, expect_ok, expect_status, in_service_cidr,
    json_response,
};

const CONFIG_MAPS: &str = "/api/v1/namespaces/default/configmaps";
const SERVICES: &str = "/api/v1/namespaces/default/services";
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

async fn get_config_map(server: &TestServer, client: &reqwest::Client, name: &str) -> Result<Value> {
    expect_ok(
        client.get(server.url(&format!("{CONFIG_MAPS}/{name}"))).send().await?,
        200,
    )
    .await
}

async fn expect_config_map_absent(server: &TestServer, client: &reqwest::Client, name: &str) -> Result<()> {
    let response = client.get(server.url(&format!("{CONFIG_MAPS}/{name}"))).send().await?;
    expect_status(response, 404, "NotFound")
        .await
        .with_context(|| format!("configmap {name} must not exist"))?;
    Ok(())
}

async fn create_config_map(server: &TestServer, client: &reqwest::Client, body: &Value) -> Result<Value> {
    expect_ok(client.post(server.url(CONFIG_MAPS)).json(body).send().await?, 201).await
}

/// The `details.causes[].field` values of an Invalid Status.
fn cause_fields(status: &Value) -> Vec<String> {
    status["details"]["causes"]
        .as_array()
        .map(|causes| {
            causes
                .iter()
                .filter_map(|c| c["field"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_without_valid_credentials_get_401() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let anonymous = server.anonymous_http_client()?;
    let response = anonymous.get(server.url("/api/v1/namespaces")).send().await?;
    expect_status(response, 401, "Unauthorized")
        .await
        .context("no credentials")?;

    let response = anonymous
        .get(server.url("/api/v1/namespaces"))
        .bearer_auth("not-the-admin-token")
        .send()
        .await?;
    expect_status(response, 401, "Unauthorized")
        .await
        .context("wrong bearer token")?;

    let response = anonymous
        .post(server.url(CONFIG_MAPS))
        .json(&config_map("sneaky", json!({"a": "b"})))
        .send()
        .await?;
    expect_status(response, 401, "Unauthorized")
        .await
        .context("anonymous create")?;
    expect_config_map_absent(&server, &server.http_client()?, "sneaky").await?;

    // Health and version stay open to anonymous callers, as in Kubernetes.
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let response = anonymous.get(server.url(path)).send().await?;
        ensure!(
            response.status() == 200,
            "anonymous GET {path} answered {}",
            response.status()
        );
    }
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_get_400_and_change_nothing() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let before = create_config_map(&server, &client, &config_map("existing", json!({"key": "original"}))).await?;

    let response = client
        .post(server.url(CONFIG_MAPS))
        .header("Content-Type", "application/json")
        .body(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"broken""#)
        .send()
        .await?;
    expect_status(response, 400, "BadRequest")
        .await
        .context("truncated JSON create")?;
    expect_config_map_absent(&server, &client, "broken").await?;

    let response = client
        .put(server.url(&format!("{CONFIG_MAPS}/existing")))
        .header("Content-Type", "application/json")
        .body(r#"{"apiVersion":"v1","kind":"ConfigMap","data":{"key":"#)
        .send()
        .await?;
    expect_status(response, 400, "BadRequest")
        .await
        .context("truncated JSON update")?;

    let response = client
        .patch(server.url(&format!("{CONFIG_MAPS}/existing")))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"data": {"key": "changed"#)
        .send()
        .await?;
    expect_status(response, 400, "BadRequest")
        .await
        .context("truncated merge patch")?;

    let bad_yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: existing\ndata: {key: [unclosed\n  - : :\n";
    for name in ["existing", "applied"] {
        let response = client
            .patch(server.url(&format!("{CONFIG_MAPS}/{name}?fieldManager=e2e")))
            .header("Content-Type", "application/apply-patch+yaml")
            .body(bad_yaml.replace("name: existing", &format!("name: {name}")))
            .send()
            .await?;
        expect_status(response, 400, "BadRequest")
            .await
            .with_context(|| format!("malformed apply YAML for {name}"))?;
    }
    expect_config_map_absent(&server, &client, "applied").await?;

    let after = get_config_map(&server, &client, "existing").await?;
    ensure!(
        after["data"] == before["data"],
        "data changed by failed writes: {after}"
    );
    ensure!(
        after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"],
        "resourceVersion changed by failed writes: {} -> {}",
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
    Ok(())
}

#[tokio::test]
async fn unknown_resources_and_objects_get_404() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    for path in [
        "/api/v1/namespaces/default/widgets",
        "/apis/apps/v1/namespaces/default/widgets",
        "/apis/example.com/v1/widgets",
    ] {
        let response = client.get(server.url(path)).send().await?;
        ensure!(response.status() == 404, "GET {path} answered {}", response.status());
    }
    let response = client
        .get(server.url(&format!("{CONFIG_MAPS}/no-such-map")))
        .send()
        .await?;
    let status = expect_status(response, 404, "NotFound").await?;
    ensure!(
        status["details"]["name"] == "no-such-map" && status["details"]["kind"] == "configmaps",
        "details should name the object: {status}"
    );
    ensure!(
        status["message"] == r#"configmaps "no-such-map" not found"#,
        "message as Kubernetes words it: {status}"
    );
    let response = client
        .get(server.url("/api/v1/namespaces/no-such-ns/configmaps/x"))
        .send()
        .await?;
    expect_status(response, 404, "NotFound").await?;
    Ok(())
}

#[tokio::test]
async fn creating_an_existing_object_gets_409_already_exists() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let first = create_config_map(&server, &client, &config_map("twice", json!({"v": "first"}))).await?;
    let response = client
        .post(server.url(CONFIG_MAPS))
        .json(&config_map("twice", json!({"v": "second"})))
        .send()
        .await?;
    let status = expect_status(response, 409, "AlreadyExists").await?;
    ensure!(status["details"]["name"] == "twice", "details.name: {status}");
    let stored = get_config_map(&server, &client, "twice").await?;
    ensure!(
        stored["data"]["v"] == "first",
        "the second create overwrote the first: {stored}"
    );
    ensure!(stored["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]);
    Ok(())
}

#[tokio::test]
async fn update_with_a_stale_resource_version_gets_409_conflict() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let created = create_config_map(&server, &client, &config_map("versioned", json!({"v": "1"}))).await?;
    let url = server.url(&format!("{CONFIG_MAPS}/versioned"));

    let mut update = created.clone();
    update["data"]["v"] = json!("2");
    let updated = expect_ok(client.put(&url).json(&update).send().await?, 200).await?;
    ensure!(
        updated["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"],
        "an update must change resourceVersion"
    );

    let mut stale = created.clone();
    stale["data"]["v"] = json!("3");
    let status = expect_status(client.put(&url).json(&stale).send().await?, 409, "Conflict").await?;
    ensure!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("the object has been modified")),
        "Kubernetes' conflict message: {status}"
    );
    let stored = get_config_map(&server, &client, "versioned").await?;
    ensure!(stored["data"]["v"] == "2", "stale update was written: {stored}");
    ensure!(stored["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]);
    Ok(())
}

#[tokio::test]
async fn bodies_over_3_mib_get_413() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let huge = config_map("huge", json!({"blob": "x".repeat(3 * 1024 * 1024 + 1024)}));
    let response = client
        .post(server.url(CONFIG_MAPS))
        .json(&huge)
        .send()
        .await
        .context("the server should answer 413, not drop the connection")?;
    expect_status(response, 413, "RequestEntityTooLarge").await?;
    expect_config_map_absent(&server, &client, "huge").await?;
    // The connection pool and server are still fine afterwards.
    create_config_map(&server, &client, &config_map("small", json!({"a": "b"}))).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_objects_get_422_naming_the_field() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;

    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "empty"},
        "spec": {"containers": []},
    });
    let response = client
        .post(server.url("/api/v1/namespaces/default/pods"))
        .json(&pod)
        .send()
        .await?;
    let status = expect_status(response, 422, "Invalid")
        .await
        .context("pod without containers")?;
    ensure!(
        cause_fields(&status).iter().any(|f| f == "spec.containers"),
        "causes: {status}"
    );
    ensure!(
        status["details"]["kind"] == "Pod" && status["details"]["name"] == "empty",
        "details: {status}"
    );
    let response = client
        .get(server.url("/api/v1/namespaces/default/pods/empty"))
        .send()
        .await?;
    expect_status(response, 404, "NotFound")
        .await
        .context("the invalid pod must not be stored")?;

    let response = client
        .post(server.url(CONFIG_MAPS))
        .json(&config_map("Bad_Name", json!({})))
        .send()
        .await?;
    let status = expect_status(response, 422, "Invalid")
        .await
        .context("uppercase name")?;
    ensure!(
        cause_fields(&status).iter().any(|f| f == "metadata.name"),
        "causes: {status}"
    );
    let response = client
        .get(server.url(&format!("{CONFIG_MAPS}/Bad_Name")))
        .send()
        .await?;
    ensure!(response.status() == 404, "invalid name stored? {}", response.status());

    // An invalid update leaves the stored object alone.
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ports"},
        "spec": {"ports": [{"port": 80}]},
    });
    let created = expect_ok(client.post(server.url(SERVICES)).json(&service).send().await?, 201).await?;
    let mut invalid = created.clone();
    invalid["spec"]["ports"][0]["port"] = json!(70000);
    let response = client
        .put(server.url(&format!("{SERVICES}/ports")))
        .json(&invalid)
        .send()
        .await?;
    let status = expect_status(response, 422, "Invalid")
        .await
        .context("port out of range")?;
    ensure!(
        cause_fields(&status).iter().any(|f| f == "spec.ports[0].port"),
        "causes: {status}"
    );
    let stored = expect_ok(client.get(server.url(&format!("{SERVICES}/ports"))).send().await?, 200).await?;
    ensure!(
        stored["spec"]["ports"][0]["port"] == 80,
        "invalid update was written: {stored}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_fields_fail_only_under_strict_field_validation() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let mut body = config_map("strict", json!({"a": "b"}));
    body["bogus"] = json!(1);
    let response = client
        .post(server.url(&format!("{CONFIG_MAPS}?fieldValidation=Strict")))
        .json(&body)
        .send()
        .await?;
    let status = expect_status(response, 400, "BadRequest").await?;
    ensure!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown field") && m.contains("bogus")),
        "message should name the field: {status}"
    );
    expect_config_map_absent(&server, &client, "strict").await?;

    // Kubernetes' default (Warn) accepts the object, drops the field and warns.
    let response = client.post(server.url(CONFIG_MAPS)).json(&body).send().await?;
    let warning = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let stored = expect_ok(response, 201).await?;
    ensure!(stored.get("bogus").is_none(), "unknown field stored: {stored}");
    ensure!(
        warning.contains("bogus"),
        "expected a Warning header naming the field, got {warning:?}"
    );
    Ok(())
}

#[tokio::test]
async fn cluster_ips_come_from_the_service_cidr_and_are_unique() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let mut ips = BTreeSet::new();
    for name in ["alpha", "beta"] {
        let service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
        });
        let created = expect_ok(client.post(server.url(SERVICES)).json(&service).send().await?, 201).await?;
        let ip = created["spec"]["clusterIP"].as_str().unwrap_or_default().to_string();
        ensure!(
            in_service_cidr(&ip),
            "{name} got cluster IP {ip:?}, outside 10.96.0.0/12"
        );
        ensure!(ip != "10.96.0.1", "{name} got the kubernetes service's IP");
        ensure!(
            created["spec"]["clusterIPs"] == json!([ip]),
            "clusterIPs mirrors clusterIP: {created}"
        );
        ensure!(
            created["spec"]["type"] == "ClusterIP",
            "type defaults to ClusterIP: {created}"
        );
        ensure!(ips.insert(ip.clone()), "{ip} handed out twice");
    }
    let headless = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless"},
        "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]},
    });
    let created = expect_ok(client.post(server.url(SERVICES)).json(&headless).send().await?, 201).await?;
    ensure!(
        created["spec"]["clusterIP"] == "None",
        "headless service kept None: {created}"
    );

    // A taken IP asked for explicitly is refused.
    let taken = ips.iter().next().cloned().unwrap_or_default();
    let clash = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "clash"},
        "spec": {"clusterIP": taken, "ports": [{"port": 80}]},
    });
    let response = client.post(server.url(SERVICES)).json(&clash).send().await?;
    let status = expect_status(response, 422, "Invalid")
        .await
        .context("duplicate clusterIP")?;
    ensure!(
        cause_fields(&status).iter().any(|f| f == "spec.clusterIPs"),
        "causes: {status}"
    );
    Ok(())
}

#[tokio::test]
async fn node_ports_are_unique_in_range_and_reusable_after_delete() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let node_port_service = |name: &str, node_port: Option<u16>| {
        let mut port = json!({"port": 80, "targetPort": 80});
        if let Some(node_port) = node_port {
            port["nodePort"] = json!(node_port);
        }
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [port]},
        })
    };
    let mut ports = BTreeSet::new();
    for name in ["np-a", "np-b"] {
        let created = expect_ok(
            client
                .post(server.url(SERVICES))
                .json(&node_port_service(name, None))
                .send()
                .await?,
            201,
        )
        .await?;
        let port = created["spec"]["ports"][0]["nodePort"].as_u64().unwrap_or_default();
        ensure!(
            (30000..=32767).contains(&port),
            "{name} got node port {port}: {created}"
        );
        ensure!(ports.insert(port), "node port {port} handed out twice");
    }

    let fixed = 30555;
    expect_ok(
        client
            .post(server.url(SERVICES))
            .json(&node_port_service("np-fixed", Some(fixed)))
            .send()
            .await?,
        201,
    )
    .await?;
    let response = client
        .post(server.url(SERVICES))
        .json(&node_port_service("np-clash", Some(fixed)))
        .send()
        .await?;
    let status = expect_status(response, 422, "Invalid")
        .await
        .context("node port already allocated")?;
    ensure!(
        cause_fields(&status).iter().any(|f| f == "spec.ports[0].nodePort"),
        "causes: {status}"
    );
    let response = client.get(server.url(&format!("{SERVICES}/np-clash"))).send().await?;
    ensure!(
        response.status() == 404,
        "refused service stored? {}",
        response.status()
    );

    expect_ok(
        client
            .delete(server.url(&format!("{SERVICES}/np-fixed")))
            .send()
            .await?,
        200,
    )
    .await?;
    let reused = expect_ok(
        client
            .post(server.url(SERVICES))
            .json(&node_port_service("np-again", Some(fixed)))
            .send()
            .await?,
        201,
    )
    .await
    .context("a deleted service's node port is free again")?;
    ensure!(reused["spec"]["ports"][0]["nodePort"] == fixed);
    Ok(())
}

#[tokio::test]
async fn generate_name_gives_unique_names() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let mut names = BTreeSet::new();
    for _ in 0..5 {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}});
        let created = create_config_map(&server, &client, &body).await?;
        let name = created["metadata"]["name"].as_str().unwrap_or_default().to_string();
        ensure!(
            name.starts_with("gen-") && name.len() > "gen-".len(),
            "generated name {name:?}"
        );
        ensure!(created["metadata"]["generateName"] == "gen-");
        get_config_map(&server, &client, &name).await?;
        ensure!(names.insert(name.clone()), "{name} generated twice");
    }
    Ok(())
}

#[tokio::test]
async fn list_pages_return_every_object_exactly_once() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    create_namespace(&client, &server, "paging").await?;
    let collection = "/api/v1/namespaces/paging/configmaps";
    let mut expected = BTreeSet::new();
    for i in 0..25 {
        let name = format!("page-{i:02}");
        let response = client
            .post(server.url(collection))
            .json(&config_map(&name, json!({"i": i.to_string()})))
            .send()
            .await?;
        expect_ok(response, 201).await?;
        expected.insert(name);
    }

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut continue_token = String::new();
    for _ in 0..10 {
        let mut request = client.get(server.url(collection)).query(&[("limit", "10")]);
        if !continue_token.is_empty() {
            request = request.query(&[("continue", continue_token.as_str())]);
        }
        let page = expect_ok(request.send().await?, 200).await?;
        ensure!(page["kind"] == "ConfigMapList", "list kind: {}", page["kind"]);
        let items = page["items"].as_array().cloned().unwrap_or_default();
        page_sizes.push(items.len());
        seen.extend(
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(String::from)),
        );
        continue_token = page["metadata"]["continue"].as_str().unwrap_or_default().to_string();
        if let Some(remaining) = page["metadata"]["remainingItemCount"].as_u64() {
            ensure!(
                remaining as usize == 25 - seen.len(),
                "remainingItemCount {remaining} after {}",
                seen.len()
            );
        }
        if continue_token.is_empty() {
            break;
        }
    }
    ensure!(page_sizes == [10, 10, 5], "page sizes {page_sizes:?}");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    ensure!(unique.len() == seen.len(), "an object came twice: {seen:?}");
    ensure!(unique == expected, "pages returned {unique:?}");

    let response = client
        .get(server.url(collection))
        .query(&[("limit", "10"), ("continue", "not-a-real-token")])
        .send()
        .await?;
    expect_status(response, 400, "BadRequest")
        .await
        .context("a garbled continue token")?;
    Ok(())
}

#[tokio::test]
async fn watch_from_a_resource_version_replays_then_follows_changes() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    create_namespace(&client, &server, "watched").await?;
    let collection = server.url("/api/v1/namespaces/watched/configmaps");
    let list = expect_ok(client.get(&collection).send().await?, 200).await?;
    let start = list["metadata"]["resourceVersion"]
        .as_str()
        .context("list resourceVersion")?
        .to_string();

    // Made before the watch starts: the watch must replay it from `start`.
    let created = expect_ok(
        client
            .post(&collection)
            .json(&config_map("w", json!({"v": "1"})))
            .send()
            .await?,
        201,
    )
    .await?;
    let response = client
        .get(&collection)
        .query(&[("watch", "true"), ("resourceVersion", start.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 200, "watch answered {}", response.status());
    let mut events = WatchEvents::new(response);

    let added = events.next(EVENT_TIMEOUT).await.context("waiting for ADDED")?;
    ensure!(
        added["type"] == "ADDED" && added["object"]["metadata"]["name"] == "w",
        "first event: {added}"
    );
    ensure!(
        added["object"]["kind"] == "ConfigMap" && added["object"]["apiVersion"] == "v1",
        "{added}"
    );
    ensure!(added["object"]["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]);

    let patch = json!({"data": {"v": "2"}});
    let modified_object = expect_ok(
        client
            .patch(format!("{collection}/w"))
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await?,
        200,
    )
    .await?;
    let modified = events.next(EVENT_TIMEOUT).await.context("waiting for MODIFIED")?;
    ensure!(
        modified["type"] == "MODIFIED" && modified["object"]["data"]["v"] == "2",
        "second event: {modified}"
    );
    ensure!(modified["object"]["metadata"]["resourceVersion"] == modified_object["metadata"]["resourceVersion"]);

    let response = client.delete(format!("{collection}/w")).send().await?;
    ensure!(response.status() == 200, "delete answered {}", response.status());
    let deleted = events.next(EVENT_TIMEOUT).await.context("waiting for DELETED")?;
    ensure!(
        deleted["type"] == "DELETED" && deleted["object"]["metadata"]["name"] == "w",
        "third event: {deleted}"
    );

    let versions: Vec<u64> = [&added, &modified, &deleted]
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    ensure!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions not increasing: {versions:?}"
    );

    // A watch on another namespace sees none of this.
    let response = client
        .get(server.url("/api/v1/namespaces/default/configmaps"))
        .query(&[
            ("watch", "true"),
            ("resourceVersion", start.as_str()),
            ("timeoutSeconds", "2"),
        ])
        .send()
        .await?;
    let mut other = WatchEvents::new(response);
    while let Ok(event) = other.next(Duration::from_secs(5)).await {
        ensure!(
            event["object"]["metadata"]["namespace"] != "watched",
            "leaked across namespaces: {event}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_410_gone_on_embedded_store() -> Result<()> {
    watch_from_a_compacted_resource_version_gets_410_gone(Backend::Embedded).await
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_410_gone_on_etcd() -> Result<()> {
    watch_from_a_compacted_resource_version_gets_410_gone(Backend::Etcd).await
}

/// With `--compaction-interval 1` the store keeps about a second of history, and a restart
/// empties the server's watch cache; a watch from a resourceVersion from before both must be
/// refused with 410 Gone, as Kubernetes does. (The cache alone keeps 50k events, too many to
/// churn through in a test.)
async fn watch_from_a_compacted_resource_version_gets_410_gone(backend: Backend) -> Result<()> {
    let mut server = TestServer::start_with_args(backend, &["--compaction-interval", "1"]).await?;
    let client = server.http_client()?;
    let created = create_config_map(&server, &client, &config_map("churn", json!({"n": "0"}))).await?;
    let old = created["metadata"]["resourceVersion"]
        .as_str()
        .context("resourceVersion")?
        .to_string();
    let mut latest = created;
    for n in 1..=5 {
        latest["data"]["n"] = json!(n.to_string());
        let url = server.url(&format!("{CONFIG_MAPS}/churn"));
        latest = expect_ok(client.put(url).json(&latest).send().await?, 200).await?;
    }

    // Compaction runs every second and compacts up to the previous tick's revision.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.restart().await?;
    let client = server.http_client()?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let response = client
            .get(server.url(CONFIG_MAPS))
            .query(&[
                ("watch", "true"),
                ("resourceVersion", old.as_str()),
                ("timeoutSeconds", "3"),
            ])
            .send()
            .await?;
        // Kubernetes answers either 410 outright or, once the watch is open, with an ERROR
        // event carrying a 410 Status ("too old resource version").
        if response.status() == 410 {
            let (_, status) = json_response(response).await?;
            ensure!(status["code"] == 410 && status["kind"] == "Status", "{status}");
            return Ok(());
        }
        ensure!(response.status() == 200, "watch answered {}", response.status());
        match WatchEvents::new(response).next(Duration::from_secs(5)).await {
            Ok(event) if event["type"] == "ERROR" => {
                ensure!(event["object"]["code"] == 410, "expected a 410 Status in {event}");
                return Ok(());
            }
            Ok(event) => last = format!("still replaying from {old}: {event}"),
            Err(e) => last = format!("{e:#}"),
        }
    }
    bail!("resourceVersion {old} never became too old with --compaction-interval 1 (last: {last})")
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let mut body = config_map("held", json!({"a": "b"}));
    body["metadata"]["finalizers"] = json!(["e2e.weir.dev/hold"]);
    create_config_map(&server, &client, &body).await?;
    let url = server.url(&format!("{CONFIG_MAPS}/held"));

    let response = client.delete(&url).send().await?;
    ensure!(
        matches!(response.status().as_u16(), 200 | 202),
        "delete answered {}",
        response.status()
    );
    let held = get_config_map(&server, &client, "held")
        .await
        .context("the finalizer keeps the object")?;
    ensure!(
        held["metadata"]["deletionTimestamp"].is_string(),
        "deletionTimestamp not set: {held}"
    );
    ensure!(held["metadata"]["finalizers"] == json!(["e2e.weir.dev/hold"]), "{held}");

    let response = client
        .patch(&url)
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"metadata":{"finalizers":null}}"#)
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "removing the finalizer answered {}",
        response.status()
    );
    for _ in 0..100 {
        let response = client.get(&url).send().await?;
        if response.status() == 404 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("object still there 10 s after its last finalizer was removed")
}

#[tokio::test]
async fn dry_run_writes_nothing() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let response = client
        .post(server.url(&format!("{CONFIG_MAPS}?dryRun=All")))
        .json(&config_map("dry", json!({"a": "b"})))
        .send()
        .await?;
    let returned = expect_ok(response, 201).await?;
    ensure!(
        returned["metadata"]["name"] == "dry" && returned["data"]["a"] == "b",
        "{returned}"
    );
    expect_config_map_absent(&server, &client, "dry").await?;

    let kept = create_config_map(&server, &client, &config_map("kept", json!({"a": "b"}))).await?;
    let response = client
        .delete(server.url(&format!("{CONFIG_MAPS}/kept?dryRun=All")))
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "dry-run delete answered {}",
        response.status()
    );
    let response = client
        .patch(server.url(&format!("{CONFIG_MAPS}/kept?dryRun=All")))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"data":{"a":"changed"}}"#)
        .send()
        .await?;
    let patched = expect_ok(response, 200).await?;
    ensure!(
        patched["data"]["a"] == "changed",
        "dry-run patch returns the would-be object: {patched}"
    );
    let stored = get_config_map(&server, &client, "kept").await?;
    ensure!(stored["data"]["a"] == "b", "dry-run patch was written: {stored}");
    ensure!(stored["metadata"]["resourceVersion"] == kept["metadata"]["resourceVersion"]);
    Ok(())
}
