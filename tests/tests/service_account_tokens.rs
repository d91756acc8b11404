//! Service account tokens against a real `weir server`: the TokenRequest subresource issues
//! JWTs with Kubernetes' claims, they authenticate as the service account (which may read
//! discovery only), a forged or stale token is 401, and a node gets tokens only for its own
//! pods — through the agent's `KubeVolumeSource`, as the pod worker will ask for them.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};
use weir_agent::volumes::{KubeVolumeSource, TokenRequestFor, VolumeSource};
use weir_control_plane::apiserver::tokens::{Claims, ISSUER, ServiceAccountTokens};
use weir_tests::{Backend, TestServer, create_namespace, eventually, expect_ok, expect_status};

const SETTLE: Duration = Duration::from_secs(15);

fn claims_of(token: &str) -> Result<Value> {
    let payload = token.split('.').nth(1).context("a JWT has three parts")?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
    )?)
}

fn bearer(server: &TestServer, token: &str) -> Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&server.ca_pem()?)?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    Ok(reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn create(client: &reqwest::Client, server: &TestServer, path: &str, body: Value) -> Result<Value> {
    expect_ok(client.post(server.url(path)).json(&body).send().await?, 201)
        .await
        .with_context(|| format!("POST {path}"))
}

async fn request_token(
    client: &reqwest::Client,
    server: &TestServer,
    account: &str,
    spec: Value,
) -> Result<reqwest::Response> {
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    Ok(client
        .post(server.url(&format!("/api/v1/namespaces/apps/serviceaccounts/{account}/token")))
        .json(&body)
        .send()
        .await?)
}

async fn status_of(client: &reqwest::Client, server: &TestServer, path: &str) -> Result<u16> {
    Ok(client.get(server.url(path)).send().await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_their_account_until_it_or_its_pod_is_gone() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let admin = server.http_client()?;
    create_namespace(&admin, &server, "apps").await?;
    let account = create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/serviceaccounts",
        json!({"metadata": {"name": "builder"}}),
    )
    .await?;
    let pod = create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/pods",
        json!({"metadata": {"name": "web"}, "spec": {"serviceAccountName": "builder", "containers": [{"name": "c", "image": "x"}]}}),
    )
    .await?;
    let pod_uid = pod["metadata"]["uid"].as_str().context("pod uid")?.to_string();

    let issued = expect_ok(
        request_token(&admin, &server, "builder", json!({"expirationSeconds": 600, "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": pod_uid}})).await?,
        201,
    )
    .await?;
    ensure!(
        issued["kind"] == "TokenRequest" && issued["apiVersion"] == "authentication.k8s.io/v1",
        "{issued}"
    );
    ensure!(issued["spec"]["audiences"] == json!([ISSUER]), "{issued}");
    let token = issued["status"]["token"].as_str().context("status.token")?.to_string();
    let expiry: jiff::Timestamp = issued["status"]["expirationTimestamp"]
        .as_str()
        .context("expiry")?
        .parse()?;
    let lifetime = expiry.as_second() - jiff::Timestamp::now().as_second();
    ensure!((590..=601).contains(&lifetime), "expires in {lifetime}s");
    let claims = claims_of(&token)?;
    ensure!(
        claims["iss"] == ISSUER && claims["sub"] == "system:serviceaccount:apps:builder",
        "{claims}"
    );
    ensure!(claims["aud"] == json!([ISSUER]), "{claims}");
    ensure!(
        claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0) == 600,
        "{claims}"
    );
    let k = &claims["kubernetes.io"];
    ensure!(k["namespace"] == "apps", "{claims}");
    ensure!(
        k["serviceaccount"] == json!({"name": "builder", "uid": account["metadata"]["uid"]}),
        "{claims}"
    );
    ensure!(k["pod"] == json!({"name": "web", "uid": pod_uid}), "{claims}");

    // The token is an identity that may read discovery, and nothing else.
    let as_account = bearer(&server, &token)?;
    for path in ["/api", "/api/v1", "/apis", "/apis/apps/v1", "/version"] {
        ensure!(
            status_of(&as_account, &server, path).await? == 200,
            "GET {path} as the service account"
        );
    }
    let denied = expect_status(
        as_account
            .get(server.url("/api/v1/namespaces/apps/pods"))
            .send()
            .await?,
        403,
        "Forbidden",
    )
    .await?;
    ensure!(
        denied["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("User \"system:serviceaccount:apps:builder\" cannot get resource \"pods\""),
        "{denied}"
    );

    // Tampered or foreign signatures are 401.
    let mut tampered = token.clone();
    let last = tampered.pop().context("non-empty")?;
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    expect_status(
        bearer(&server, &tampered)?.get(server.url("/api")).send().await?,
        401,
        "Unauthorized",
    )
    .await?;
    let decoded: Claims = serde_json::from_value(claims.clone())?;
    let other_key = std::fs::read_to_string(server.data_dir().join("pki/ca.key"))?;
    let forged = ServiceAccountTokens::from_pem(&other_key)?
        .sign(&decoded)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    expect_status(
        bearer(&server, &forged)?.get(server.url("/api")).send().await?,
        401,
        "Unauthorized",
    )
    .await?;
    // A token for another audience is not for the API server.
    let vault = expect_ok(
        request_token(&admin, &server, "builder", json!({"audiences": ["vault"]})).await?,
        201,
    )
    .await?;
    let vault_token = vault["status"]["token"].as_str().context("token")?;
    ensure!(claims_of(vault_token)?["aud"] == json!(["vault"]));
    ensure!(
        vault["spec"]["expirationSeconds"] == 3600,
        "the default lifetime: {vault}"
    );
    expect_status(
        bearer(&server, vault_token)?.get(server.url("/api")).send().await?,
        401,
        "Unauthorized",
    )
    .await?;

    // What Kubernetes refuses, Weir refuses the same way.
    let short = expect_status(
        request_token(&admin, &server, "builder", json!({"expirationSeconds": 500})).await?,
        422,
        "Invalid",
    )
    .await?;
    ensure!(
        short["message"]
            .as_str()
            .unwrap_or_default()
            .contains("may not specify a duration less than 10 minutes"),
        "{short}"
    );
    expect_status(
        request_token(&admin, &server, "ghost", json!({})).await?,
        404,
        "NotFound",
    )
    .await?;
    let stale = expect_status(
        request_token(
            &admin,
            &server,
            "builder",
            json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": "0000"}}),
        )
        .await?,
        409,
        "Conflict",
    )
    .await?;
    ensure!(
        stale["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not match the UID in record"),
        "{stale}"
    );
    create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/serviceaccounts",
        json!({"metadata": {"name": "other"}}),
    )
    .await?;
    let other = expect_status(
        request_token(
            &admin,
            &server,
            "other",
            json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web"}}),
        )
        .await?,
        400,
        "BadRequest",
    )
    .await?;
    ensure!(
        other["message"]
            .as_str()
            .unwrap_or_default()
            .contains("pod running with different serviceaccount name"),
        "{other}"
    );
    let put = admin
        .put(server.url("/api/v1/namespaces/apps/serviceaccounts/builder/token"))
        .json(&json!({}))
        .send()
        .await?;
    ensure!(
        put.status().as_u16() == 405,
        "PUT on the token subresource: {}",
        put.status()
    );

    // An unbound token lives as long as its account; a bound one as long as its pod.
    let unbound = expect_ok(request_token(&admin, &server, "builder", json!({})).await?, 201).await?;
    let unbound = bearer(&server, unbound["status"]["token"].as_str().context("token")?)?;
    ensure!(status_of(&unbound, &server, "/api").await? == 200);
    expect_ok(
        admin
            .delete(server.url("/api/v1/namespaces/apps/pods/web?gracePeriodSeconds=0"))
            .send()
            .await?,
        200,
    )
    .await?;
    eventually("the pod's token refused", SETTLE, || async {
        Ok((status_of(&as_account, &server, "/api").await? == 401).then_some(()))
    })
    .await?;
    ensure!(status_of(&unbound, &server, "/api").await? == 200);
    expect_ok(
        admin
            .delete(server.url("/api/v1/namespaces/apps/serviceaccounts/builder"))
            .send()
            .await?,
        200,
    )
    .await?;
    eventually("the account's token refused", SETTLE, || async {
        Ok((status_of(&unbound, &server, "/api").await? == 401).then_some(()))
    })
    .await?;

    // Discovery lists the subresource, as kubectl create token expects.
    let core = expect_ok(admin.get(server.url("/api/v1")).send().await?, 200).await?;
    let listed = core["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "serviceaccounts/token")
        .cloned();
    match listed {
        Some(r) if r["kind"] == "TokenRequest" && r["verbs"] == json!(["create"]) => Ok(()),
        other => bail!("serviceaccounts/token in /api/v1: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_tokens_for_their_own_pods_only() -> Result<()> {
    use weir_agent::join::{self, Token};
    let server = TestServer::start(Backend::Embedded).await?;
    let admin = server.http_client()?;
    create_namespace(&admin, &server, "apps").await?;
    create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/serviceaccounts",
        json!({"metadata": {"name": "builder"}}),
    )
    .await?;
    let mut uids = Vec::new();
    for (pod, node) in [("here", "node-a"), ("there", "node-b")] {
        let created = create(
            &admin,
            &server,
            "/api/v1/namespaces/apps/pods",
            json!({"metadata": {"name": pod}, "spec": {"nodeName": node, "serviceAccountName": "builder", "containers": [{"name": "c", "image": "x"}]}}),
        )
        .await?;
        uids.push(created["metadata"]["uid"].as_str().context("uid")?.to_string());
    }
    create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/configmaps",
        json!({"metadata": {"name": "conf"}, "data": {"k": "v"}}),
    )
    .await?;

    let token: Token = std::fs::read_to_string(server.data_dir().join("node-token"))?.parse()?;
    let credentials = join::join(&server.base_url(), &token, "node-a").await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    credentials.write_kubeconfig(&kubeconfig, &server.base_url(), "node-a")?;
    let config =
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&kubeconfig)?, &Default::default())
            .await?;
    let source = KubeVolumeSource::new(kube::Client::try_from(config)?, "node-a");

    let request = |pod: &str, uid: &str| TokenRequestFor {
        namespace: "apps".into(),
        service_account: "builder".into(),
        audience: None,
        expiration_seconds: 3607,
        pod_name: pod.into(),
        pod_uid: uid.into(),
    };
    let issued = source
        .service_account_token(&request("here", &uids[0]))
        .await
        .map_err(anyhow::Error::msg)?;
    let claims = claims_of(&issued.token)?;
    ensure!(claims["kubernetes.io"]["pod"]["name"] == "here", "{claims}");
    let lifetime = issued.expiration.as_second() - jiff::Timestamp::now().as_second();
    ensure!((3597..=3608).contains(&lifetime), "expires in {lifetime}s");
    let refused = source.service_account_token(&request("there", &uids[1])).await;
    match refused {
        Err(e) if e.contains("node \"node-a\" may only request tokens bound to pods scheduled to it") => {}
        other => bail!("a token for another node's pod: {other:?}"),
    }
    // The rest of what volumes read, through the node's credentials.
    let cm = source.config_map("apps", "conf").await.map_err(anyhow::Error::msg)?;
    ensure!(cm.and_then(|c| c.data).is_some_and(|d| d["k"] == "v"));
    ensure!(
        source
            .secret("apps", "absent")
            .await
            .map_err(anyhow::Error::msg)?
            .is_none()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_token_prints_a_token_for_the_account() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let admin = server.http_client()?;
    create_namespace(&admin, &server, "apps").await?;
    create(
        &admin,
        &server,
        "/api/v1/namespaces/apps/serviceaccounts",
        json!({"metadata": {"name": "builder"}}),
    )
    .await?;
    let token = server.kubectl_ok(&["create", "token", "builder", "-n", "apps", "--duration", "15m"]);
    let claims = claims_of(token.trim())?;
    ensure!(claims["sub"] == "system:serviceaccount:apps:builder", "{claims}");
    ensure!(
        claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0) == 900,
        "{claims}"
    );
    ensure!(status_of(&bearer(&server, token.trim())?, &server, "/apis").await? == 200);
    Ok(())
}
