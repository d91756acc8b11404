//! Privileged tests of image pulls and air-gap imports against a real containerd and a real
//! registry: Debian's `docker-registry` (the CNCF distribution registry), started on
//! 127.0.0.1 at a free port with its storage in a temporary directory and htpasswd (bcrypt)
//! authentication. The busybox image of `cargo xtask images` (WEIR_IMAGES) is pushed into
//! it with oci-client and pulled back through the agent's runtime.
//!
//! Token auth (a `Bearer` challenge, a token from the realm for the user's Basic
//! credentials) is checked against a small registry of the test's own (axum, on loopback):
//! Debian's registry only does htpasswd (Basic) without a separate token server.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored
//! --test-threads=1`). Each test has its own containerd (the fixture of runtime.rs, in
//! common/containerd.rs); the registry is killed by its PID and its directory removed by a
//! Drop guard, also when an assertion fails. Traffic goes only to 127.0.0.1.

#[path = "common/containerd.rs"]
mod containerd;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd::{Fixture, Netns, images, unique};
use futures::FutureExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};
use weir_agent::runtime::{Error, PullPolicy, RegistryConfig, import_directory, registry_credentials};

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const BUSYBOX: &str = "weir.local/busybox:latest";
const ECHO: &str = "weir.local/echo:latest";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A `docker-registry` this test started, killed (by PID) and its directory removed on drop.
struct TestRegistry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: SocketAddrV4,
    user: String,
    password: String,
}

impl TestRegistry {
    /// Starts a registry on 127.0.0.1 at a free port, requiring `user`'s password (bcrypt
    /// htpasswd), and waits until it answers.
    fn start() -> TestRegistry {
        // A free port: bind port 0, note it, release it for the registry.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("finding a free port on 127.0.0.1")
            .port();
        TestRegistry::start_at(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), None, None)
    }

    /// Starts a registry listening on `addr`, inside network namespace `netns` when given,
    /// serving HTTPS with `tls` (certificate and key PEM) when given.
    fn start_at(addr: SocketAddrV4, netns: Option<&str>, tls: Option<(&str, &str)>) -> TestRegistry {
        assert!(
            Path::new(REGISTRY_BINARY).exists(),
            "{REGISTRY_BINARY} is missing: run `cargo xtask setup` (it installs Debian's docker-registry)"
        );
        let dir = tempfile::Builder::new()
            .prefix("weir-registry-")
            .tempdir_in("/tmp")
            .expect("creating a directory under /tmp");
        let user = "weir".to_string();
        let password = unique("pw");
        // Cost 4 (bcrypt's least) keeps the registry's check of every request fast.
        let hash = bcrypt::hash_with_result(&password, 4)
            .expect("hashing the password")
            .format_for_version(bcrypt::Version::TwoY);
        std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    \
             enabled: true\nauth:\n  htpasswd:\n    realm: weir-test\n    path: {htpasswd}\nhttp:\n  addr: {addr}\n",
            storage = dir.path().join("storage").display(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        if let Some((certificate, key)) = tls {
            std::fs::write(dir.path().join("tls.crt"), certificate).unwrap();
            std::fs::write(dir.path().join("tls.key"), key).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("tls.crt").display(),
                dir.path().join("tls.key").display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        // `ip netns exec` execs the registry itself, so the child's PID is the registry's.
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, REGISTRY_BINARY]);
                command
            }
            None => Command::new(REGISTRY_BINARY),
        };
        let child = command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let mut registry = TestRegistry {
            child: Some(child),
            dir,
            addr,
            user,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(status) = registry.ping() {
                // Over HTTPS the plain request gets 400; over HTTP, credentials are asked for.
                assert_eq!(status, if tls.is_some() { 400 } else { 401 }, "{}", registry.log());
                break;
            }
            if let Some(Ok(Some(exit))) = registry.child.as_mut().map(|c| c.try_wait()) {
                panic!("docker-registry exited ({exit}): {}", registry.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {addr} within 15 s: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// The HTTP status of `GET /v2/`.
    fn ping(&self) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&self.addr.into(), Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:?}")))
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// SIGKILL the registry (the child we started, by its PID) and reap it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A `kubernetes.io/dockerconfigjson` Secret for this registry with `password`.
    fn pull_secret(&self, name: &str, password: &str) -> Secret {
        let config = serde_json::json!({"auths": {self.host(): {"username": self.user, "password": password}}});
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                ByteString(config.to_string().into_bytes()),
            )])),
            ..Default::default()
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The members of an OCI image archive, by path.
fn read_archive(path: &Path) -> HashMap<String, Vec<u8>> {
    let mut archive =
        tar::Archive::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let mut members = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        members.insert(name, data);
    }
    members
}

fn blob<'a>(members: &'a HashMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let path = format!("blobs/{}", digest.replacen(':', "/", 1));
    members
        .get(&path)
        .unwrap_or_else(|| panic!("the archive has no {path}"))
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The OCI name of this machine's architecture, and one that is not it.
fn architectures() -> (&'static str, &'static str) {
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    (host, if host == "s390x" { "ppc64le" } else { "s390x" })
}

/// Pushes images into the test registry with the user's credentials.
struct Pusher {
    client: Client,
    auth: RegistryAuth,
    host: String,
}

impl Pusher {
    /// Over plain HTTP, or over HTTPS trusting `ca` (PEM).
    async fn new(registry: &TestRegistry, ca: Option<&str>) -> Pusher {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(ClientConfig {
            protocol: if ca.is_some() {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            extra_root_certificates: ca
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.as_bytes().to_vec(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .expect("making the push client");
        Pusher {
            client,
            auth: RegistryAuth::Basic(registry.user.clone(), registry.password.clone()),
            host: registry.host(),
        }
    }

    fn reference(&self, repository_tag: &str) -> Reference {
        format!("{}/{repository_tag}", self.host).parse().unwrap()
    }

    async fn blob(&self, repository: &str, data: &[u8]) {
        let reference = self.reference(&format!("{repository}:blobs"));
        self.client
            .auth(&reference, &self.auth, RegistryOperation::Push)
            .await
            .expect("authenticating the push");
        self.client
            .push_blob(&reference, data.to_vec(), &digest_of(data))
            .await
            .unwrap_or_else(|e| panic!("pushing a blob to {repository}: {e}"));
    }

    /// Pushes weir.local/busybox:latest's config, layer and manifest (from the archive of
    /// `cargo xtask images`) as test/busybox:v1; returns the manifest's digest and bytes.
    async fn busybox(&self, images: &Path) -> (String, Vec<u8>) {
        let members = read_archive(&images.join("busybox.tar"));
        let index: serde_json::Value = serde_json::from_slice(&members["index.json"]).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
        let manifest = blob(&members, &manifest_digest).to_vec();
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let mut blobs = vec![parsed["config"]["digest"].as_str().unwrap().to_string()];
        blobs.extend(
            parsed["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string()),
        );
        for digest in &blobs {
            self.blob("test/busybox", blob(&members, digest)).await;
        }
        self.manifest("test/busybox:v1", OCI_MANIFEST, &manifest).await;
        (manifest_digest, manifest)
    }

    async fn manifest(&self, repository_tag: &str, media_type: &str, body: &[u8]) {
        let reference = self.reference(repository_tag);
        self.client
            .auth(&reference, &self.auth, RegistryOperation::Push)
            .await
            .expect("authenticating the push");
        self.client
            .push_manifest_raw(
                &reference,
                body.to_vec(),
                http::HeaderValue::from_str(media_type).unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("pushing manifest {repository_tag}: {e}"));
    }
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn pulls_with_pull_secrets_and_follows_the_pull_policy() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images.clone()).await;
    let mut registry = TestRegistry::start();
    let outcome = AssertUnwindSafe(async {
        let runtime = &fixture.runtime;
        let host = registry.host();
        // weir.local/busybox:latest's manifest, config and layer, pushed as test/busybox:v1;
        // a second manifest (the same plus an annotation, so another digest) for tag moves
        // and for an index whose first entry is another platform's.
        let pusher = Pusher::new(&registry, None).await;
        let (manifest_digest, manifest) = pusher.busybox(&images).await;
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let mut other: serde_json::Value = parsed.clone();
        other["annotations"] = serde_json::json!({"org.weir.test": "another build"});
        let other = serde_json::to_vec(&other).unwrap();
        let other_digest = digest_of(&other);
        pusher
            .manifest(&format!("test/busybox@{other_digest}"), OCI_MANIFEST, &other)
            .await;
        let (host_arch, foreign_arch) = architectures();
        let multi = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": other_digest, "size": other.len(),
                 "platform": {"os": "linux", "architecture": foreign_arch}},
                {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
                 "platform": {"os": "linux", "architecture": host_arch}},
            ],
        });
        pusher
            .manifest("test/busybox:multi", OCI_INDEX, &serde_json::to_vec(&multi).unwrap())
            .await;

        let v1 = format!("{host}/test/busybox:v1");
        assert_eq!(PullPolicy::default_for(&v1), PullPolicy::IfNotPresent);

        // No credentials: the registry says unauthorized, and the error says none were sent.
        let err = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RegistryUnauthorized { .. }), "{err}");
        eprintln!("without credentials: {err}");
        let text = err.to_string();
        assert!(text.contains(&host) && text.contains("no credentials"), "{text}");

        // A wrong password: unauthorized, naming the secret tried.
        let wrong = registry.pull_secret("wrong", "not-the-password");
        let credentials = registry_credentials(&v1, &[wrong]).expect("the secret matches the registry");
        let err = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RegistryUnauthorized { .. }), "{err}");
        assert!(err.to_string().contains("secret default/wrong"), "{err}");
        eprintln!("with a wrong password: {err}");

        // The right secret: pulled, unpacked, and a container runs from it.
        let secret = registry.pull_secret("regcred", &registry.password);
        let credentials = registry_credentials(&v1, std::slice::from_ref(&secret)).unwrap();
        let started = Instant::now();
        let image = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap_or_else(|e| panic!("pulling {v1}: {e}\nregistry log:\n{}", registry.log()));
        eprintln!("pulled {v1} (1 MiB layer) in {:?}", started.elapsed());
        assert_eq!(image.name, v1);
        assert_eq!(image.digest, manifest_digest);
        assert_eq!(image.defaults.cmd, ["sh"]);
        assert!(runtime.list_images().await.unwrap().contains(&v1));
        let config = fixture.config(&v1, &["echo", "hello"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("hello"), "{log}");

        // Five pods starting at once with a new tag: one pull, the others wait for it and
        // find the image present (the registry serves the tag's manifest once).
        pusher.manifest("test/busybox:v2", OCI_MANIFEST, &manifest).await;
        let v2 = format!("{host}/test/busybox:v2");
        let pulls = (0..5).map(|_| runtime.ensure_image_with(&v2, PullPolicy::IfNotPresent, Some(&credentials)));
        for pulled in futures::future::join_all(pulls).await {
            assert_eq!(pulled.unwrap().digest, manifest_digest);
        }
        let served = registry
            .log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/test/busybox/manifests/v2 HTTP/1.1\" 200"))
            .count();
        assert_eq!(served, 1, "manifest requests for v2:\n{}", registry.log());

        // Not in the registry: not found, naming the reference.
        let missing = format!("{host}/test/busybox:nope");
        let err = runtime
            .ensure_image_with(&missing, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ImageNotFound { .. }), "{err}");
        eprintln!("absent from the registry: {err}");
        assert!(err.to_string().contains(&missing), "{err}");

        // Never: an absent image is ErrImageNeverPull without asking the registry; a present
        // one is used.
        let err = runtime
            .ensure_image_with(&missing, PullPolicy::Never, Some(&credentials))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NeverPull { .. }), "{err}");
        eprintln!("policy Never: {err}");
        assert_eq!(err.image_failure_reason(), Some("ErrImageNeverPull"));
        let present = runtime.ensure_image_with(&v1, PullPolicy::Never, None).await.unwrap();
        assert_eq!(present.digest, manifest_digest);

        // An index: the manifest for this machine's platform, though another comes first.
        let multi_ref = format!("{host}/test/busybox:multi");
        let image = runtime
            .ensure_image_with(&multi_ref, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap();
        assert_eq!(image.digest, manifest_digest, "linux/{host_arch} was chosen");

        // The tag moves: IfNotPresent keeps the image on the node, Always pulls again.
        pusher.manifest("test/busybox:v1", OCI_MANIFEST, &other).await;
        let kept = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap();
        assert_eq!(kept.digest, manifest_digest);
        let repulled = runtime
            .ensure_image_with(&v1, PullPolicy::Always, Some(&credentials))
            .await
            .unwrap();
        assert_eq!(repulled.digest, other_digest, "Always pulled the moved tag");

        // weir.local images are never pulled, whatever the policy.
        let err = runtime
            .ensure_image_with(BUSYBOX, PullPolicy::Always, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ImageNotPresent { .. }), "{err}");

        // The registry gone: Always fails (as kubelet's does), IfNotPresent uses the image.
        registry.kill();
        let err = runtime
            .ensure_image_with(&v1, PullPolicy::Always, Some(&credentials))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RegistryUnreachable { .. }), "{err}");
        eprintln!("registry killed: {err}");
        assert!(err.to_string().contains(&host), "{err}");
        let image = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap();
        assert_eq!(image.digest, other_digest);
    })
    .catch_unwind()
    .await;
    if outcome.is_err() {
        eprintln!("registry log:\n{}", registry.log());
    }
    drop(registry);
    fixture.finish(outcome).await;
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn import_directory_imports_every_archive_and_reports_bad_ones() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images.clone()).await;
    let dir = tempfile::Builder::new()
        .prefix("weir-images-")
        .tempdir_in("/tmp")
        .unwrap();
    let outcome = AssertUnwindSafe(async {
        std::fs::copy(images.join("echo.tar"), dir.path().join("echo.tar")).unwrap();
        // A gzipped archive, a corrupt one, and a file that is not an archive at all.
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(dir.path().join("busybox.tgz")).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&std::fs::read(images.join("busybox.tar")).unwrap())
            .unwrap();
        gz.finish().unwrap();
        std::fs::write(dir.path().join("corrupt.tar"), b"this is not a tar archive").unwrap();
        std::fs::write(dir.path().join("README.txt"), b"images for air-gapped nodes").unwrap();

        let report = import_directory(&fixture.runtime, dir.path()).await.unwrap();
        let mut names = report.images();
        names.sort();
        assert_eq!(names, [BUSYBOX, ECHO]);
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        let (path, err) = &report.failed[0];
        assert_eq!(path, &dir.path().join("corrupt.tar"));
        assert!(
            err.to_string().contains("corrupt.tar"),
            "the error names the file: {err}"
        );
        eprintln!("corrupt archive: {err}");
        assert_eq!(fixture.runtime.list_images().await.unwrap(), [BUSYBOX, ECHO]);
        let config = fixture.config(ECHO, &["echo", "imported"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("imported"), "{log}");

        // A missing directory imports nothing.
        let none = import_directory(&fixture.runtime, &dir.path().join("absent"))
            .await
            .unwrap();
        assert!(none.imported.is_empty() && none.failed.is_empty());
    })
    .catch_unwind()
    .await;
    drop(dir);
    fixture.finish(outcome).await;
}

/// A read-only registry with token auth, as Docker Hub and most hosted registries do it:
/// `/v2/` answers 401 with a Bearer challenge naming `/token`; `/token` hands out a token
/// for the right Basic credentials; manifests and blobs need `Authorization: Bearer`.
/// Written here because Debian's registry needs a separate token server for this.
#[derive(Clone)]
struct TokenRegistry {
    user: String,
    password: String,
    token: String,
    realm: String,
    /// Manifests by tag and by digest: (media type, bytes).
    manifests: std::sync::Arc<HashMap<String, (String, Vec<u8>)>>,
    blobs: std::sync::Arc<HashMap<String, Vec<u8>>>,
    /// The scopes asked for at `/token`.
    scopes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenRegistry {
    fn has_token(&self, headers: &axum::http::HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(format!("Bearer {}", self.token).as_str())
    }

    fn challenge(&self) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        (
            axum::http::StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                format!(r#"Bearer realm="{}",service="weir-test""#, self.realm),
            )],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        )
            .into_response()
    }
}

async fn token_ping(
    axum::extract::State(registry): axum::extract::State<TokenRegistry>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if registry.has_token(&headers) {
        "{}".into_response()
    } else {
        registry.challenge()
    }
}

async fn token_issue(
    axum::extract::State(registry): axum::extract::State<TokenRegistry>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use base64::Engine as _;
    registry
        .scopes
        .lock()
        .unwrap()
        .push(query.get("scope").cloned().unwrap_or_default());
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", registry.user, registry.password))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str()) {
        axum::Json(serde_json::json!({"token": registry.token})).into_response()
    } else {
        (axum::http::StatusCode::UNAUTHORIZED, "bad credentials").into_response()
    }
}

async fn token_manifest(
    axum::extract::State(registry): axum::extract::State<TokenRegistry>,
    axum::extract::Path(reference): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !registry.has_token(&headers) {
        return registry.challenge();
    }
    match registry.manifests.get(&reference) {
        Some((media_type, body)) => (
            [
                ("content-type", media_type.clone()),
                ("docker-content-digest", digest_of(body)),
            ],
            body.clone(),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
            .into_response(),
    }
}

async fn token_blob(
    axum::extract::State(registry): axum::extract::State<TokenRegistry>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !registry.has_token(&headers) {
        return registry.challenge();
    }
    match registry.blobs.get(&digest) {
        Some(body) => ([("docker-content-digest", digest.clone())], body.clone()).into_response(),
        None => (axum::http::StatusCode::NOT_FOUND, "").into_response(),
    }
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn pulls_with_bearer_token_auth() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images.clone()).await;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let members = read_archive(&images.join("busybox.tar"));
    let index: serde_json::Value = serde_json::from_slice(&members["index.json"]).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest = blob(&members, &manifest_digest).to_vec();
    let blobs: HashMap<String, Vec<u8>> = members
        .iter()
        .filter_map(|(path, data)| {
            let hex = path.strip_prefix("blobs/sha256/")?;
            Some((format!("sha256:{hex}"), data.clone()))
        })
        .collect();
    let registry = TokenRegistry {
        user: "robot".into(),
        password: unique("token-pw"),
        token: unique("token"),
        realm: format!("http://{host}/token"),
        manifests: std::sync::Arc::new(HashMap::from([
            ("v1".to_string(), (OCI_MANIFEST.to_string(), manifest.clone())),
            (manifest_digest.clone(), (OCI_MANIFEST.to_string(), manifest.clone())),
        ])),
        blobs: std::sync::Arc::new(blobs),
        scopes: Default::default(),
    };
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(token_ping))
        .route("/token", axum::routing::get(token_issue))
        .route(
            "/v2/test/busybox/manifests/{reference}",
            axum::routing::get(token_manifest),
        )
        .route("/v2/test/busybox/blobs/{digest}", axum::routing::get(token_blob))
        .with_state(registry.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let outcome = AssertUnwindSafe(async {
        let runtime = &fixture.runtime;
        let v1 = format!("{host}/test/busybox:v1");
        let secret = |name: &str, password: &str| {
            use base64::Engine as _;
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("robot:{password}"));
            let config = serde_json::json!({"auths": {format!("http://{host}/v2/"): {"auth": auth}}});
            Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(BTreeMap::from([(
                    ".dockerconfigjson".to_string(),
                    ByteString(config.to_string().into_bytes()),
                )])),
                ..Default::default()
            }
        };

        // The token server refuses a wrong password: the pull is unauthorized.
        let wrong = registry_credentials(&v1, &[secret("wrong", "nope")]).unwrap();
        let err = runtime
            .ensure_image_with(&v1, PullPolicy::Always, Some(&wrong))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RegistryUnauthorized { .. }), "{err}");
        assert!(err.to_string().contains("secret default/wrong"), "{err}");

        // The right password: a token for pulling test/busybox, then the image.
        let right = registry_credentials(&v1, &[secret("robot", &registry.password)]).unwrap();
        let image = runtime
            .ensure_image_with(&v1, PullPolicy::Always, Some(&right))
            .await
            .unwrap_or_else(|e| panic!("pulling {v1} with token auth: {e}"));
        assert_eq!(image.digest, manifest_digest);
        assert!(
            registry
                .scopes
                .lock()
                .unwrap()
                .iter()
                .any(|s| s == "repository:test/busybox:pull"),
            "{:?}",
            registry.scopes
        );
        let config = fixture.config(&v1, &["echo", "token"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("token"), "{log}");
    })
    .catch_unwind()
    .await;
    server.abort();
    fixture.finish(outcome).await;
}

/// A CA and a server certificate for `ip` signed by it: (CA PEM, certificate PEM, key PEM).
fn tls_for(ip: Ipv4Addr) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weir test registry CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "weir test registry");
    params.subject_alt_names = vec![SanType::IpAddress(ip.into())];
    let certificate = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), certificate.pem(), key.serialize_pem())
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn pulls_over_https_trusting_the_configured_ca() {
    let Some(images) = images() else { return };
    let fixture = Fixture::new(images.clone()).await;
    // Not on loopback (which is plain HTTP by design): in a namespace of the test's own.
    let netns = Netns::new();
    let (ca, certificate, key) = tls_for(netns.ns_ip);
    let registry = TestRegistry::start_at(
        SocketAddrV4::new(netns.ns_ip, 5000),
        Some(&netns.name),
        Some((&certificate, &key)),
    );
    let ca_path = registry.dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let outcome = AssertUnwindSafe(async {
        let pusher = Pusher::new(&registry, Some(&ca)).await;
        let (manifest_digest, _) = pusher.busybox(&images).await;
        let v1 = format!("{}/test/busybox:v1", registry.host());
        let secret = registry.pull_secret("regcred", &registry.password);
        let credentials = registry_credentials(&v1, &[secret]).unwrap();

        // HTTPS by default, and the system does not trust the test's CA.
        let err = fixture
            .runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RegistryUnreachable { .. }), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        eprintln!("untrusted CA: {err}");

        // With the CA configured: pulled over HTTPS, and it runs.
        let runtime = fixture.runtime.clone().with_registry_config(RegistryConfig {
            ca_certificates: vec![ca_path.clone()],
            ..Default::default()
        });
        let image = runtime
            .ensure_image_with(&v1, PullPolicy::IfNotPresent, Some(&credentials))
            .await
            .unwrap_or_else(|e| panic!("pulling {v1} over HTTPS: {e}\nregistry log:\n{}", registry.log()));
        assert_eq!(image.digest, manifest_digest);
        let config = fixture.config(&v1, &["echo", "over https"]);
        let (code, log) = fixture.run(&config).await;
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("over https"), "{log}");
    })
    .catch_unwind()
    .await;
    drop(registry);
    drop(netns);
    fixture.finish(outcome).await;
}
