//! Registry credentials from a pod's imagePullSecrets, found the way kubelet's keyring
//! finds them: `kubernetes.io/dockerconfigjson` secrets (`.dockerconfigjson`, `{"auths":
//! {KEY: ENTRY}}`) and `kubernetes.io/dockercfg` secrets (`.dockercfg`, `{KEY: ENTRY}`);
//! an ENTRY has `username` and `password`, or `auth` = base64(`user:password`), which wins.
//!
//! A KEY is a registry host, optionally with a scheme (ignored), a port (must equal the
//! image's), `*` wildcards in host labels, and a path that must prefix the image's
//! repository path (`/v1/` and `/v2/` prefixes are dropped, as Docker does). The most
//! specific keys come first (kubelet sorts them in reverse order), then the secrets' order.
//! Images on Docker Hub (`docker.io/...`) also match keys for `index.docker.io`
//! (`https://index.docker.io/v1/`, what `docker login` writes).

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use tracing::warn;

use super::normalize_reference;

const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
const DOCKERCFG_TYPE: &str = "kubernetes.io/dockercfg";
const DOCKERCFG_KEY: &str = ".dockercfg";
/// Where Docker Hub's credentials are kept (`https://index.docker.io/v1/` after normalising).
const DOCKER_HUB_KEY: &str = "index.docker.io";

/// A user and password for a registry, and where they came from (for error messages).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
    /// Where these came from, e.g. `secret default/regcred (entry 127.0.0.1:5000)`.
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

/// A normalised keyring key: host (with port) and path prefix, as kubelet stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    host: String,
    path: String,
}

impl Key {
    /// kubelet's `BasicDockerKeyring.Add`: drop the scheme, drop a `/v1/` or `/v2/` path
    /// prefix, and a path of `/` means none.
    fn parse(key: &str) -> Option<Key> {
        let key = key.trim();
        let rest = key
            .strip_prefix("https://")
            .or_else(|| key.strip_prefix("http://"))
            .unwrap_or(key);
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return None;
        }
        let path = match path.strip_prefix("/v2/").or_else(|| path.strip_prefix("/v1/")) {
            Some(rest) => format!("/{rest}"),
            None => path.to_string(),
        };
        let path = if path == "/" { String::new() } else { path };
        Some(Key {
            host: host.to_string(),
            path,
        })
    }

    /// The key as kubelet's keyring index holds it: host then path.
    fn text(&self) -> String {
        format!("{}{}", self.host, self.path)
    }

    /// kubelet's `URLsMatch`: equal ports, as many host labels, each label matching its
    /// glob, and the key's path a prefix of the image's.
    fn matches(&self, host: &str, path: &str) -> bool {
        let (key_host, key_port) = split_port(&self.host);
        let (host, port) = split_port(host);
        if key_port != port {
            return false;
        }
        let key_labels: Vec<&str> = key_host.split('.').collect();
        let labels: Vec<&str> = host.split('.').collect();
        key_labels.len() == labels.len()
            && key_labels.iter().zip(&labels).all(|(k, l)| glob_matches(k, l))
            && path.starts_with(&self.path)
    }
}

/// `host:port` → (`host`, `port`); `[v6]:port` → (`[v6]`, `port`); no port → empty.
fn split_port(host: &str) -> (&str, &str) {
    if host.starts_with('[') {
        return match host.rfind("]:") {
            Some(i) => (&host[..=i], &host[i + 2..]),
            None => (host, ""),
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p),
        _ => (host, ""),
    }
}

/// One host label against one key label, with `*` (any run of characters) and `?` (one).
/// kubelet uses Go's `filepath.Match`, whose `[...]` classes keys do not use in practice;
/// this small matcher is written here rather than adding a glob crate whose syntax differs
/// from Go's anyway. Host names are compared case-insensitively.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let text: Vec<char> = text.to_ascii_lowercase().chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// The entries of one secret: (key as written, entry). Secrets of other types, or without
/// their data key, have none (as in kubelet); unparsable ones are logged and skipped.
fn secret_entries(secret: &Secret) -> Vec<(String, Entry)> {
    let name = secret_name(secret);
    let data_of = |key: &str| -> Option<Vec<u8>> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.as_bytes().to_vec())
            })
            .filter(|b| !b.is_empty())
    };
    let parsed = match secret.type_.as_deref() {
        Some(DOCKER_CONFIG_JSON_TYPE) => data_of(DOCKER_CONFIG_JSON_KEY)
            .map(|data| serde_json::from_slice::<DockerConfigJson>(&data).map(|c| c.auths)),
        Some(DOCKERCFG_TYPE) => {
            data_of(DOCKERCFG_KEY).map(|data| serde_json::from_slice::<BTreeMap<String, Entry>>(&data))
        }
        _ => None,
    };
    match parsed {
        None => Vec::new(),
        Some(Ok(auths)) => auths.into_iter().collect(),
        Some(Err(e)) => {
            warn!(secret = %name, error = %e, "imagePullSecret is not a valid Docker config; ignoring it");
            Vec::new()
        }
    }
}

fn secret_name(secret: &Secret) -> String {
    let meta = &secret.metadata;
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "(unnamed)".to_string(),
    }
}

/// An entry's user and password: `auth` (base64 of `user:password`) wins over the fields.
fn user_and_password(entry: &Entry) -> Option<(String, String)> {
    if !entry.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.auth.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())?;
        let (user, password) = decoded.split_once(':')?;
        return Some((user.to_string(), password.to_string()));
    }
    Some((entry.username.clone(), entry.password.clone()))
}

/// Every credential in `secrets` that applies to `reference`, best first (kubelet tries
/// them in this order until a pull succeeds).
pub fn matching_credentials(reference: &str, secrets: &[Secret]) -> Vec<Credentials> {
    let Ok(name) = normalize_reference(reference) else {
        return Vec::new();
    };
    // The repository without tag or digest, e.g. `127.0.0.1:5000/test/busybox`.
    let repository = name.split('@').next().unwrap_or(&name);
    let repository = match repository.rfind(':') {
        Some(i) if !repository[i..].contains('/') => &repository[..i],
        _ => repository,
    };
    let (host, path) = match repository.find('/') {
        Some(i) => (&repository[..i], &repository[i..]),
        None => (repository, ""),
    };
    // (key text, secret order, credentials)
    let mut all: Vec<(Key, usize, Credentials)> = Vec::new();
    for (order, secret) in secrets.iter().enumerate() {
        for (written, entry) in secret_entries(secret) {
            let Some(key) = Key::parse(&written) else { continue };
            let Some((username, password)) = user_and_password(&entry) else {
                warn!(
                    secret = %secret_name(secret),
                    entry = %written,
                    "imagePullSecret entry's auth is not base64 of user:password; ignoring it"
                );
                continue;
            };
            let source = format!("secret {} (entry {written})", secret_name(secret));
            all.push((
                key,
                order,
                Credentials {
                    username,
                    password,
                    source,
                },
            ));
        }
    }
    // kubelet's index is sorted in reverse: longer keys with a common prefix come first.
    all.sort_by(|a, b| b.0.text().cmp(&a.0.text()).then(a.1.cmp(&b.1)));
    let matched: Vec<Credentials> = all
        .iter()
        .filter(|(key, _, _)| key.matches(host, path))
        .map(|(_, _, c)| c.clone())
        .collect();
    if !matched.is_empty() {
        return matched;
    }
    if host == "docker.io" || host == DOCKER_HUB_KEY {
        return all
            .into_iter()
            .filter(|(key, _, _)| key.host == DOCKER_HUB_KEY && key.path.is_empty())
            .map(|(_, _, c)| c)
            .collect();
    }
    Vec::new()
}

/// The credentials for pulling `reference` from a pod's imagePullSecrets: the best match
/// of [`matching_credentials`], or `None` (pull anonymously).
pub fn registry_credentials(reference: &str, secrets: &[Secret]) -> Option<Credentials> {
    matching_credentials(reference, secrets).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, type_: &str, key: &str, data: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(data.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn json_secret(name: &str, auths: serde_json::Value) -> Secret {
        secret(
            name,
            DOCKER_CONFIG_JSON_TYPE,
            DOCKER_CONFIG_JSON_KEY,
            &serde_json::json!({ "auths": auths }).to_string(),
        )
    }

    fn user(reference: &str, secrets: &[Secret]) -> Option<String> {
        registry_credentials(reference, secrets).map(|c| c.username)
    }

    #[test]
    fn dockerconfigjson_with_fields_or_auth() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pa:ss");
        let s = json_secret(
            "regcred",
            serde_json::json!({
                "127.0.0.1:5000": {"username": "alice", "password": "secret"},
                "registry.example.com": {"auth": auth, "username": "ignored"},
            }),
        );
        let c = registry_credentials("127.0.0.1:5000/test/busybox:v1", std::slice::from_ref(&s)).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "secret"));
        assert_eq!(c.source, "secret default/regcred (entry 127.0.0.1:5000)");
        assert!(
            !format!("{c:?}").contains("secret\""),
            "the password is not printed: {c:?}"
        );
        let c = registry_credentials("registry.example.com/app@sha256:abcd", &[s]).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("bob", "pa:ss"));
    }

    #[test]
    fn dockercfg_secrets_and_types_are_checked() {
        let cfg = secret(
            "old",
            DOCKERCFG_TYPE,
            DOCKERCFG_KEY,
            r#"{"https://quay.io": {"username": "q", "password": "p"}}"#,
        );
        assert_eq!(
            user("quay.io/org/app:1", std::slice::from_ref(&cfg)).as_deref(),
            Some("q")
        );
        // The right data under the wrong type is ignored, as kubelet does.
        let mistyped = secret(
            "opaque",
            "Opaque",
            DOCKER_CONFIG_JSON_KEY,
            r#"{"auths": {"quay.io": {"username": "x", "password": "y"}}}"#,
        );
        assert_eq!(user("quay.io/org/app:1", &[mistyped]), None);
        let broken = secret("broken", DOCKER_CONFIG_JSON_TYPE, DOCKER_CONFIG_JSON_KEY, "{not json");
        assert_eq!(user("quay.io/org/app:1", &[broken, cfg]).as_deref(), Some("q"));
    }

    #[test]
    fn hosts_match_like_kubelet() {
        let s = json_secret(
            "s",
            serde_json::json!({
                "https://index.docker.io/v1/": {"username": "hub", "password": "p"},
                "http://registry.example.com:5000/v2/": {"username": "port", "password": "p"},
                "registry.example.com/team": {"username": "team", "password": "p"},
                "registry.example.com": {"username": "host", "password": "p"},
                "*.corp.example": {"username": "wild", "password": "p"},
            }),
        );
        let s = std::slice::from_ref(&s);
        // Docker Hub: short names, docker.io and index.docker.io all use the v1 key.
        assert_eq!(user("busybox", s).as_deref(), Some("hub"));
        assert_eq!(user("docker.io/library/busybox:1.36", s).as_deref(), Some("hub"));
        assert_eq!(user("index.docker.io/user/app", s).as_deref(), Some("hub"));
        // The port must be equal; scheme and /v2/ are ignored.
        assert_eq!(user("registry.example.com:5000/app:1", s).as_deref(), Some("port"));
        assert_eq!(user("registry.example.com:5001/app:1", s), None);
        // The longest path prefix first.
        assert_eq!(user("registry.example.com/team/app:1", s).as_deref(), Some("team"));
        assert_eq!(user("registry.example.com/other/app:1", s).as_deref(), Some("host"));
        // A wildcard stands for one label only.
        assert_eq!(user("a.corp.example/app", s).as_deref(), Some("wild"));
        assert_eq!(user("a.b.corp.example/app", s), None);
        assert_eq!(user("corp.example/app", s), None);
        assert_eq!(user("quay.io/app", s), None);
        // Every match, best first.
        let all: Vec<String> = matching_credentials("registry.example.com/team/x", s)
            .into_iter()
            .map(|c| c.username)
            .collect();
        assert_eq!(all, ["team", "host"]);
    }

    #[test]
    fn earlier_secrets_win_on_equal_keys() {
        let a = json_secret("a", serde_json::json!({"quay.io": {"username": "a", "password": "p"}}));
        let b = json_secret(
            "b",
            serde_json::json!({"https://quay.io": {"username": "b", "password": "p"}}),
        );
        assert_eq!(user("quay.io/x", &[a.clone(), b.clone()]).as_deref(), Some("a"));
        assert_eq!(user("quay.io/x", &[b, a]).as_deref(), Some("b"));
    }

    #[test]
    fn globs_and_ports() {
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("reg*", "registry"));
        assert!(glob_matches("r?g", "REG"));
        assert!(!glob_matches("reg", "registry"));
        assert!(glob_matches("*try", "registry"));
        assert_eq!(split_port("host:5000"), ("host", "5000"));
        assert_eq!(split_port("[::1]:5000"), ("[::1]", "5000"));
        assert_eq!(split_port("[::1]"), ("[::1]", ""));
        assert_eq!(split_port("host"), ("host", ""));
    }
}
