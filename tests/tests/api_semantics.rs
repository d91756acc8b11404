//! API semantics not covered by the error tests: health and metrics endpoints, selectors,
//! deletecollection, subresources (status, scale, binding), immutable fields, bookmarks, a
//! paginated list that outlives the watch cache's revision, and namespace termination.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use weir_tests::{Backend, TestServer, WatchEvents, config_map, create_namespace, expect_ok, expect_status};

const PODS: &str = "/api/v1/namespaces/default/pods";
const CONFIG_MAPS: &str = "/api/v1/namespaces/default/configmaps";

fn pod(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn health_endpoints_are_public_and_metrics_count_requests() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let anonymous = server.anonymous_http_client()?;
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let response = anonymous.get(server.url(path)).send().await?;
        ensure!(response.status() == 200, "{path}: {}", response.status());
    }
    expect_status(anonymous.get(server.url("/metrics")).send().await?, 401, "Unauthorized").await?;
    let client = server.http_client()?;
    expect_ok(client.get(server.url(CONFIG_MAPS)).send().await?, 200).await?;
    let metrics = client.get(server.url("/metrics")).send().await?.text().await?;
    ensure!(
        metrics.lines().any(|l| l.starts_with("apiserver_request_total{")
            && l.contains("resource=\"configmaps\"")
            && l.contains("verb=\"list\"")),
        "no list count for configmaps in:\n{metrics}"
    );
    ensure!(
        metrics.contains("apiserver_request_duration_seconds_bucket"),
        "no latency histogram"
    );
    Ok(())
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_and_deletecollection() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    for (name, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
        expect_ok(
            client
                .post(server.url(PODS))
                .json(&pod(name, json!({"app": app})))
                .send()
                .await?,
            201,
        )
        .await?;
    }
    // A Binding for another pod of the same name (another uid) is refused.
    let stale = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "a", "uid": "not-this-pod"},
        "target": {"kind": "Node", "name": "n1"}});
    let refused = client
        .post(server.url(&format!("{PODS}/a/binding")))
        .json(&stale)
        .send()
        .await?;
    expect_status(refused, 409, "Conflict").await?;
    // Bind one pod and give another a phase, so node and phase selectors have something to find.
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "a"}, "target": {"kind": "Node", "name": "n1"}});
    expect_ok(
        client
            .post(server.url(&format!("{PODS}/a/binding")))
            .json(&binding)
            .send()
            .await?,
        201,
    )
    .await?;
    let again = client
        .post(server.url(&format!("{PODS}/a/binding")))
        .json(&binding)
        .send()
        .await?;
    expect_status(again, 409, "Conflict").await?;
    let bound = expect_ok(client.get(server.url(&format!("{PODS}/a"))).send().await?, 200).await?;
    ensure!(
        bound["spec"]["nodeName"] == "n1",
        "binding did not set nodeName: {bound}"
    );

    // A merge patch of the status subresource: the scheduler writes the same pod's conditions
    // concurrently, so a read-modify-write PUT could meet a (correct) 409.
    let running = client
        .patch(server.url(&format!("{PODS}/c/status")))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"status":{"phase":"Running"}}"#)
        .send()
        .await?;
    expect_ok(running, 200).await?;

    let list = |query: &'static str| {
        let client = client.clone();
        let url = server.url(&format!("{PODS}?{query}"));
        async move { expect_ok(client.get(url).send().await?, 200).await }
    };
    ensure!(names(&list("labelSelector=app%3Dweb").await?) == ["a", "b"]);
    ensure!(names(&list("labelSelector=app%20in%20(db)").await?) == ["c"]);
    ensure!(names(&list("fieldSelector=spec.nodeName%3Dn1").await?) == ["a"]);
    ensure!(names(&list("fieldSelector=status.phase%3DRunning").await?) == ["c"]);
    ensure!(names(&list("fieldSelector=metadata.name!%3Da").await?) == ["b", "c"]);
    let all_namespaces = expect_ok(
        client
            .get(server.url("/api/v1/pods?labelSelector=app%3Dweb"))
            .send()
            .await?,
        200,
    )
    .await?;
    ensure!(names(&all_namespaces) == ["a", "b"]);

    let deleted = expect_ok(
        client
            .delete(server.url(&format!("{PODS}?labelSelector=app%3Dweb")))
            .send()
            .await?,
        200,
    )
    .await?;
    ensure!(names(&deleted) == ["a", "b"], "deletecollection returned {deleted}");
    // The bound pod terminates gracefully, as in Kubernetes: marked with a deletionTimestamp 30 s
    // ahead until its node's agent finishes it; its node does not exist, so PodGC removes it.
    let left = list("").await?;
    ensure!(names(&left) == ["a", "c"], "{left}");
    let terminating = &left["items"][0];
    ensure!(
        terminating["metadata"]["deletionGracePeriodSeconds"] == 30
            && terminating["metadata"]["deletionTimestamp"].is_string(),
        "{terminating}"
    );
    weir_tests::eventually(
        "PodGC removes the pod of the missing node",
        Duration::from_secs(20),
        || async { Ok((names(&list("").await?) == ["c"]).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn status_and_main_resource_updates_do_not_touch_each_other() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let deployments = "/apis/apps/v1/namespaces/default/deployments";
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}});
    let created = expect_ok(
        client.post(server.url(deployments)).json(&deployment).send().await?,
        201,
    )
    .await?;
    ensure!(created["metadata"]["generation"] == 1);
    ensure!(
        created["spec"]["strategy"]["type"] == "RollingUpdate",
        "defaults: {created}"
    );

    // The Deployment controller writes this object's status concurrently, so every write here is
    // a merge patch without a resourceVersion and every check reads the write's own answer.
    let merge = |path: String, body: &'static str| {
        let request = client
            .patch(server.url(&path))
            .header("Content-Type", "application/merge-patch+json")
            .body(body);
        async move { expect_ok(request.send().await?, 200).await }
    };
    // A status write keeps the spec and the generation.
    let after_status = merge(
        format!("{deployments}/web/status"),
        r#"{"spec":{"replicas":9},"status":{"observedGeneration":42}}"#,
    )
    .await?;
    ensure!(after_status["status"]["observedGeneration"] == 42 && after_status["spec"]["replicas"] == 2);
    ensure!(after_status["metadata"]["generation"] == 1);

    // A main-resource write ignores the status and bumps the generation on a spec change.
    let after_edit = merge(
        format!("{deployments}/web"),
        r#"{"spec":{"replicas":3},"status":{"observedGeneration":99}}"#,
    )
    .await?;
    ensure!(after_edit["spec"]["replicas"] == 3 && after_edit["metadata"]["generation"] == 2);
    ensure!(
        after_edit["status"]["observedGeneration"] != 99,
        "status changed through the main resource"
    );

    // The scale subresource reads and writes spec.replicas.
    let scale = expect_ok(
        client
            .get(server.url(&format!("{deployments}/web/scale")))
            .send()
            .await?,
        200,
    )
    .await?;
    ensure!(scale["kind"] == "Scale" && scale["spec"]["replicas"] == 3 && scale["status"]["selector"] == "app=web");
    let patched = client
        .patch(server.url(&format!("{deployments}/web/scale")))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"spec":{"replicas":5}}"#)
        .send()
        .await?;
    expect_ok(patched, 200).await?;
    let now = expect_ok(client.get(server.url(&format!("{deployments}/web"))).send().await?, 200).await?;
    ensure!(now["spec"]["replicas"] == 5);

    // The selector is immutable.
    let bad = client
        .patch(server.url(&format!("{deployments}/web")))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"spec":{"selector":{"matchLabels":{"app":"other"}},"template":{"metadata":{"labels":{"app":"other"}}}}}"#)
        .send()
        .await?;
    let status = expect_status(bad, 422, "Invalid").await?;
    ensure!(status["details"]["causes"][0]["field"] == "spec.selector", "{status}");
    Ok(())
}

#[tokio::test]
async fn watches_send_bookmarks_when_asked() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    let list = expect_ok(client.get(server.url(CONFIG_MAPS)).send().await?, 200).await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let url = server.url(&format!(
        "{CONFIG_MAPS}?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
    ));
    let mut events = WatchEvents::new(client.get(url).send().await?).with_bookmarks();
    let bookmark = events.next(Duration::from_secs(15)).await?;
    ensure!(bookmark["type"] == "BOOKMARK", "expected a bookmark, got {bookmark}");
    ensure!(
        bookmark["object"]["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );
    Ok(())
}

#[tokio::test]
async fn a_paginated_list_stays_at_its_revision_while_objects_change() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.http_client()?;
    create_namespace(&client, &server, "paged").await?;
    let cms = "/api/v1/namespaces/paged/configmaps";
    for i in 0..6 {
        expect_ok(
            client
                .post(server.url(cms))
                .json(&config_map(&format!("cm-{i}"), json!({})))
                .send()
                .await?,
            201,
        )
        .await?;
    }
    let first = expect_ok(client.get(server.url(&format!("{cms}?limit=3"))).send().await?, 200).await?;
    let token = first["metadata"]["continue"].as_str().unwrap_or_default().to_string();
    ensure!(!token.is_empty(), "first page has no continue token: {first}");
    // Changes after the first page: a new object and a deleted one are not seen by the rest.
    expect_ok(
        client
            .post(server.url(cms))
            .json(&config_map("cm-9", json!({})))
            .send()
            .await?,
        201,
    )
    .await?;
    expect_ok(client.delete(server.url(&format!("{cms}/cm-4"))).send().await?, 200).await?;
    let rest = expect_ok(
        client
            .get(server.url(&format!("{cms}?limit=10&continue={token}")))
            .send()
            .await?,
        200,
    )
    .await?;
    ensure!(
        names(&rest) == ["cm-3", "cm-4", "cm-5"],
        "second page at the pinned revision: {rest}"
    );
    ensure!(rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]);
    Ok(())
}

#[tokio::test]
async fn kubectl_delete_namespace_removes_its_objects() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    server.kubectl_ok(&["create", "namespace", "doomed"]);
    server.kubectl_ok(&["-n", "doomed", "create", "configmap", "c", "--from-literal=a=b"]);
    server.kubectl_ok(&["-n", "doomed", "create", "service", "clusterip", "s", "--tcp=80:80"]);
    server.kubectl_ok(&["delete", "namespace", "doomed", "--timeout=60s"]);
    let left = server.kubectl(&["get", "namespace", "doomed"]);
    ensure!(!left.status.success(), "namespace still there");
    let client = server.http_client()?;
    let services = expect_ok(client.get(server.url("/api/v1/services")).send().await?, 200).await?;
    ensure!(names(&services) == ["kubernetes"], "services left: {services}");
    Ok(())
}
