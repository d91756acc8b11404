//! The pod subresources served by the pod's node: `pods/log`, `pods/exec` and
//! `pods/portforward`, proxied to the node agent's streaming server (kubelet's port) as
//! kube-apiserver does.
//!
//! - The pod is looked up (404), its node from `spec.nodeName` (400 if unscheduled), the
//!   node's address from `status.addresses` (InternalIP, else ExternalIP, else Hostname) and
//!   port from `status.daemonEndpoints.kubeletEndpoint.Port` (default 10250).
//! - The container is the `container` query parameter, else the
//!   `kubectl.kubernetes.io/default-container` annotation, else the only container; otherwise
//!   400 listing them, with kube-apiserver's wording.
//! - The connection is TLS verified against the cluster CA (the node's serving certificate
//!   comes from its join), presenting the API server's kubelet client certificate (CN
//!   `kube-apiserver-kubelet-client`, O `system:masters`).
//! - Logs stream through unbuffered (follow). Exec and port-forward are HTTP/1.1 upgrades
//!   (WebSocket): the upgrade request goes to the node and, once it answers 101, the client's
//!   and the node's upgraded connections are spliced byte for byte.
//! - A node that cannot be reached gets a 503 Status naming the node and its address.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use super::handler::ApiServer;
use super::pki::Pki;
use super::resources;
use super::status::ApiError;

/// kubelet's default port, when the Node does not say.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Which node-served subresource a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeSubresource {
    /// `pods/{name}/log`.
    Log,
    /// `pods/{name}/exec`.
    Exec,
    /// `pods/{name}/portforward`.
    PortForward,
}

/// `/api/v1/namespaces/{ns}/pods/{name}/{log|exec|portforward}`: the namespace, pod and
/// subresource.
pub fn route(path: &str) -> Option<(&str, &str, NodeSubresource)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let [namespace, "pods", pod, sub] = segments.as_slice() else {
        return None;
    };
    let sub = match *sub {
        "log" => NodeSubresource::Log,
        "exec" => NodeSubresource::Exec,
        "portforward" => NodeSubresource::PortForward,
        _ => return None,
    };
    (!namespace.is_empty() && !pod.is_empty()).then_some((namespace, pod, sub))
}

/// The API server's TLS client for nodes' streaming servers.
pub struct KubeletClient {
    tls: Arc<rustls::ClientConfig>,
}

impl KubeletClient {
    /// Trusts the cluster CA and presents the kubelet client certificate.
    pub fn new(pki: &Pki) -> Result<KubeletClient> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
            roots.add(cert.context("parsing pki/ca.crt")?)?;
        }
        let certs: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut pki.kubelet_client_cert_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pki.kubelet_client_key_pem.as_bytes())?
            .context("no key in pki/apiserver-kubelet-client.key")?;
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("the kubelet client certificate and key do not match")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(KubeletClient { tls: Arc::new(config) })
    }
}

/// Where the pod's node serves, and the path and query to ask it.
#[derive(Debug, PartialEq, Eq)]
struct Upstream {
    node: String,
    address: String,
    port: u16,
    path_and_query: String,
}

/// Serves one node-served subresource request.
pub async fn serve(
    api: &ApiServer,
    client: &KubeletClient,
    req: http::Request<hyper::body::Incoming>,
    namespace: &str,
    pod: &str,
    sub: NodeSubresource,
) -> Response {
    match proxy(api, client, req, namespace, pod, sub).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn proxy(
    api: &ApiServer,
    client: &KubeletClient,
    mut req: http::Request<hyper::body::Incoming>,
    namespace: &str,
    pod_name: &str,
    sub: NodeSubresource,
) -> Result<Response, ApiError> {
    let allowed = match sub {
        NodeSubresource::Log => req.method() == http::Method::GET,
        NodeSubresource::Exec | NodeSubresource::PortForward => {
            matches!(*req.method(), http::Method::GET | http::Method::POST)
        }
    };
    if !allowed {
        return Err(ApiError::method_not_allowed(format!(
            "{} is not allowed on pods/{}",
            req.method(),
            sub_name(sub)
        )));
    }
    let pods = resources::find("", "v1", "pods").expect("pods are served");
    let nodes = resources::find("", "v1", "nodes").expect("nodes are served");
    let pod = api.object(pods, Some(namespace), pod_name).await?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {pod_name} does not have a host assigned")))?
        .to_string();
    let node = api.object(nodes, None, &node_name).await.map_err(|e| {
        if e.code == StatusCode::NOT_FOUND {
            ApiError::bad_request(format!(
                "pod {pod_name} is assigned to node {node_name}, which does not exist"
            ))
        } else {
            e
        }
    })?;
    let query = req.uri().query().unwrap_or_default().to_string();
    let upstream = upstream(&pod, &node, &node_name, namespace, pod_name, sub, &query)?;

    // The request to the node: the client's method, the upgrade headers for exec and
    // port-forward, none of the client's credentials.
    let mut outgoing = http::Request::builder()
        .method(req.method().clone())
        .uri(&upstream.path_and_query)
        .header(header::HOST, format!("{}:{}", upstream.address, upstream.port));
    let upgrade = req.headers().contains_key(header::UPGRADE);
    for (name, value) in req.headers() {
        let forwarded = *name == header::UPGRADE
            || *name == header::CONNECTION
            || name.as_str().starts_with("sec-websocket-")
            || *name == header::ACCEPT
            || *name == header::USER_AGENT
            || name.as_str().starts_with("x-stream-protocol");
        if forwarded {
            outgoing = outgoing.header(name, value);
        }
    }
    let outgoing = outgoing
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::internal(format!("building the request to node {node_name}: {e}")))?;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let unreachable = |what: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!(
                "cannot reach node {} at {}:{} for pods/{}: {what}",
                upstream.node,
                upstream.address,
                upstream.port,
                sub_name(sub)
            ),
        )
    };
    let target = match upstream.address.parse::<IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, upstream.port).to_string(),
        Err(_) => format!("{}:{}", upstream.address, upstream.port),
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&target))
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let server_name = match upstream.address.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(upstream.address.clone())
            .map_err(|e| unreachable(format!("{} is not a host name: {e}", upstream.address)))?,
    };
    let tls = tokio_rustls::TlsConnector::from(client.tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            unreachable(format!(
                "TLS: {e} (the node's serving certificate must be signed by the cluster CA and name this address; \
                 re-join the node with its addresses)"
            ))
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(format!("HTTP: {e}")))?;
    let node_for_log = upstream.node.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(node = %node_for_log, error = %e, "connection to the node's streaming server ended");
        }
    });
    let mut response = sender
        .send_request(outgoing)
        .await
        .map_err(|e| unreachable(format!("HTTP: {e}")))?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::internal(format!(
                "node {node_name} switched protocols on a request that did not ask to"
            )));
        };
        let node_upgrade = hyper::upgrade::on(&mut response);
        let node = upstream.node.clone();
        tokio::spawn(async move {
            let (client, node_side) = match tokio::join!(client_upgrade, node_upgrade) {
                (Ok(c), Ok(n)) => (c, n),
                (c, n) => {
                    tracing::debug!(%node, client = ?c.err(), node_side = ?n.err(), "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut node_side = TokioIo::new(node_side);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut node_side).await {
                tracing::debug!(%node, error = %e, "streaming session ended");
            }
        });
        let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (name, value) in response.headers() {
            out = out.header(name, value);
        }
        return out
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("answering the upgrade: {e}")));
    }
    // Logs, and the node's errors (Status JSON), streamed as they come.
    let (parts, body) = response.into_parts();
    let mut out = Response::builder().status(parts.status);
    for name in [header::CONTENT_TYPE] {
        if let Some(value) = parts.headers.get(&name) {
            out = out.header(name, value);
        }
    }
    if !parts.headers.contains_key(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    out.body(Body::new(body))
        .map_err(|e| ApiError::internal(format!("answering with the node's response: {e}")))
}

fn sub_name(sub: NodeSubresource) -> &'static str {
    match sub {
        NodeSubresource::Log => "log",
        NodeSubresource::Exec => "exec",
        NodeSubresource::PortForward => "portforward",
    }
}

/// The container a log or exec request means, as kube-apiserver picks it.
fn container(pod: &Value, pod_name: &str, query: &str) -> Result<String, ApiError> {
    let names = |field: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (containers, init, ephemeral) = (
        names("containers"),
        names("initContainers"),
        names("ephemeralContainers"),
    );
    let asked = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty());
    let chosen = asked.or_else(|| {
        pod.pointer("/metadata/annotations")
            .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    match chosen {
        Some(name) => {
            if containers.contains(&name) || init.contains(&name) || ephemeral.contains(&name) {
                Ok(name)
            } else {
                Err(ApiError::bad_request(format!(
                    "container {name} is not valid for pod {pod_name}"
                )))
            }
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message = format!(
                "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                message.push_str(&format!(" or one of the init containers: [{}]", init.join(" ")));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// The node's address and kubelet port, and the path to ask it for.
fn upstream(
    pod: &Value,
    node: &Value,
    node_name: &str,
    namespace: &str,
    pod_name: &str,
    sub: NodeSubresource,
    query: &str,
) -> Result<Upstream, ApiError> {
    let addresses = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let address = ["InternalIP", "ExternalIP", "Hostname"]
        .iter()
        .find_map(|kind| {
            addresses
                .iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some(kind))
                .and_then(|a| a.get("address").and_then(Value::as_str))
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("node {node_name} reports no address (status.addresses is empty): is its agent running?"),
            )
        })?
        .to_string();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    let escape = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let path_and_query = match sub {
        NodeSubresource::Log | NodeSubresource::Exec => {
            let container = container(pod, pod_name, query)?;
            // The container goes in the path; everything else is passed on as it came.
            let rest: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != "container"))
                .finish();
            let base = if sub == NodeSubresource::Log {
                "containerLogs"
            } else {
                "exec"
            };
            format!(
                "/{base}/{}/{}/{}?{rest}",
                escape(namespace),
                escape(pod_name),
                escape(&container)
            )
        }
        NodeSubresource::PortForward => {
            format!("/portForward/{}/{}?{query}", escape(namespace), escape(pod_name))
        }
    };
    Ok(Upstream {
        node: node_name.to_string(),
        address,
        port,
        path_and_query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_only_node_served_pod_subresources() {
        assert_eq!(
            route("/api/v1/namespaces/default/pods/web/log"),
            Some(("default", "web", NodeSubresource::Log))
        );
        assert_eq!(
            route("/api/v1/namespaces/ns/pods/p/exec"),
            Some(("ns", "p", NodeSubresource::Exec))
        );
        assert_eq!(
            route("/api/v1/namespaces/ns/pods/p/portforward"),
            Some(("ns", "p", NodeSubresource::PortForward))
        );
        for other in [
            "/api/v1/namespaces/ns/pods/p/status",
            "/api/v1/namespaces/ns/pods/p",
            "/api/v1/namespaces/ns/services/p/log",
            "/apis/apps/v1/namespaces/ns/pods/p/log",
        ] {
            assert_eq!(route(other), None, "{other}");
        }
    }

    fn pod(containers: &[&str], annotation: Option<&str>) -> Value {
        let mut pod = json!({"metadata": {"name": "web"}, "spec": {"nodeName": "n1",
            "containers": containers.iter().map(|c| json!({"name": c})).collect::<Vec<_>>(),
            "initContainers": [{"name": "setup"}]}});
        if let Some(a) = annotation {
            pod["metadata"]["annotations"] = json!({DEFAULT_CONTAINER_ANNOTATION: a});
        }
        pod
    }

    #[test]
    fn containers_are_chosen_as_kube_apiserver_does() {
        assert_eq!(container(&pod(&["app"], None), "web", "").unwrap(), "app");
        assert_eq!(
            container(&pod(&["app", "side"], None), "web", "container=side").unwrap(),
            "side"
        );
        assert_eq!(
            container(&pod(&["app", "side"], Some("side")), "web", "").unwrap(),
            "side"
        );
        assert_eq!(
            container(&pod(&["app"], None), "web", "container=setup").unwrap(),
            "setup"
        );
        let many = container(&pod(&["app", "side"], None), "web", "").unwrap_err();
        assert_eq!(
            many.message,
            "a container name must be specified for pod web, choose one of: [app side] or one of the init \
             containers: [setup]"
        );
        let wrong = container(&pod(&["app"], None), "web", "container=nope").unwrap_err();
        assert_eq!(wrong.message, "container nope is not valid for pod web");
    }

    #[test]
    fn the_node_address_and_port_come_from_its_status() {
        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "192.0.2.7"}],
                                     "daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}}}});
        let up = upstream(
            &pod(&["app"], None),
            &node,
            "n1",
            "default",
            "web",
            NodeSubresource::Exec,
            "command=sh&command=-c&command=echo+hi&stdout=true",
        )
        .unwrap();
        assert_eq!((up.address.as_str(), up.port), ("192.0.2.7", 10255));
        assert_eq!(
            up.path_and_query,
            "/exec/default/web/app?command=sh&command=-c&command=echo+hi&stdout=true"
        );
        let bare = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}]}});
        let up = upstream(
            &pod(&["app", "b"], None),
            &bare,
            "n1",
            "default",
            "web",
            NodeSubresource::Log,
            "container=b&follow=true",
        )
        .unwrap();
        assert_eq!(
            (up.address.as_str(), up.port, up.path_and_query.as_str()),
            ("n1", 10250, "/containerLogs/default/web/b?follow=true")
        );
        let none = upstream(
            &pod(&["app"], None),
            &json!({}),
            "n1",
            "d",
            "web",
            NodeSubresource::Log,
            "",
        );
        assert!(none.unwrap_err().message.contains("reports no address"));
    }
}
