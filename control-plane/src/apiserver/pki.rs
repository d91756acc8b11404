//! The cluster's certificates and credentials: a CA made on first start, the serving
//! certificate, the admin client certificate and bearer token, the service account signing
//! key (`sa.key`, ECDSA P-256), and the admin kubeconfig.
//! Everything lives under `<data-dir>/pki` and is reused on restart.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub admin_token: String,
    /// The API server's client certificate for the nodes' streaming servers (logs, exec,
    /// port-forward): CN `kube-apiserver-kubelet-client`, O `system:masters`, as kubeadm's.
    pub kubelet_client_cert_pem: String,
    /// Its key.
    pub kubelet_client_key_pem: String,
    /// The secret part of the node join token (`<data-dir>/node-token` holds the whole token).
    pub node_secret: String,
    /// PKCS#8 PEM of the key that signs service account tokens (`pki/sa.key`).
    pub service_account_key_pem: String,
    ca_key_pem: String,
    pub dir: PathBuf,
}

const VALIDITY_DAYS: i64 = 3650;
/// The user the API server's kubelet client certificate names.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

impl Pki {
    /// Load the PKI from `data_dir/pki`, creating whatever is missing.
    pub fn load_or_create(data_dir: &Path, tls_sans: &[String]) -> Result<Pki> {
        let dir = data_dir.join("pki");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict(&dir, 0o700)?;

        let (ca_pem, ca_key_pem) = match (read(&dir.join("ca.crt")), read(&dir.join("ca.key"))) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                params.distinguished_name.push(DnType::CommonName, "weir-ca");
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                validity(&mut params);
                let cert = params.self_signed(&key)?;
                write(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
                write(&dir.join("ca.crt"), &cert.pem(), 0o644)?;
                (cert.pem(), key.serialize_pem())
            }
        };
        let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing pki/ca.key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing pki/ca.crt")?;

        // The server certificate names every address clients may use: the defaults, the
        // machine's default-route address and the --tls-san values. When that list changes
        // (a new flag, a new address) the certificate is issued again.
        let mut names = vec![
            "localhost".to_string(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ];
        if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(host.trim().to_string());
        }
        let mut ips: Vec<std::net::IpAddr> = ["127.0.0.1", "::1", "10.96.0.1"]
            .iter()
            .map(|ip| ip.parse().expect("a literal address"))
            .collect();
        ips.extend(default_route_address());
        for san in tls_sans {
            match san.parse::<std::net::IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => names.push(san.clone()),
            }
        }
        names.sort();
        names.dedup();
        ips.sort();
        ips.dedup();
        let fingerprint = format!("{names:?} {ips:?}");
        let sans_path = dir.join("apiserver.sans");
        if read(&sans_path).as_deref() != Some(fingerprint.as_str()) {
            let _ = fs::remove_file(dir.join("apiserver.crt"));
            let _ = fs::remove_file(dir.join("apiserver.key"));
        }
        let (server_cert_pem, server_key_pem) = leaf(&dir, "apiserver", &issuer, |params| {
            params.distinguished_name.push(DnType::CommonName, "weir-apiserver");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.subject_alt_names = names
                .into_iter()
                .filter_map(|n| n.try_into().ok().map(SanType::DnsName))
                .chain(ips.into_iter().map(SanType::IpAddress))
                .collect();
        })?;
        write(&sans_path, &fingerprint, 0o644)?;
        let (admin_cert_pem, admin_key_pem) = leaf(&dir, "admin", &issuer, |params| {
            params.distinguished_name.push(DnType::CommonName, "admin");
            params
                .distinguished_name
                .push(DnType::OrganizationName, "system:masters");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })?;

        let sa_path = dir.join("sa.key");
        let service_account_key_pem = match read(&sa_path) {
            Some(k) => k,
            None => {
                let key = KeyPair::generate()?.serialize_pem();
                write(&sa_path, &key, 0o600)?;
                key
            }
        };
        let (kubelet_client_cert_pem, kubelet_client_key_pem) =
            leaf(&dir, "apiserver-kubelet-client", &issuer, |params| {
                params.distinguished_name.push(DnType::CommonName, KUBELET_CLIENT_USER);
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, "system:masters");
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            })?;

        let token_path = data_dir.join("admin.token");
        let admin_token = match read(&token_path) {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let bytes: [u8; 32] = rand::random();
                let token = bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
                write(&token_path, &format!("{token}\n"), 0o600)?;
                token
            }
        };
        let mut pki = Pki {
            ca_pem,
            server_cert_pem,
            server_key_pem,
            admin_cert_pem,
            admin_key_pem,
            admin_token,
            kubelet_client_cert_pem,
            kubelet_client_key_pem,
            node_secret: String::new(),
            service_account_key_pem,
            ca_key_pem,
            dir,
        };
        let token_path = data_dir.join("node-token");
        pki.node_secret = match read(&token_path)
            .as_deref()
            .and_then(|t| t.trim().split_once("::node:"))
        {
            Some((hash, secret)) if hash == pki.join_token_prefix() && !secret.is_empty() => secret.to_string(),
            _ => {
                let bytes: [u8; 24] = rand::random();
                let secret = bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
                write(
                    &token_path,
                    &format!("{}::node:{secret}\n", pki.join_token_prefix()),
                    0o600,
                )?;
                secret
            }
        };
        Ok(pki)
    }

    /// SHA-256 of the CA certificate (DER), as join tokens pin it.
    pub fn ca_hash(&self) -> String {
        use sha2::Digest;
        let der = rustls_pemfile::certs(&mut self.ca_pem.as_bytes())
            .next()
            .and_then(|c| c.ok());
        let digest = sha2::Sha256::digest(der.as_deref().unwrap_or_default());
        format!(
            "sha256:{}",
            digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    /// `K10<hex SHA-256 of the CA certificate>`: the part of a join token that lets a joining
    /// node check it talks to this cluster before it sends the secret (k3s' format).
    pub fn join_token_prefix(&self) -> String {
        format!("K10{}", self.ca_hash().trim_start_matches("sha256:"))
    }

    /// The whole join token, `K10<CA hash>::node:<secret>`, as `<data-dir>/node-token` holds it.
    pub fn join_token(&self) -> String {
        format!("{}::node:{}", self.join_token_prefix(), self.node_secret)
    }

    /// A client certificate and key for the node `name`: CN `system:node:<name>`, O
    /// `system:nodes`, as kubelets' client certificates are, signed by the cluster CA.
    pub fn issue_node_credentials(&self, name: &str) -> Result<(String, String)> {
        self.issue_node_certificate(name, |params| {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            Ok(())
        })
    }

    /// A serving certificate and key for the node `name`'s streaming server (kubelet's port):
    /// CN `system:node:<name>`, O `system:nodes`, the name and `addresses` as SANs, signed by
    /// the cluster CA; the API server checks it when it proxies logs, exec and port-forward.
    pub fn issue_node_serving_certificate(
        &self,
        name: &str,
        addresses: &[std::net::IpAddr],
    ) -> Result<(String, String)> {
        self.issue_node_certificate(name, |params| {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.subject_alt_names = std::iter::once(SanType::DnsName(
                name.try_into().with_context(|| format!("{name:?} as a DNS name"))?,
            ))
            .chain(addresses.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
            Ok(())
        })
    }

    /// A certificate of node `name` (CN `system:node:<name>`, O `system:nodes`) signed by the
    /// cluster CA, with what `configure` adds; its PEM and its key's.
    fn issue_node_certificate(
        &self,
        name: &str,
        configure: impl FnOnce(&mut CertificateParams) -> Result<()>,
    ) -> Result<(String, String)> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).context("parsing pki/ca.key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_pem, ca_key).context("parsing pki/ca.crt")?;
        let key_pair = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        validity(&mut params);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("system:node:{name}"));
        params.distinguished_name.push(DnType::OrganizationName, "system:nodes");
        configure(&mut params)?;
        let cert = params.signed_by(&key_pair, &issuer)?;
        Ok((cert.pem(), key_pair.serialize_pem()))
    }

    /// Write `<data-dir>/admin.kubeconfig` pointing at `server_url`.
    pub fn write_admin_kubeconfig(&self, path: &Path, server_url: &str) -> Result<()> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weir\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: weir\n  context:\n    cluster: weir\n    user: admin\n    namespace: default\ncurrent-context: weir\n",
            b64(&self.ca_pem),
            b64(&self.admin_cert_pem),
            b64(&self.admin_key_pem),
        );
        // Write then rename, so a reader never sees a half-written kubeconfig.
        let tmp = path.with_extension("kubeconfig.tmp");
        write(&tmp, &config, 0o600)?;
        fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    configure: impl FnOnce(&mut CertificateParams),
) -> Result<(String, String)> {
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    if let (Some(c), Some(k)) = (read(&crt), read(&key)) {
        return Ok((c, k));
    }
    let key_pair = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    validity(&mut params);
    configure(&mut params);
    let cert = params.signed_by(&key_pair, issuer)?;
    write(&key, &key_pair.serialize_pem(), 0o600)?;
    write(&crt, &cert.pem(), 0o644)?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

fn validity(params: &mut CertificateParams) {
    let start = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let end = start + std::time::Duration::from_secs(VALIDITY_DAYS as u64 * 86400);
    params.not_before = start.into();
    params.not_after = end.into();
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    restrict(path, mode)
}

fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))
}

/// The source address of the IPv4 default route (a UDP socket "connected" to a TEST-NET
/// address: no packet is sent); `None` without one.
fn default_route_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    socket.connect(("192.0.2.1", 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}
