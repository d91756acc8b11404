//! Pulling images from OCI / Docker v2 registries into containerd, and kubelet's
//! imagePullPolicy.
//!
//! The registry protocol (the `/v2/` ping, Bearer token and Basic auth, manifests, blobs
//! with digest checks) is `oci-client`'s. Here: choosing HTTP or HTTPS, the `linux/<host
//! arch>` manifest of an index (with image.rs's platform choice, so import and pull agree),
//! and storing the image with the import's code ([`Runtime::store_image`]): blobs into the
//! content store (only those missing are downloaded), the image record, the unpacked layers.
//!
//! Registries on loopback (`localhost`, 127.0.0.0/8, `[::1]`) and those in
//! [`RegistryConfig::insecure_registries`] are spoken to over plain HTTP, as containerd and
//! Docker allow; every other one over HTTPS, checked against the system's roots.
//!
//! Images in the `weir.local` registry ([`LOCAL_REGISTRY`]) are the project's own, only
//! ever imported (`cargo xtask images`, `weir image import`): whatever the policy, such an
//! image present is used and absent is [`Error::ImageNotPresent`]; it is never pulled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tracing::info;

use super::credentials::Credentials;
use super::image::{
    BlobSource, Chunks, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Desc, Image, Index, Manifest, OCI_INDEX, OCI_MANIFEST,
    Plan, Source, WRITE_CHUNK, normalize_reference, parse_json, pick_platform,
};
use super::{Error, Runtime};

/// The registry name of the project's own images (`weir.local/busybox:latest`): imported,
/// never pulled.
pub const LOCAL_REGISTRY: &str = "weir.local";

/// The manifest media types asked for, in the order registries should prefer them.
const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
/// A registry that does not answer a connection within this long is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A download that stalls (no bytes) this long has failed.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How the agent talks to registries; its flags, for the agent's command to flatten.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// A registry (`host` or `host:port`, as in image references) to pull from over plain
    /// HTTP, besides loopback ones; repeatable. Only on a network you trust: nothing is
    /// encrypted or authenticated.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// A PEM file of certificate authorities to trust for HTTPS registries besides the
    /// system's roots (registries with a private CA); repeatable.
    #[arg(long = "registry-ca", value_name = "PEM")]
    pub ca_certificates: Vec<PathBuf>,
}

impl RegistryConfig {
    /// Whether `registry` is spoken to over plain HTTP: loopback ones and the insecure list.
    pub fn plain_http(&self, registry: &str) -> bool {
        is_loopback_registry(registry)
            || self
                .insecure_registries
                .iter()
                .any(|r| r.eq_ignore_ascii_case(registry))
    }
}

/// kubelet's `imagePullPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull every time a container starts (a present image is still checked against the
    /// registry, and an unreachable registry fails the start).
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull: the image must be on the node already.
    Never,
}

impl PullPolicy {
    /// Kubernetes' default for a container without `imagePullPolicy`: `Always` when the tag
    /// is `latest` or there is neither tag nor digest, otherwise `IfNotPresent` (a digest
    /// alone included).
    pub fn default_for(reference: &str) -> PullPolicy {
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (reference, None),
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        let tag = last.split_once(':').map(|(_, tag)| tag);
        match (tag, digest) {
            (Some("latest"), _) | (None, None) => PullPolicy::Always,
            _ => PullPolicy::IfNotPresent,
        }
    }

    /// A container's policy: `imagePullPolicy` as written, or the default for its image.
    pub fn for_container(policy: Option<&str>, image: &str) -> Result<PullPolicy, Error> {
        match policy {
            None | Some("") => Ok(PullPolicy::default_for(image)),
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            Some(other) => Err(Error::InvalidSpec(format!(
                "imagePullPolicy {other:?} is not one of Always, IfNotPresent, Never"
            ))),
        }
    }
}

/// The registry part of a normalised reference (`docker.io`, `127.0.0.1:5000`).
pub fn registry_of(normalized: &str) -> &str {
    normalized.split('/').next().unwrap_or(normalized)
}

/// Whether a registry (`host` or `host:port`) is on this machine: `localhost`, an address
/// in 127.0.0.0/8, or `[::1]`. Such registries are spoken to over plain HTTP.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if registry.matches(':').count() == 1 {
        registry.split(':').next().unwrap_or(registry)
    } else {
        registry
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Per-image locks, so that only one pull of an image runs at a time on the node: when
/// the replicas of a deployment start together, the first pulls and the others find the
/// image present (`IfNotPresent`) or fetch only its manifest (`Always`).
#[derive(Clone, Default)]
pub(crate) struct PullLocks(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

/// Held while an image is pulled; the lock's entry goes when no one else waits for it.
pub(crate) struct PullGuard {
    locks: PullLocks,
    name: String,
    mutex: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl PullLocks {
    /// Waits for the other pulls of `name` to finish.
    pub(crate) async fn lock(&self, name: &str) -> PullGuard {
        let mutex = {
            let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry(name.to_string()).or_default().clone()
        };
        let guard = mutex.clone().lock_owned().await;
        PullGuard {
            locks: self.clone(),
            name: name.to_string(),
            mutex,
            guard: Some(guard),
        }
    }

    /// How many images have a lock entry (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or_default()
    }
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The map's reference and ours: nobody else holds or waits for this lock.
        if Arc::strong_count(&self.mutex) == 2 {
            map.remove(&self.name);
        }
    }
}

/// Whether `normalized` names one of the project's own, imported-only images.
fn is_local_only(normalized: &str) -> bool {
    registry_of(normalized) == LOCAL_REGISTRY
}

/// One pull: what errors name.
struct Pull {
    reference: String,
    registry: String,
    plain_http: bool,
    /// Which credentials were sent, for the unauthorized error.
    tried: String,
}

impl Pull {
    /// A registry client's error as one of ours, naming the registry and reference.
    fn error(&self, error: OciDistributionError) -> Error {
        use OciDistributionError as E;
        let unauthorized = || Error::RegistryUnauthorized {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
            tried: self.tried.clone(),
        };
        let not_found = || Error::ImageNotFound {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
        };
        let bad = |reason: String| Error::BadManifest {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
            reason,
        };
        let failed = |reason: String| Error::PullFailed {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
            reason,
        };
        match error {
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => unauthorized(),
            E::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    not_found()
                } else {
                    failed(format!("{url}: {envelope}"))
                }
            }
            E::ServerError { code: 401 | 403, .. } => unauthorized(),
            E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => not_found(),
            E::ServerError { code, url, message } => failed(format!("{url} answered HTTP {code}: {}", message.trim())),
            E::RequestError(e) => self.unreachable(&e),
            e @ (E::ManifestParsingError(_)
            | E::VersionedParsingError(_)
            | E::UnsupportedMediaTypeError(_)
            | E::UnsupportedSchemaVersionError(_)
            | E::DigestError(_)
            | E::ManifestEncodingError(_)
            | E::JsonError(_)
            | E::SpecViolationError(_)
            | E::IncompatibleLayerMediaTypeError(_)) => bad(e.to_string()),
            other => failed(causes(&other)),
        }
    }

    fn unreachable(&self, error: &(dyn std::error::Error + 'static)) -> Error {
        let hint = if self.plain_http {
            format!("check that it runs and listens on plain HTTP at {}", self.registry)
        } else {
            format!(
                "check that the node reaches it over HTTPS with a certificate it trusts (the system's roots, or a CA \
                 in the agent's registry CA certificates); if it serves plain HTTP, list {} in the agent's insecure \
                 registries",
                self.registry
            )
        };
        Error::RegistryUnreachable {
            registry: self.registry.clone(),
            reason: causes(error),
            hint,
        }
    }
}

/// An error and its causes, `: `-separated (reqwest's own message alone says little).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The blobs of a pull: fetched from the registry by digest.
struct Registry<'a> {
    client: &'a Client,
    reference: &'a Reference,
    pull: &'a Pull,
}

impl BlobSource for Registry<'_> {
    /// Blobs are addressed by their descriptor's digest alone.
    type Location = ();

    async fn open(&self, desc: &Desc, _: &()) -> Result<Chunks, Error> {
        let blob = self
            .client
            .pull_blob_stream(self.reference, desc.digest.as_str())
            .await
            .map_err(|e| self.pull.error(e))?;
        let (registry, reference, digest) = (
            self.pull.registry.clone(),
            self.pull.reference.clone(),
            desc.digest.clone(),
        );
        // oci-client checks the digest as the bytes arrive; a mismatch or a broken
        // connection ends the stream with an error.
        let bytes = blob.stream.map(move |piece| {
            piece.map_err(|e| Error::PullFailed {
                registry: registry.clone(),
                reference: reference.clone(),
                reason: format!("downloading blob {digest}: {}", causes(&e)),
            })
        });
        Ok(rechunk(Box::pin(bytes)))
    }
}

/// Network reads come in pieces of a few KiB; the content store gets pieces of
/// [`WRITE_CHUNK`] (the last one shorter), so a layer is a few messages rather than
/// thousands, and none is over containerd's message limit.
fn rechunk(bytes: futures::stream::BoxStream<'static, Result<bytes::Bytes, Error>>) -> Chunks {
    Box::pin(futures::stream::unfold(
        Some((bytes.fuse(), Vec::new())),
        |state| async move {
            let (mut bytes, mut buf) = state?;
            loop {
                if buf.len() >= WRITE_CHUNK {
                    let rest = buf.split_off(WRITE_CHUNK);
                    return Some((Ok(buf), Some((bytes, rest))));
                }
                match bytes.next().await {
                    Some(Ok(piece)) => buf.extend_from_slice(&piece),
                    Some(Err(e)) => return Some((Err(e), None)),
                    None if buf.is_empty() => return None,
                    None => return Some((Ok(buf), None)),
                }
            }
        },
    ))
}

/// What a manifest document is, from its `mediaType` or, when absent, its fields.
fn is_index(document: &serde_json::Value) -> bool {
    match document.get("mediaType").and_then(|m| m.as_str()) {
        Some(media_type) => media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST,
        None => document.get("manifests").is_some(),
    }
}

/// Checks a manifest or index is a schema-2 document and returns it as JSON.
fn parse_document(raw: &[u8], what: &str) -> Result<serde_json::Value, String> {
    let document: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("the {what} is not JSON: {e}"))?;
    match document.get("schemaVersion").and_then(|v| v.as_i64()) {
        Some(2) => Ok(document),
        Some(1) => Err(format!(
            "the {what} is Docker schema 1, which containerd no longer pulls: push the image again with a current \
             docker or buildah"
        )),
        other => Err(format!("the {what} has schemaVersion {other:?}, not 2")),
    }
}

impl Runtime {
    /// An oci-client for `registry`: plain HTTP for loopback and insecure registries,
    /// HTTPS otherwise; connect and read time limits so a dead registry fails the pull.
    fn registry_client(&self, registry: &str) -> Result<(Client, bool), Error> {
        // reqwest (built without a bundled provider) takes the process default: ring, as
        // the rest of the workspace. Already installed (by us or another part) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let plain_http = self.registry_config().plain_http(registry);
        let mut extra_root_certificates = Vec::new();
        for path in &self.registry_config().ca_certificates {
            let data = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading the registry CA certificate {}", path.display()), e))?;
            extra_root_certificates.push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data,
            });
        }
        let config = oci_client::client::ClientConfig {
            extra_root_certificates,
            protocol: if plain_http {
                oci_client::client::ClientProtocol::Http
            } else {
                oci_client::client::ClientProtocol::Https
            },
            // The platform is chosen here (image.rs), the same way as for archives.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| {
            Error::Containerd(format!(
                "making an HTTP client for registry {registry}: {} (are the registry CA certificates PEM?)",
                causes(&e)
            ))
        })?;
        Ok((client, plain_http))
    }

    /// Pulls `reference` from its registry (with `credentials`, or anonymously) into
    /// containerd, unpacks it and returns it. Blobs already in the content store are not
    /// downloaded again. For an index, the manifest for linux on this machine's
    /// architecture is pulled and the image record points at it.
    pub async fn pull_image(&self, reference: &str, credentials: Option<&Credentials>) -> Result<Image, Error> {
        let name = normalize_reference(reference)?;
        if is_local_only(&name) {
            return Err(Error::ImageNotPresent { reference: name });
        }
        let registry = registry_of(&name).to_string();
        let image: Reference = name
            .parse()
            .map_err(|e| Error::InvalidImageName(format!("{name:?} is not an image reference: {e}")))?;
        let (client, plain_http) = self.registry_client(&registry)?;
        let (auth, tried) = match credentials {
            Some(c) => (
                RegistryAuth::Basic(c.username.clone(), c.password.clone()),
                format!("tried user {:?} from {}", c.username, c.source),
            ),
            None => (
                RegistryAuth::Anonymous,
                format!("no credentials sent: no imagePullSecret has an entry for {registry}"),
            ),
        };
        let pull = Pull {
            reference: name.clone(),
            registry,
            plain_http,
            tried,
        };
        let bad = |reason: String| Error::BadManifest {
            registry: pull.registry.clone(),
            reference: name.clone(),
            reason,
        };
        let (raw, digest) = client
            .pull_manifest_raw(&image, &auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| pull.error(e))?;
        let document = parse_document(&raw, "manifest").map_err(bad)?;
        let (manifest_desc, raw) = if is_index(&document) {
            let index: Index = parse_json(&format!("the index of {name}"), &raw).map_err(|e| bad(e.to_string()))?;
            let desc = pick_platform(&index, &format!("the index of {name}")).map_err(|e| bad(e.to_string()))?;
            let by_digest = Reference::with_digest(
                image.registry().to_string(),
                image.repository().to_string(),
                desc.digest.clone(),
            );
            // oci-client checks the bytes against the digest of a by-digest reference.
            let (raw, _) = client
                .pull_manifest_raw(&by_digest, &auth, &[OCI_MANIFEST, DOCKER_MANIFEST])
                .await
                .map_err(|e| pull.error(e))?;
            let document = parse_document(&raw, "platform manifest").map_err(bad)?;
            if is_index(&document) {
                return Err(bad(format!("the index entry {} is itself an index", desc.digest)));
            }
            let desc = Desc {
                size: raw.len() as i64,
                annotations: Default::default(),
                platform: None,
                ..desc
            };
            (desc, raw)
        } else {
            let media_type = document
                .get("mediaType")
                .and_then(|m| m.as_str())
                .unwrap_or(OCI_MANIFEST)
                .to_string();
            let desc = Desc {
                media_type,
                digest,
                size: raw.len() as i64,
                ..Default::default()
            };
            (desc, raw)
        };
        let manifest: Manifest =
            parse_json(&format!("the manifest of {name}"), &raw).map_err(|e| bad(e.to_string()))?;
        let mut config = Vec::new();
        client
            .pull_blob(&image, manifest.config.digest.as_str(), &mut config)
            .await
            .map_err(|e| pull.error(e))?;
        let plan = Plan {
            names: vec![name.clone()],
            manifest: (manifest_desc, Source::Memory(raw.to_vec())),
            config: (manifest.config.clone(), config),
            layers: manifest.layers.iter().map(|l| (l.clone(), Source::At(()))).collect(),
        };
        let source = Registry {
            client: &client,
            reference: &image,
            pull: &pull,
        };
        let lease = self.create_lease().await?;
        let stored = self.store_image(&source, &lease, &plan).await;
        self.delete_lease(&lease).await;
        stored?;
        info!(image = %name, manifest = %plan.manifest.0.digest, "pulled image");
        self.ensure_image(&name).await
    }

    /// The image `reference`, pulled or not as `policy` says (kubelet's rules): `Never`
    /// uses a present image and fails with [`Error::NeverPull`] otherwise; `IfNotPresent`
    /// pulls only an absent image; `Always` pulls every time, so an unreachable registry
    /// fails even when the image is present. `weir.local` images are never pulled: present
    /// they are used, absent they are [`Error::ImageNotPresent`].
    pub async fn ensure_image_with(
        &self,
        reference: &str,
        policy: PullPolicy,
        credentials: Option<&Credentials>,
    ) -> Result<Image, Error> {
        let name = normalize_reference(reference)?;
        if is_local_only(&name) {
            return self.ensure_image(&name).await;
        }
        match policy {
            PullPolicy::Never => match self.ensure_image(&name).await {
                Err(Error::ImageNotPresent { reference }) => Err(Error::NeverPull { reference }),
                other => other,
            },
            PullPolicy::IfNotPresent => match self.ensure_image(&name).await {
                Err(Error::ImageNotPresent { .. }) => {
                    let _pulling = self.pull_locks().lock(&name).await;
                    // Pulled meanwhile by whoever held the lock?
                    match self.ensure_image(&name).await {
                        Err(Error::ImageNotPresent { .. }) => self.pull_image_spawnable(&name, credentials).await,
                        other => other,
                    }
                }
                other => other,
            },
            PullPolicy::Always => {
                let _pulling = self.pull_locks().lock(&name).await;
                self.pull_image_spawnable(&name, credentials).await
            }
        }
    }

    /// [`Runtime::pull_image`] on a blocking thread of the current runtime. oci-client's
    /// futures are `Send` only for some lifetimes (rustc cannot prove the higher-ranked
    /// bound), so a task that awaits them directly cannot be `tokio::spawn`ed; driven with
    /// `block_on` from `spawn_blocking`, the pull needs no `Send` and the caller stays
    /// spawnable.
    async fn pull_image_spawnable(&self, name: &str, credentials: Option<&Credentials>) -> Result<Image, Error> {
        let runtime = self.clone();
        let name = name.to_owned();
        let credentials = credentials.cloned();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(runtime.pull_image(&name, credentials.as_ref())))
            .await
            .map_err(|e| Error::Containerd(format!("the pull task failed: {e}")))?
    }
}

/// The agent's pod workers are spawned tasks: pulling must keep them `Send`.
#[allow(dead_code)]
fn ensure_image_with_is_send(runtime: &Runtime) {
    fn send<T: Send>(_: T) {}
    send(runtime.ensure_image_with("busybox", PullPolicy::Always, None));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_default_like_kubernetes() {
        use PullPolicy::*;
        assert_eq!(PullPolicy::default_for("busybox"), Always);
        assert_eq!(PullPolicy::default_for("busybox:latest"), Always);
        assert_eq!(PullPolicy::default_for("localhost:5000/app"), Always);
        assert_eq!(PullPolicy::default_for("localhost:5000/app:v1"), IfNotPresent);
        assert_eq!(PullPolicy::default_for("busybox:1.36"), IfNotPresent);
        assert_eq!(PullPolicy::default_for("busybox@sha256:abcd"), IfNotPresent);
        assert_eq!(PullPolicy::default_for("busybox:latest@sha256:abcd"), Always);
        assert_eq!(PullPolicy::for_container(Some("Never"), "busybox").unwrap(), Never);
        assert_eq!(PullPolicy::for_container(None, "busybox:1").unwrap(), IfNotPresent);
        assert_eq!(PullPolicy::for_container(Some(""), "busybox").unwrap(), Always);
        let err = PullPolicy::for_container(Some("Sometimes"), "busybox")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Always, IfNotPresent, Never"), "{err}");
    }

    #[test]
    fn loopback_registries() {
        for loopback in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:1",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback_registry(loopback), "{loopback}");
        }
        for remote in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:5000",
            "128.0.0.1",
            "weir.local",
        ] {
            assert!(!is_loopback_registry(remote), "{remote}");
        }
    }

    #[tokio::test]
    async fn pulls_of_one_image_wait_for_each_other_and_locks_are_dropped() {
        let locks = PullLocks::default();
        let first = locks.lock("a").await;
        let other_image = locks.lock("b").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the second pull of a waits for the first");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the second pull runs once the first is done")
            .unwrap();
        drop(other_image);
        assert_eq!(locks.len(), 0, "no entries are left behind");
    }

    #[test]
    fn plain_http_for_loopback_and_listed_registries_only() {
        let config = RegistryConfig {
            insecure_registries: vec!["registry.lan:5000".into()],
            ..Default::default()
        };
        assert!(config.plain_http("127.0.0.1:5000"));
        assert!(config.plain_http("registry.lan:5000"));
        assert!(!config.plain_http("registry.lan"), "the port is part of the name");
        assert!(!config.plain_http("docker.io"));
        assert!(!RegistryConfig::default().plain_http("registry.lan:5000"));
    }

    #[test]
    fn registry_flags_repeat() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Agent {
            #[command(flatten)]
            registries: RegistryConfig,
        }
        let agent = Agent::parse_from([
            "agent",
            "--insecure-registry",
            "registry.lan:5000",
            "--insecure-registry",
            "10.0.0.5",
            "--registry-ca",
            "/etc/weir/registry-ca.pem",
        ]);
        assert_eq!(agent.registries.insecure_registries, ["registry.lan:5000", "10.0.0.5"]);
        assert_eq!(
            agent.registries.ca_certificates,
            [PathBuf::from("/etc/weir/registry-ca.pem")]
        );
        assert_eq!(Agent::parse_from(["agent"]).registries, RegistryConfig::default());
    }

    #[test]
    fn registries_of_references() {
        assert_eq!(registry_of("docker.io/library/busybox:latest"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/test/busybox:v1"), "127.0.0.1:5000");
        assert!(is_local_only("weir.local/busybox:latest"));
        assert!(!is_local_only("weir.local.example/busybox:latest"));
    }

    #[test]
    fn documents_are_told_apart() {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []});
        assert!(is_index(&index));
        assert!(is_index(&serde_json::json!({"schemaVersion": 2, "manifests": []})));
        assert!(!is_index(
            &serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST})
        ));
        let err = parse_document(br#"{"schemaVersion": 1, "fsLayers": []}"#, "manifest").unwrap_err();
        assert!(err.contains("schema 1"), "{err}");
        assert!(parse_document(b"<html>", "manifest").unwrap_err().contains("not JSON"));
    }

    #[tokio::test]
    async fn rechunking_keeps_bytes_and_bounds_pieces() {
        let pieces: Vec<Result<bytes::Bytes, Error>> = vec![
            Ok(bytes::Bytes::from(vec![1u8; 10])),
            Ok(bytes::Bytes::from(vec![2u8; 2 * WRITE_CHUNK + 5])),
            Ok(bytes::Bytes::from(vec![3u8; 7])),
        ];
        let chunks: Vec<Vec<u8>> = rechunk(Box::pin(futures::stream::iter(pieces)))
            .map(|c| c.unwrap())
            .collect()
            .await;
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [WRITE_CHUNK, WRITE_CHUNK, 22]);
        let all: Vec<u8> = chunks.concat();
        assert_eq!(all.len(), 10 + 2 * WRITE_CHUNK + 5 + 7);
        assert_eq!(all[..10], [1u8; 10]);
        assert_eq!(all[all.len() - 7..], [3u8; 7]);

        let failing: Vec<Result<bytes::Bytes, Error>> = vec![
            Ok(bytes::Bytes::from_static(b"abc")),
            Err(Error::Archive("broken".into())),
        ];
        let results: Vec<Result<Vec<u8>, Error>> = rechunk(Box::pin(futures::stream::iter(failing))).collect().await;
        assert!(matches!(results.as_slice(), [Err(Error::Archive(_))]), "{results:?}");
    }

    #[test]
    fn registry_errors_are_told_apart() {
        let pull = Pull {
            reference: "127.0.0.1:5000/test/app:v1".into(),
            registry: "127.0.0.1:5000".into(),
            plain_http: true,
            tried: "tried user \"alice\" from secret default/regcred (entry 127.0.0.1:5000)".into(),
        };
        let envelope = |code: &str| {
            serde_json::from_str::<oci_client::errors::OciEnvelope>(&format!(
                r#"{{"errors":[{{"code":"{code}","message":"m"}}]}}"#
            ))
            .unwrap()
        };
        let err = pull.error(OciDistributionError::UnauthorizedError { url: "u".into() });
        let text = err.to_string();
        assert!(matches!(err, Error::RegistryUnauthorized { .. }));
        assert!(
            text.contains("127.0.0.1:5000") && text.contains("secret default/regcred"),
            "{text}"
        );
        let err = pull.error(OciDistributionError::RegistryError {
            envelope: envelope("MANIFEST_UNKNOWN"),
            url: "u".into(),
        });
        assert!(matches!(err, Error::ImageNotFound { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:5000/test/app:v1"));
        let err = pull.error(OciDistributionError::RegistryError {
            envelope: envelope("DENIED"),
            url: "u".into(),
        });
        assert!(matches!(err, Error::RegistryUnauthorized { .. }), "{err}");
        let err = pull.error(OciDistributionError::ServerError {
            code: 503,
            url: "u".into(),
            message: "down".into(),
        });
        assert!(matches!(err, Error::PullFailed { .. }), "{err}");
        let err = pull.error(OciDistributionError::ManifestParsingError("x".into()));
        assert!(matches!(err, Error::BadManifest { .. }), "{err}");
        for err in [
            Error::NeverPull { reference: "r".into() },
            Error::ImageNotFound {
                registry: "r".into(),
                reference: "r".into(),
            },
        ] {
            assert!(err.image_failure_reason().is_some(), "{err}");
        }
        assert_eq!(
            Error::NeverPull { reference: "r".into() }.image_failure_reason(),
            Some("ErrImageNeverPull")
        );
    }
}
