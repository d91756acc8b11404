//! Joining a cluster with a token, as k3s agents do: `K10<SHA-256 of the cluster CA>::node:<secret>`
//! (the server's `<data-dir>/node-token`). The agent fetches the CA over an unverified
//! connection, refuses it unless its hash is the token's (so the secret never goes to a
//! server that is not the cluster's), then, trusting that CA, trades the secret for a
//! client certificate of its own, and a serving certificate for its streaming server. The
//! result is a kubeconfig and `serving.crt`/`serving.key` the agent keeps and reuses.

use std::path::Path;

use base64::Engine as _;
use sha2::Digest as _;

/// Where the server serves its CA, and where nodes join (see the control plane's `join`).
const CA_CERTS_PATH: &str = "/cacerts";
const JOIN_PATH: &str = "/weir/v1/join";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "the token is not a Weir join token: expected K10<64 hex digits>::node:<secret>, as the server's \
         <data-dir>/node-token holds it"
    )]
    BadToken,
    #[error("--server {0:?} is not an https:// URL")]
    BadServer(String),
    #[error("fetching the cluster CA from {url}: {source}")]
    FetchCa {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("{url}{CA_CERTS_PATH} did not return exactly one PEM certificate")]
    NoCa { url: String },
    #[error(
        "the server's CA (sha256:{got}) is not the one the token names (sha256:{expected}): wrong token or \
         wrong server (or someone in between); nothing was sent"
    )]
    CaMismatch { expected: String, got: String },
    #[error("the server refused the join token ({0}): use the token in the server's <data-dir>/node-token")]
    Refused(String),
    #[error("joining through {url}: {source}")]
    Join {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("the join answer lacks {0}")]
    Incomplete(&'static str),
    #[error("building a client from the joined credentials: {0}")]
    Client(String),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Lowercase hex SHA-256 of the CA certificate (DER).
    pub ca_hash: String,
    pub secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("ca_hash", &self.ca_hash)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::str::FromStr for Token {
    type Err = JoinError;

    fn from_str(s: &str) -> Result<Token, JoinError> {
        let (prefix, secret) = s.trim().split_once("::node:").ok_or(JoinError::BadToken)?;
        let hash = prefix.strip_prefix("K10").ok_or(JoinError::BadToken)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
            return Err(JoinError::BadToken);
        }
        Ok(Token {
            ca_hash: hash.to_ascii_lowercase(),
            secret: secret.to_owned(),
        })
    }
}

/// The credentials a join gives: PEM texts.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_cert: String,
    pub client_cert: String,
    pub client_key: String,
    /// The serving certificate of the node's streaming server (kubelet's port), its name and
    /// the addresses it joined with as SANs.
    pub serving_cert: String,
    /// Its key.
    pub serving_key: String,
}

impl Credentials {
    /// A kubeconfig for `server` with these credentials.
    pub fn kubeconfig(&self, server: &str, node_name: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weir\n  cluster:\n    server: {server}\n    \
             certificate-authority-data: {}\nusers:\n- name: system:node:{node_name}\n  user:\n    \
             client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: weir\n  context:\n    \
             cluster: weir\n    user: system:node:{node_name}\ncurrent-context: weir\n",
            b64(&self.ca_cert),
            b64(&self.client_cert),
            b64(&self.client_key),
        )
    }

    /// Writes [`Credentials::kubeconfig`] to `path` (mode 0600, atomically).
    pub fn write_kubeconfig(&self, path: &Path, server: &str, node_name: &str) -> Result<(), JoinError> {
        write_private(path, &self.kubeconfig(server, node_name))
    }

    /// Writes the serving certificate and key next to the kubeconfig: `<dir>/serving.crt` and
    /// `<dir>/serving.key` (mode 0600). Returns their paths.
    pub fn write_serving_certificate(&self, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), JoinError> {
        let cert = dir.join("serving.crt");
        let key = dir.join("serving.key");
        write_private(&cert, &self.serving_cert)?;
        write_private(&key, &self.serving_key)?;
        Ok((cert, key))
    }

    /// The TLS material of the node's streaming server.
    pub fn server_tls(&self) -> crate::stream::ServerTls {
        crate::stream::ServerTls {
            ca_pem: self.ca_cert.clone(),
            cert_pem: self.serving_cert.clone(),
            key_pem: self.serving_key.clone(),
        }
    }
}

/// Writes `contents` to `path` with mode 0600, atomically (write then rename).
fn write_private(path: &Path, contents: &str) -> Result<(), JoinError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let write_err = |source| JoinError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// The lowercase hex SHA-256 of the first certificate in `pem` (DER).
pub fn ca_hash(pem: &str) -> Option<String> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    Some(sha2::Sha256::digest(&der).iter().map(|b| format!("{b:02x}")).collect())
}

/// Joins the cluster at `server` as `node_name` with `token`; the serving certificate names
/// only the node name (see [`join_with_addresses`]).
pub async fn join(server: &str, token: &Token, node_name: &str) -> Result<Credentials, JoinError> {
    join_with_addresses(server, token, node_name, &[]).await
}

/// Joins the cluster at `server` as `node_name` with `token`; the node's serving certificate
/// has `addresses` (the IPs the API server reaches it at) as SANs.
pub async fn join_with_addresses(
    server: &str,
    token: &Token,
    node_name: &str,
    addresses: &[std::net::IpAddr],
) -> Result<Credentials, JoinError> {
    let url: http::Uri = server
        .parse()
        .ok()
        .filter(|u: &http::Uri| u.scheme_str() == Some("https"))
        .ok_or_else(|| JoinError::BadServer(server.to_owned()))?;

    // 1. The CA, unverified: only its hash makes it trusted.
    let mut insecure = kube::Config::new(url.clone());
    insecure.accept_invalid_certs = true;
    let client = kube::Client::try_from(insecure).map_err(|e| JoinError::Client(e.to_string()))?;
    let request = http::Request::get(CA_CERTS_PATH)
        .body(Vec::new())
        .expect("a static request");
    let ca_pem = client
        .request_text(request)
        .await
        .map_err(|source| JoinError::FetchCa {
            url: server.to_owned(),
            source,
        })?;
    // Exactly one certificate: with more, one could be the real (public) CA and another
    // an impostor's, which would then be trusted too.
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|_| JoinError::NoCa { url: server.to_owned() })?;
    let [der] = certs.as_slice() else {
        return Err(JoinError::NoCa { url: server.to_owned() });
    };
    let got: String = sha2::Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect();
    if got != token.ca_hash {
        return Err(JoinError::CaMismatch {
            expected: token.ca_hash.clone(),
            got,
        });
    }

    // 2. The secret, to the server that proved to hold that CA (and only that CA is trusted).
    let mut trusted = kube::Config::new(url);
    trusted.root_cert = Some(vec![der.clone()]);
    trusted.auth_info.token = Some(token.secret.clone().into());
    let client = kube::Client::try_from(trusted).map_err(|e| JoinError::Client(e.to_string()))?;
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    let body = serde_json::to_vec(&serde_json::json!({"nodeName": node_name, "addresses": addresses})).expect("JSON");
    let request = http::Request::post(JOIN_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a static request");
    let answer: serde_json::Value = match client.request(request).await {
        Ok(answer) => answer,
        Err(kube::Error::Api(status)) if status.code == 401 => return Err(JoinError::Refused(status.message)),
        Err(source) => {
            return Err(JoinError::Join {
                url: server.to_owned(),
                source,
            });
        }
    };
    let field = |name: &'static str| {
        answer
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or(JoinError::Incomplete(name))
    };
    Ok(Credentials {
        ca_cert: field("caCert")?,
        client_cert: field("clientCert")?,
        client_key: field("clientKey")?,
        serving_cert: field("servingCertificate")?,
        serving_key: field("servingKey")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_bad_ones_say_what_a_token_looks_like() {
        let hash = "ab".repeat(32);
        let token: Token = format!("K10{hash}::node:s3cret\n").parse().unwrap();
        assert_eq!(token.ca_hash, hash);
        assert_eq!(token.secret, "s3cret");
        assert!(!format!("{token:?}").contains("s3cret"), "the secret is not logged");
        for bad in [
            "".to_owned(),
            "s3cret".to_owned(),
            format!("K10{hash}::node:"),
            format!("K10{}::node:x", "ab".repeat(31)),
            format!("K11{hash}::node:x"),
            format!("K10{}::node:x", "zz".repeat(32)),
        ] {
            let err = bad.parse::<Token>().unwrap_err();
            assert!(err.to_string().contains("K10<64 hex digits>"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_kubeconfig_names_the_node_user() {
        let credentials = Credentials {
            ca_cert: "CA".into(),
            client_cert: "CERT".into(),
            client_key: "KEY".into(),
            serving_cert: "SERVING".into(),
            serving_key: "SERVING KEY".into(),
        };
        let config = credentials.kubeconfig("https://10.0.0.1:6443", "node-a");
        assert!(config.contains("server: https://10.0.0.1:6443"));
        assert!(config.contains("user: system:node:node-a"));
        assert!(config.contains("certificate-authority-data: Q0E="));
    }
}
