//! The agent's streaming server: kubelet's HTTPS endpoints for `kubectl logs`, `exec`
//! (and `cp`, which is exec of `tar`) and `port-forward`, reached through the API server.
//!
//! - Listens on the kubelet port ([`DEFAULT_PORT`], 10250) with the node's serving
//!   certificate (signed by the cluster CA at join, the node's name and IPs as SANs).
//! - Requires a client certificate signed by the cluster CA in the group `system:masters`:
//!   the API server's kubelet client (CN [`KUBELET_CLIENT_USER`]) or a cluster admin. No
//!   certificate: 401; any other subject (nodes, users): 403.
//! - `GET /containerLogs/{namespace}/{pod}/{container}`: see [`logs`].
//! - `GET|POST /exec/{namespace}/{pod}/{container}?command=...`: WebSocket, subprotocol
//!   `v5.channel.k8s.io` (or v4): see the `exec` module.
//! - `GET|POST /portForward/{namespace}/{pod}`: WebSocket, subprotocol
//!   `SPDY/3.1+portforward.k8s.io` (SPDY tunnelled in WebSocket, as kubectl 1.31+ speaks it):
//!   see [`portforward`].
//!
//! The server finds pods through [`PodDirectory`], which the pod worker implements; it knows
//! nothing of the API server or pod specs.

pub mod cri;
mod exec;
pub mod logs;
pub mod portforward;
pub mod spdy;
mod websocket;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::runtime::Runtime;

/// kubelet's port.
pub const DEFAULT_PORT: u16 = 10250;
/// The user (certificate CN) the API server's kubelet client certificate names.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";
/// The group whose members may use the streaming server.
pub const MASTERS_GROUP: &str = "system:masters";

/// What the streaming server needs to know of a pod on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRuntimeInfo {
    /// The pod's uid.
    pub uid: String,
    /// Its network namespace (a file, e.g. `/var/run/netns/...`); `None` for host-network pods
    /// (port-forward then connects on the host's loopback).
    pub netns_path: Option<PathBuf>,
    /// Its containers (init containers too), in spec order.
    pub containers: Vec<ContainerRuntimeInfo>,
    /// The container a request without one means (the `kubectl.kubernetes.io/default-container`
    /// annotation, else the first container).
    pub default_container: Option<String>,
}

/// One container of a [`PodRuntimeInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerRuntimeInfo {
    /// Its name in the pod spec.
    pub name: String,
    /// The containerd id of its current run (running or exited); `None` before its first start.
    pub container_id: Option<String>,
    /// Whether the current run is running (exec needs it; followed logs end when it is false).
    pub running: bool,
    /// The current run's log file.
    pub log_path: Option<PathBuf>,
    /// The previous (terminated) run's log file, for `previous=true`.
    pub previous_log_path: Option<PathBuf>,
}

/// How the streaming server finds the pods on this node; implemented by the pod worker.
/// Called for every request (and on each poll of a followed log), so it must be cheap.
pub trait PodDirectory: Send + Sync + 'static {
    /// The pod `namespace/pod` if it runs on this node.
    fn lookup(&self, namespace: &str, pod: &str) -> Option<PodRuntimeInfo>;
}

/// The TLS material of the server, PEM.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The cluster CA: client certificates must chain to it.
    pub ca_pem: String,
    /// The node's serving certificate (its chain).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// What went wrong starting the server, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// The response body type of every endpoint (streamed for logs).
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// The streaming server. Build with [`StreamServer::new`], run with [`StreamServer::serve`].
pub struct StreamServer {
    runtime: Runtime,
    pods: Arc<dyn PodDirectory>,
    tls: Arc<rustls::ServerConfig>,
}

impl StreamServer {
    /// A server that runs execs through `runtime` and finds pods through `pods`.
    pub fn new(runtime: Runtime, pods: Arc<dyn PodDirectory>, tls: &ServerTls) -> Result<StreamServer, Error> {
        Ok(StreamServer {
            runtime,
            pods,
            tls: Arc::new(server_tls(tls)?),
        })
    }

    /// Serves connections from `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        info!(addr = ?listener.local_addr().ok(), "streaming server (logs, exec, port-forward) listening");
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "streaming server: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        debug!(%peer, error = %e, "streaming server: TLS handshake failed");
                        return;
                    }
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|cert| subject(cert));
                let identity = Arc::new(identity);
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    let identity = identity.clone();
                    async move { Ok::<_, Infallible>(server.handle(identity.as_ref().as_ref(), req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
                    debug!(%peer, error = %e, "streaming server: connection ended");
                }
            });
        }
    }

    async fn handle(&self, identity: Option<&(String, Vec<String>)>, req: Request<Incoming>) -> Response<Body> {
        let Some((user, groups)) = identity else {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the streaming server needs a client certificate signed by the cluster CA (the API server's \
                 kubelet client certificate)",
            );
        };
        if !groups.iter().any(|g| g == MASTERS_GROUP) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "user \"{user}\" (groups {groups:?}) may not use the node's streaming server: only the API \
                     server's kubelet client ({KUBELET_CLIENT_USER}, group {MASTERS_GROUP}) and cluster admins may"
                ),
            );
        }
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        debug!(%method, %path, %user, "streaming request");
        match (segments.as_slice(), &method) {
            (["containerLogs", namespace, pod, container], &Method::GET) => {
                self.logs(namespace, pod, container, req.uri().query()).await
            }
            (["exec", namespace, pod, container], &Method::GET | &Method::POST) => {
                let (namespace, pod, container) = (namespace.to_string(), pod.to_string(), container.to_string());
                exec::handle(self, req, &namespace, &pod, &container)
            }
            (["portForward", namespace, pod], &Method::GET | &Method::POST) => {
                let (namespace, pod) = (namespace.to_string(), pod.to_string());
                portforward::handle(self, req, &namespace, &pod)
            }
            (["containerLogs" | "exec" | "portForward", ..], _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("{method} is not allowed on {path}"),
            ),
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "{path} is not a streaming endpoint: use /containerLogs/NS/POD/CONTAINER, \
                     /exec/NS/POD/CONTAINER or /portForward/NS/POD"
                ),
            ),
        }
    }

    /// The pod, or the 404 to answer.
    fn pod(&self, namespace: &str, pod: &str) -> Result<PodRuntimeInfo, Refusal> {
        self.pods.lookup(namespace, pod).ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pod \"{pod}\" in namespace \"{namespace}\" is not running on this node"),
            )
        })
    }

    /// The container of the pod, or the 400 naming the pod's containers.
    fn container(pod_name: &str, pod: &PodRuntimeInfo, name: &str) -> Result<ContainerRuntimeInfo, Refusal> {
        pod.containers.iter().find(|c| c.name == name).cloned().ok_or_else(|| {
            let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!(
                    "container {name} is not valid for pod {pod_name}: choose one of: [{}]",
                    names.join(" ")
                ),
            )
        })
    }

    async fn logs(&self, namespace: &str, pod_name: &str, container: &str, query: Option<&str>) -> Response<Body> {
        let options = match logs::LogOptions::from_query(query, jiff::Timestamp::now()) {
            Ok(o) => o,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let pod = match self.pod(namespace, pod_name) {
            Ok(p) => p,
            Err(refusal) => return refusal.response(),
        };
        let info = match Self::container(pod_name, &pod, container) {
            Ok(c) => c,
            Err(refusal) => return refusal.response(),
        };
        let path = if options.previous {
            match &info.previous_log_path {
                Some(p) => p.clone(),
                None => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("previous terminated container \"{container}\" in pod \"{pod_name}\" not found"),
                    );
                }
            }
        } else {
            match &info.log_path {
                Some(p) => p.clone(),
                None => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!(
                            "container \"{container}\" in pod \"{pod_name}\" is waiting to start: it has no log yet"
                        ),
                    );
                }
            }
        };
        // Following the previous run: it has ended, nothing more will come.
        let following_current = options.follow && !options.previous;
        let pods = self.pods.clone();
        let (namespace, pod_name, container) = (namespace.to_string(), pod_name.to_string(), container.to_string());
        let run_id = info.container_id.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        // A client that went away ends the follow even while nothing new is written.
        let client = tx.clone();
        let running = move || {
            following_current
                && !client.is_closed()
                && pods.lookup(&namespace, &pod_name).is_some_and(|p| {
                    p.containers
                        .iter()
                        .any(|c| c.name == container && c.running && c.container_id == run_id)
                })
        };
        tokio::task::spawn_blocking(move || {
            let mut sink = |chunk: Vec<u8>| tx.blocking_send(Bytes::from(chunk)).is_ok();
            if let Err(e) = logs::stream_log(&path, &options, &running, &mut sink) {
                warn!(log = %path.display(), error = %e, "reading a container log failed");
                let _ = tx.blocking_send(Bytes::from(format!(
                    "\nweir: reading the log {} failed: {e}\n",
                    path.display()
                )));
            }
        });
        let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |chunk| {
            Ok::<_, Infallible>(hyper::body::Frame::data(chunk))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
            .expect("static response parts")
    }
}

/// The CN and O of a verified client certificate.
fn subject(der: &CertificateDer<'_>) -> (String, Vec<String>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (String::new(), Vec::new());
    };
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    (user, groups)
}

/// A request refused before anything streams: becomes a Status response.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    pub(crate) fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn response(self) -> Response<Body> {
        status(self.code, self.reason, &self.message)
    }
}

/// A Kubernetes Status response.
pub(crate) fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("static response parts")
}

/// A whole body.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(data.into()))
}

/// rustls server config: the node's certificate, client certificates checked against the
/// cluster CA (optional at the TLS layer, so a request without one gets a 401 it can read).
fn server_tls(tls: &ServerTls) -> Result<rustls::ServerConfig, Error> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut tls.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Error(format!("the node's serving certificate is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error(
            "no serving certificate: join the node again to get one (the join response carries servingCertificate)"
                .into(),
        ));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut tls.key_pem.as_bytes())
        .map_err(|e| Error(format!("the node's serving key is not PEM: {e}")))?
        .ok_or_else(|| Error("no private key in the node's serving key file".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut tls.ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| Error(format!("the cluster CA certificate is not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error(format!("the cluster CA certificate is unusable: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error(format!("building the client certificate verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error(format!("the node's serving certificate and key do not match: {e}")))?;
    // HTTP/1.1 only: exec and port-forward are HTTP/1.1 upgrades.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
