//! The Kubernetes-compatible API server: TLS and authentication, health and metrics, and the
//! generic resource registry in `handler`. It is the only component that touches the store.

pub mod allocator;
pub mod authz;
pub mod cache;
pub mod convert;
pub mod discovery;
pub mod handler;
mod join;
pub mod metrics;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod proxy;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod status;
pub mod strategy;
pub mod table;
pub mod time;
pub mod tokens;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;

use crate::store::Store;
use handler::{ApiServer, MAX_BODY, Request};
use status::ApiError;

/// `weir server` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Where the store, certificates and kubeconfig live.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "/var/lib/weir")]
    pub data_dir: PathBuf,
    /// HTTPS port of the API server (0 picks a free one).
    #[arg(long, env = "WEIR_SECURE_PORT", default_value_t = 6443)]
    pub secure_port: u16,
    /// Address to listen on.
    #[arg(long, env = "WEIR_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,
    /// `etcd://host:port[,host:port...]` for etcd; default: the embedded store in the data dir.
    #[arg(long, env = "WEIR_DATASTORE")]
    pub datastore: Option<String>,
    /// Seconds between store compactions; each keeps one interval of history for watches.
    #[arg(long, default_value_t = 300)]
    pub compaction_interval: u64,
    /// How long a node may go without a heartbeat (its Lease in kube-node-lease renewed, or its
    /// Ready condition's lastHeartbeatTime changed) before it is marked Unknown and tainted
    /// unreachable: `40s`, `3s`, `1m30s`, or plain seconds.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// tolerationSeconds of the `node.kubernetes.io/not-ready:NoExecute` toleration added to
    /// every pod that does not have one (how long it stays on a NotReady node).
    #[arg(long, default_value_t = 300)]
    pub default_not_ready_toleration_seconds: u32,
    /// tolerationSeconds of the `node.kubernetes.io/unreachable:NoExecute` toleration added to
    /// every pod that does not have one (how long it stays on an unreachable node).
    #[arg(long, default_value_t = 300)]
    pub default_unreachable_toleration_seconds: u32,
    /// Addresses for Services of type LoadBalancer: comma-separated CIDRs (`192.0.2.0/28`),
    /// ranges (`198.51.100.10-198.51.100.20`) and single addresses, IPv4 and IPv6.
    #[arg(long, env = "WEIR_LOAD_BALANCER_POOL", value_parser = crate::controllers::loadbalancer::Pool::parse)]
    pub load_balancer_pool: Option<crate::controllers::loadbalancer::Pool>,
    /// Pod addresses of the cluster: each node gets a block of it as spec.podCIDR (one IPv4
    /// and one IPv6 CIDR, comma-separated, for dual-stack; empty: nodes get none).
    #[arg(long, env = "WEIR_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Prefix length of each node's IPv4 block of --cluster-cidr.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size_ipv4: u8,
    /// Prefix length of each node's IPv6 block of --cluster-cidr.
    #[arg(long, default_value_t = 64)]
    pub node_cidr_mask_size_ipv6: u8,
    /// More names or addresses for the server certificate (beside localhost, 127.0.0.1, the
    /// host name and the default-route address), e.g. the address other nodes reach the
    /// server at; repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub tls_san: Vec<String>,
}

/// A duration flag: `40s`, `1m30s`, `500ms` (jiff's friendly format) or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let d: jiff::SignedDuration = s
            .parse()
            .map_err(|e| format!("{s:?} is not a duration like 40s, 1m30s or 500ms: {e}"))?;
        Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))?
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(d)
}

impl ServerConfig {
    /// What the controllers need from the flags; an error names the flag that is wrong.
    pub fn controllers(&self) -> Result<crate::controllers::Config> {
        let cluster_cidrs = crate::controllers::nodeipam::ClusterCidrs::parse(
            &self.cluster_cidr,
            self.node_cidr_mask_size_ipv4,
            self.node_cidr_mask_size_ipv6,
        )
        .map_err(anyhow::Error::msg)?;
        Ok(crate::controllers::Config {
            node_monitor_grace_period: self.node_monitor_grace_period,
            load_balancer_pool: self.load_balancer_pool.clone(),
            cluster_cidrs,
        })
    }
}

/// Open the store named by the configuration.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>> {
    match config.datastore.as_deref() {
        Some(ds) if ds.starts_with("etcd://") => {
            let endpoints: Vec<String> = ds
                .trim_start_matches("etcd://")
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            anyhow::ensure!(
                !endpoints.is_empty(),
                "--datastore etcd:// needs at least one host:port"
            );
            let store = crate::store::etcd::EtcdStore::connect(&endpoints)
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
            Ok(Arc::new(store))
        }
        Some(other) => anyhow::bail!(
            "unsupported --datastore {other:?}: use etcd://host:port[,host:port] or leave it out for the embedded store"
        ),
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
            let path = config.data_dir.join("store.redb");
            let store = crate::store::embedded::EmbeddedStore::open(&path)
                .with_context(|| format!("opening the embedded store {}", path.display()))?;
            Ok(Arc::new(store))
        }
    }
}

struct Shared {
    api: Arc<ApiServer>,
    metrics: metrics::Metrics,
    admin_token: String,
    pki: Arc<pki::Pki>,
    tokens: tokens::ServiceAccountTokens,
    /// The client for nodes' streaming servers (pods/log, exec, portforward).
    kubelet: proxy::KubeletClient,
}

/// Run the API server until Ctrl-C or SIGTERM.
pub async fn run(config: ServerConfig) -> Result<()> {
    let controllers = config.controllers()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "creating data dir {} (use --data-dir to choose another)",
            config.data_dir.display()
        )
    })?;
    let pki = pki::Pki::load_or_create(&config.data_dir, &config.tls_san)?;
    let store = open_store(&config).await?;
    let cache = cache::WatchCache::start(store.clone())
        .await
        .context("filling the watch cache from the store")?;
    let schemas = schema::Schemas::builtin();
    let api = Arc::new(ApiServer {
        store: store.clone(),
        cache,
        allocator: allocator::Allocator::new(store.clone()),
        discovery: discovery::Discovery::build(schemas, handler::SERVER_VERSION),
        schemas,
        admission: strategy::Admission {
            not_ready_toleration_seconds: config.default_not_ready_toleration_seconds,
            unreachable_toleration_seconds: config.default_unreachable_toleration_seconds,
        },
    });

    let listener = TcpListener::bind(SocketAddr::new(config.bind_address, config.secure_port))
        .await
        .with_context(|| {
            format!(
                "binding {}:{} (is another server using the port? pick one with --secure-port)",
                config.bind_address, config.secure_port
            )
        })?;
    let port = listener.local_addr()?.port();
    bootstrap(&api, config.bind_address, port).await?;
    // In the background: it waits out in-flight writes before releasing anything.
    let repairing = api.clone();
    tokio::spawn(async move {
        match repairing.allocator.repair(Duration::from_secs(10)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released allocations left by an interrupted write"),
            Err(e) => tracing::warn!(error = %e, "allocation repair failed"),
        }
    });
    tokio::spawn(compactor(
        store.clone(),
        Duration::from_secs(config.compaction_interval.max(1)),
    ));

    let host = if config.bind_address.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        config.bind_address.to_string()
    };
    let url = if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    };
    let kubeconfig = config.data_dir.join("admin.kubeconfig");
    pki.write_admin_kubeconfig(&kubeconfig, &url)?;
    tokio::spawn(start_controllers(kubeconfig.clone(), controllers));
    tracing::info!(%url, kubeconfig = %kubeconfig.display(), "API server ready");
    println!(
        "weir: API server at {url}\nweir: admin kubeconfig: {}\n  export KUBECONFIG={}",
        kubeconfig.display(),
        kubeconfig.display()
    );
    println!(
        "weir: nodes join with `weir agent --server {url} --token $(cat {})`",
        config.data_dir.join("node-token").display()
    );

    let tls = Arc::new(tls_config(&pki)?);
    let shared = Arc::new(Shared {
        api,
        metrics: metrics::Metrics::new(),
        admin_token: pki.admin_token.clone(),
        tokens: tokens::ServiceAccountTokens::from_pem(&pki.service_account_key_pem)?,
        kubelet: proxy::KubeletClient::new(&pki).context("the API server's kubelet client credentials")?,
        pki: Arc::new(pki),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            // The TLS layer verified the certificate against the cluster CA; its subject says who.
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| authz::Identity::from_certificate(cert))
                .map(Arc::new);
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let identity = identity.clone();
                async move { Ok::<_, Infallible>(serve(shared, identity, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    tracing::info!("API server stopping");
    Ok(())
}

fn tls_config(pki: &pki::Pki) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut pki.server_cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut pki.server_key_pem.as_bytes())?.context("no key in pki/apiserver.key")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    // Client certificates are checked against the cluster CA when offered; bearer tokens are
    // the other way in, so a certificate is optional at the TLS layer.
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/livez" | "/readyz" | "/version")
        || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/")
}

/// The client certificate's holder, else the admin token's, else a service account token's;
/// None: unauthenticated.
async fn identify(
    shared: &Shared,
    certificate: Option<&Arc<authz::Identity>>,
    headers: &http::HeaderMap,
) -> Option<Arc<authz::Identity>> {
    if let Some(identity) = certificate {
        return Some(identity.clone());
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)?;
    if constant_time_eq(token.as_bytes(), shared.admin_token.as_bytes()) {
        return Some(Arc::new(authz::Identity::admin()));
    }
    shared.tokens.authenticate(&shared.api, token).await.map(Arc::new)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve(
    shared: Arc<Shared>,
    certificate: Option<Arc<authz::Identity>>,
    req: http::Request<hyper::body::Incoming>,
) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let (path, query) = handler::split_path_and_query(&parts.uri);
    let (verb, resource) = metrics::classify(&parts.method, &path, &query);
    let identity = if is_public(&path) || path == join::CA_CERTS_PATH || path == join::JOIN_PATH {
        None
    } else {
        identify(&shared, certificate.as_ref(), &parts.headers).await
    };
    let response = if path == join::CA_CERTS_PATH || path == join::JOIN_PATH {
        join::serve(&shared.pki, &parts, body).await
    } else if let Some(denied) = (!is_public(&path))
        .then(|| match &identity {
            None => Some(ApiError::unauthorized()),
            Some(identity) => authz::authorize(identity, &parts.method, &path).err(),
        })
        .flatten()
    {
        denied.into_response()
    } else if let Some(target) = tokens::token_path(&path) {
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return ApiError::bad_request(format!("reading the request body: {e}"))
                    .into_response()
                    .map(Body::new);
            }
        };
        let identity = identity.as_deref();
        tokens::serve(
            &shared.api,
            &shared.tokens,
            identity,
            &parts.method,
            &parts.headers,
            target,
            body,
        )
        .await
    } else if let Some((namespace, pod, sub)) = proxy::route(&path) {
        let (namespace, pod) = (namespace.to_string(), pod.to_string());
        let req = http::Request::from_parts(parts, body);
        let response = proxy::serve(&shared.api, &shared.kubelet, req, &namespace, &pod, sub).await;
        let code = response.status().as_u16();
        shared.metrics.observe(&verb, &resource, code, started.elapsed());
        return response;
    } else {
        match path.as_str() {
            "/healthz" | "/livez" => (StatusCode::OK, "ok").into_response(),
            "/readyz" => match shared.api.store.current_revision().await {
                Ok(_) => (StatusCode::OK, "ok").into_response(),
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")).into_response(),
            },
            "/metrics" => shared.metrics.render(),
            _ => {
                let too_big = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_BODY);
                let body = if too_big {
                    Err(ApiError::too_large())
                } else {
                    match Limited::new(body, MAX_BODY).collect().await {
                        Ok(b) => Ok(b.to_bytes()),
                        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
                        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
                    }
                };
                match body {
                    Err(e) => e.into_response(),
                    Ok(body) => {
                        let request = Request {
                            method: parts.method.clone(),
                            path: path.clone(),
                            query,
                            headers: parts.headers,
                            body,
                        };
                        shared.api.clone().handle(request).await
                    }
                }
            }
        }
    };
    let code = response.status().as_u16();
    shared.metrics.observe(&verb, &resource, code, started.elapsed());
    tracing::debug!(method = %parts.method, path, code, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    response.map(Body::new)
}

/// First-start objects: the four system namespaces, the `kubernetes` Service and the default
/// StorageClass `local-path`. Each is created only if absent, so a user's edits survive restarts.
async fn bootstrap(api: &Arc<ApiServer>, bind: std::net::IpAddr, port: u16) -> Result<()> {
    let create = |path: &str, body: serde_json::Value| {
        let api = api.clone();
        let path = path.to_string();
        async move {
            let req = Request {
                method: Method::POST,
                path: path.clone(),
                query: Default::default(),
                headers: {
                    let mut h = http::HeaderMap::new();
                    h.insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
                    h.insert(header::USER_AGENT, "weir-apiserver".parse().expect("static"));
                    h
                },
                body: serde_json::to_vec(&body).unwrap_or_default().into(),
            };
            let resp = api.handle(req).await;
            let code = resp.status();
            if code.is_success() || code == StatusCode::CONFLICT {
                Ok(())
            } else {
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Err(anyhow::anyhow!(
                    "bootstrap {path}: {code}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            }
        }
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        create("/api/v1/namespaces", json!({"metadata": {"name": ns}})).await?;
    }
    create(
        "/api/v1/namespaces/default/services",
        json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
               "spec": {"clusterIP": allocator::KUBERNETES_SERVICE_IP, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}}),
    )
    .await?;
    create(
        "/apis/storage.k8s.io/v1/storageclasses",
        json!({"metadata": {"name": crate::controllers::volume::LOCAL_PATH_CLASS,
                            "annotations": {strategy::DEFAULT_CLASS_ANNOTATION: "true"}},
               "provisioner": crate::controllers::volume::LOCAL_PATH_PROVISIONER,
               "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await?;
    let ip = if bind.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        bind.to_string()
    };
    create(
        "/api/v1/namespaces/default/endpoints",
        json!({"metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
               "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]}),
    )
    .await?;
    Ok(())
}

/// Start the controllers in-process; they reach the API like any other client, through the
/// admin kubeconfig just written (the listener is bound, so their requests queue until served).
async fn start_controllers(kubeconfig: PathBuf, config: crate::controllers::Config) {
    loop {
        match controller_client(&kubeconfig).await {
            Ok(client) => return crate::controllers::run(client, config),
            Err(e) => {
                tracing::warn!(error = %e, "building the controllers' client failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn controller_client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Compact the store every `interval`, keeping one interval of history for watches.
async fn compactor(store: Arc<dyn Store>, interval: Duration) {
    let mut previous: Option<i64> = None;
    loop {
        tokio::time::sleep(interval).await;
        if let Some(rev) = previous
            && let Err(e) = store.compact(rev).await
        {
            tracing::warn!(revision = rev, error = %e, "compaction failed");
        }
        previous = store.current_revision().await.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerConfig,
    }

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").unwrap_err().contains("longer than zero"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn node_and_load_balancer_flags_reach_the_controllers() {
        let cli = Cli::try_parse_from(["weir"]).unwrap();
        let c = cli.server.controllers().unwrap();
        assert_eq!(c.node_monitor_grace_period, Duration::from_secs(40));
        assert!(c.load_balancer_pool.is_none());
        assert_eq!(c.cluster_cidrs.to_string(), "10.244.0.0/16/24");
        assert_eq!(cli.server.default_unreachable_toleration_seconds, 300);
        let cli = Cli::try_parse_from([
            "weir",
            "--node-monitor-grace-period",
            "3s",
            "--load-balancer-pool",
            "192.0.2.0/28,198.51.100.10-198.51.100.20",
            "--default-not-ready-toleration-seconds",
            "2",
        ])
        .unwrap();
        let c = cli.server.controllers().unwrap();
        assert_eq!(c.node_monitor_grace_period, Duration::from_secs(3));
        assert!(c.load_balancer_pool.unwrap().contains("198.51.100.15".parse().unwrap()));
        assert_eq!(cli.server.default_not_ready_toleration_seconds, 2);
        let bad = Cli::try_parse_from(["weir", "--load-balancer-pool", "192.0.2.0/33"]);
        let message = bad.err().expect("rejected").to_string();
        assert!(message.contains("--load-balancer-pool"), "{message}");
        let cli = Cli::try_parse_from([
            "weir",
            "--cluster-cidr",
            "10.42.0.0/16",
            "--node-cidr-mask-size-ipv4",
            "12",
        ]);
        let message = cli.unwrap().server.controllers().unwrap_err().to_string();
        assert!(message.contains("--node-cidr-mask-size-ipv4 12"), "{message}");
    }
}
