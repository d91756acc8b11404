//! Privileged tests of the streaming server (logs, exec, `kubectl cp`'s tar, port-forward)
//! against a real containerd: a busybox container in a fresh network namespace, served by
//! [`StreamServer`] with a test [`PodDirectory`], driven over TLS with client certificates by
//! an HTTP client and a WebSocket client speaking Kubernetes' channel and SPDY protocols.
//!
//! Root only, one at a time (`cargo xtask test`: WEIR_IMAGES from `cargo xtask images`,
//! WEIR_BIN the `weir` binary, whose `log-driver` writes the containers' CRI logs). The
//! fixture (`common/containerd.rs`) cleans up containerd, containers, cgroups and the
//! namespace also when an assertion fails.

#[path = "common/containerd.rs"]
mod containerd;

use std::collections::HashMap;
use std::io::Read as _;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use containerd::{BUSYBOX, Fixture, Netns, images};
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use weir_agent::runtime::NetworkNamespace;
use weir_agent::stream::spdy::{self, Codec, FLAG_FIN, Frame};
use weir_agent::stream::{ContainerRuntimeInfo, PodDirectory, PodRuntimeInfo, ServerTls, StreamServer};

/// The pods the server sees; the test changes them as containers start and stop.
#[derive(Default)]
struct Pods(Mutex<HashMap<(String, String), PodRuntimeInfo>>);

impl PodDirectory for Pods {
    fn lookup(&self, namespace: &str, pod: &str) -> Option<PodRuntimeInfo> {
        self.0
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), pod.to_string()))
            .cloned()
    }
}

/// A cluster CA and the certificates the test needs, PEM.
struct Pki {
    ca: String,
    server: (String, String),
    /// CN kube-apiserver-kubelet-client, O system:masters.
    apiserver: (String, String),
    /// A node's client certificate: O system:nodes.
    node: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test-ca");
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let leaf = |cn: &str, o: &str, server: bool| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, o);
        if server {
            params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    Pki {
        server: leaf("system:node:test", "system:nodes", true),
        apiserver: leaf("kube-apiserver-kubelet-client", "system:masters", false),
        node: leaf("system:node:other", "system:nodes", false),
        ca: ca_pem,
    }
}

/// A TLS client of the streaming server, with `identity` as its certificate (or none).
fn tls_client(pki: &Pki, identity: Option<&(String, String)>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes()).unwrap().unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(addr: std::net::SocketAddr, tls: &tokio_rustls::TlsConnector) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tls.connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("TLS handshake with the streaming server")
}

/// One GET; the status and the body as it streams (a channel of chunks).
async fn get(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    path: &str,
) -> (u16, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let stream = connect(addr, tls).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let code = response.status().as_u16();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut body = response.into_body();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && tx.send(data.to_vec()).await.is_err()
            {
                return;
            }
        }
    });
    (code, rx)
}

/// One GET, the whole body as text.
async fn get_text(addr: std::net::SocketAddr, tls: &tokio_rustls::TlsConnector, path: &str) -> (u16, String) {
    let (code, mut rx) = get(addr, tls, path).await;
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the response ends within 20 s")
    {
        body.extend_from_slice(&chunk);
    }
    (code, String::from_utf8_lossy(&body).into_owned())
}

type Ws = tokio_tungstenite::WebSocketStream<Tls>;

/// A WebSocket to `path` offering `protocol`.
async fn websocket(addr: std::net::SocketAddr, tls: &tokio_rustls::TlsConnector, path: &str, protocol: &str) -> Ws {
    let stream = connect(addr, tls).await;
    let mut request = format!("wss://{addr}{path}").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap_or_else(|e| panic!("WebSocket upgrade of {path}: {e}"));
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        protocol,
        "the server chose the subprotocol"
    );
    ws
}

/// What an exec produced.
#[derive(Debug, Default)]
struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: serde_json::Value,
}

/// Runs an exec over v5: sends `stdin` (then closes it) if given, collects the rest.
async fn exec(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    command: &[&str],
    stdin: Option<&[u8]>,
    tty: bool,
    before_stdin: Option<Vec<u8>>,
) -> ExecResult {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for c in command {
        query.append_pair("command", c);
    }
    query.append_pair("stdout", "true");
    query.append_pair("stderr", if tty { "false" } else { "true" });
    query.append_pair("stdin", if stdin.is_some() { "true" } else { "false" });
    query.append_pair("tty", if tty { "true" } else { "false" });
    let path = format!("/exec/default/web/main?{}", query.finish());
    let mut ws = websocket(addr, tls, &path, "v5.channel.k8s.io").await;
    if let Some(message) = before_stdin {
        ws.send(Message::Binary(message.into())).await.unwrap();
    }
    if let Some(data) = stdin {
        for chunk in data.chunks(10_000) {
            let mut m = vec![0u8];
            m.extend_from_slice(chunk);
            ws.send(Message::Binary(m.into())).await.unwrap();
        }
        ws.send(Message::Binary(vec![255u8, 0].into())).await.unwrap();
    }
    let mut result = ExecResult::default();
    let collect = async {
        while let Some(message) = ws.next().await {
            match message.expect("a WebSocket message") {
                Message::Binary(data) => match data.split_first() {
                    Some((1, rest)) => result.stdout.extend_from_slice(rest),
                    Some((2, rest)) => result.stderr.extend_from_slice(rest),
                    Some((3, rest)) => result.status = serde_json::from_slice(rest).expect("a Status"),
                    other => panic!("unexpected message {other:?}"),
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .unwrap_or_else(|_| panic!("exec {command:?} did not finish within 30 s"));
    result
}

/// A port-forward client: one connection to `port` through the SPDY-in-WebSocket tunnel,
/// sending `request` (then FIN); returns what came back on the data and error streams.
async fn port_forward(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    request: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let mut ws = websocket(
        addr,
        tls,
        &format!("/portForward/default/web?ports={port}"),
        "SPDY/3.1+portforward.k8s.io",
    )
    .await;
    let mut codec = Codec::new();
    let port_text = port.to_string();
    let headers = |kind: &'static str| [("streamType", kind), ("port", port_text.as_str()), ("requestID", "0")];
    // Frames split across messages, as client-go's tunnelling connection may send them.
    let mut wire = spdy::syn_stream(&mut codec, 1, 0, &headers("error"));
    wire.extend_from_slice(&spdy::syn_stream(&mut codec, 3, 0, &headers("data")));
    wire.extend_from_slice(&spdy::ping(1));
    for piece in wire.chunks(7) {
        ws.send(Message::Binary(piece.to_vec().into())).await.unwrap();
    }
    let (mut data, mut error) = (Vec::new(), Vec::new());
    let (mut data_done, mut error_done, mut replies, mut sent, mut pinged) = (false, false, 0, false, false);
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(data_done && error_done && pinged) {
        let message = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("the port-forward finishes within 20 s")
            .expect("the tunnel stays open")
            .unwrap();
        let Message::Binary(bytes) = message else { continue };
        buf.extend_from_slice(&bytes);
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            match frame {
                Frame::SynReply { .. } => replies += 1,
                Frame::Ping { id: 1 } => pinged = true,
                Frame::Data {
                    stream_id: 3,
                    flags,
                    data: d,
                } => {
                    data.extend_from_slice(&d);
                    data_done |= flags & FLAG_FIN != 0;
                }
                Frame::Data {
                    stream_id: 1,
                    flags,
                    data: d,
                } => {
                    error.extend_from_slice(&d);
                    error_done |= flags & FLAG_FIN != 0;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        if replies == 2 && !sent {
            sent = true;
            ws.send(Message::Binary(spdy::data(3, FLAG_FIN, request).into()))
                .await
                .unwrap();
        }
    }
    let _ = ws.close(None).await;
    (data, error)
}

fn weir_binary() -> PathBuf {
    let bin = std::env::var_os("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/weir"));
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p weir` or set WEIR_BIN (`cargo xtask test` does both)",
        bin.display()
    );
    bin
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn logs_exec_cp_and_port_forward_through_the_streaming_server() {
    let Some(images) = images() else { return };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fixture = Fixture::new(images).await;
    let netns = Netns::new();
    let outcome = AssertUnwindSafe(async {
        fixture.import("busybox.tar").await;
        let runtime = fixture.runtime.clone().with_logger(weir_binary());
        let pods = Arc::new(Pods::default());
        let pki = pki();
        let server = StreamServer::new(
            runtime.clone(),
            pods.clone(),
            &ServerTls {
                ca_pem: pki.ca.clone(),
                cert_pem: pki.server.0.clone(),
                key_pem: pki.server.1.clone(),
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(Arc::new(server).serve(listener));
        let admin = tls_client(&pki, Some(&pki.apiserver));

        // The previous run: it printed one line and exited.
        let mut previous = fixture.config(BUSYBOX, &["echo", "previous-run"]);
        previous.network = NetworkNamespace::Path(netns.path());
        runtime.create_container(&previous).await.unwrap();
        runtime.start_container(&previous.id).await.unwrap();
        runtime.wait_container(&previous.id).await.unwrap();
        runtime.delete_container(&previous.id).await.unwrap();

        // The current run: a web server on the pod's loopback, some output, then a line
        // after a pause (for sinceTime and follow), then it waits.
        let script = "mkdir -p /www && echo pf-ok > /www/index.html && httpd -p 127.0.0.1:8080 -h /www; \
                      echo one; echo two; echo three; sleep 1; echo oops >&2; sleep 1; echo four; exec sleep 3600";
        let mut current = fixture.config(BUSYBOX, &["sh", "-c", script]);
        current.network = NetworkNamespace::Path(netns.path());
        runtime.create_container(&current).await.unwrap();
        runtime.start_container(&current.id).await.unwrap();
        let info = |running: bool| PodRuntimeInfo {
            uid: "uid-1".into(),
            netns_path: Some(netns.path()),
            containers: vec![ContainerRuntimeInfo {
                name: "main".into(),
                container_id: Some(current.id.clone()),
                running,
                log_path: Some(current.log_path.clone()),
                previous_log_path: Some(previous.log_path.clone()),
            }],
            default_container: Some("main".into()),
        };
        pods.0
            .lock()
            .unwrap()
            .insert(("default".into(), "web".into()), info(true));

        // Who may connect.
        let (code, body) = get_text(addr, &tls_client(&pki, None), "/containerLogs/default/web/main").await;
        assert_eq!(code, 401, "{body}");
        let (code, body) = get_text(
            addr,
            &tls_client(&pki, Some(&pki.node)),
            "/containerLogs/default/web/main",
        )
        .await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("system:node:other"), "{body}");

        // A follower from the start, while the container still writes.
        let (code, mut follow) = get(addr, &admin, "/containerLogs/default/web/main?follow=true").await;
        assert_eq!(code, 200);

        // Logs: wait for the last line, then filter.
        let started = Instant::now();
        loop {
            let (_, text) = get_text(addr, &admin, "/containerLogs/default/web/main").await;
            if text.contains("four") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no 'four' in the log: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, all) = get_text(addr, &admin, "/containerLogs/default/web/main").await;
        assert_eq!(code, 200);
        assert_eq!(
            lines(&all),
            ["one", "two", "three", "oops", "four"],
            "stdout and stderr: {all:?}"
        );
        let raw = std::fs::read_to_string(&current.log_path).unwrap();
        assert!(
            raw.contains(" stdout F one\n") && raw.contains(" stderr F oops\n"),
            "CRI lines: {raw}"
        );

        let (_, tail) = get_text(addr, &admin, "/containerLogs/default/web/main?tailLines=2").await;
        assert_eq!(lines(&tail), ["oops", "four"]);
        let (_, stamped) = get_text(
            addr,
            &admin,
            "/containerLogs/default/web/main?timestamps=true&tailLines=1",
        )
        .await;
        let (time, text) = stamped.trim_end().split_once(' ').unwrap();
        assert_eq!(text, "four");
        let four_at: jiff::Timestamp = time.parse().expect("an RFC 3339 time before the line");
        let since = form_urlencoded::byte_serialize(time.as_bytes()).collect::<String>();
        let (_, recent) = get_text(
            addr,
            &admin,
            &format!("/containerLogs/default/web/main?sinceTime={since}"),
        )
        .await;
        assert_eq!(lines(&recent), ["four"], "lines since {four_at}");
        let (_, limited) = get_text(addr, &admin, "/containerLogs/default/web/main?limitBytes=3").await;
        assert_eq!(limited, "one");
        let (_, prev) = get_text(addr, &admin, "/containerLogs/default/web/main?previous=true").await;
        assert_eq!(prev, "previous-run\n");

        // Errors as kubectl shows them.
        let (code, body) = get_text(addr, &admin, "/containerLogs/default/nope/main").await;
        assert_eq!(code, 404, "{body}");
        let (code, body) = get_text(addr, &admin, "/containerLogs/default/web/sidecar").await;
        assert_eq!(code, 400);
        assert!(
            body.contains("container sidecar is not valid for pod web") && body.contains("[main]"),
            "{body}"
        );

        // Exec: output, exit code.
        let r = exec(
            addr,
            &admin,
            &["sh", "-c", "echo hello; echo err >&2; exit 3"],
            None,
            false,
            None,
        )
        .await;
        assert_eq!(
            (r.stdout.as_slice(), r.stderr.as_slice()),
            (&b"hello\n"[..], &b"err\n"[..])
        );
        assert_eq!(r.status["reason"], "NonZeroExitCode", "{}", r.status);
        assert_eq!(r.status["details"]["causes"][0]["message"], "3");
        // stdin to end-of-file (v5's close of channel 0).
        let r = exec(addr, &admin, &["cat"], Some(b"from stdin\n"), false, None).await;
        assert_eq!(r.stdout, b"from stdin\n");
        assert_eq!(r.status["status"], "Success", "{}", r.status);
        // A command that does not exist.
        let r = exec(addr, &admin, &["no-such-command"], None, false, None).await;
        assert_eq!(r.status["status"], "Failure", "{}", r.status);

        // kubectl cp into the pod: `tar xmf - -C DIR` reading the archive from stdin.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut archive = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(payload.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, "copied/data.bin", &payload[..])
            .unwrap();
        let archive = archive.into_inner().unwrap();
        let r = exec(
            addr,
            &admin,
            &["tar", "xmf", "-", "-C", "/tmp"],
            Some(&archive),
            false,
            None,
        )
        .await;
        assert_eq!(
            r.status["status"],
            "Success",
            "{} {}",
            r.status,
            String::from_utf8_lossy(&r.stderr)
        );
        // And out of it: `tar cf - -C DIR PATH` on stdout.
        let r = exec(
            addr,
            &admin,
            &["tar", "cf", "-", "-C", "/tmp", "copied"],
            None,
            false,
            None,
        )
        .await;
        assert_eq!(r.status["status"], "Success", "{}", r.status);
        let mut out = tar::Archive::new(&r.stdout[..]);
        let mut found = None;
        for entry in out.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().ends_with("data.bin") {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                found = Some(data);
            }
        }
        assert!(found.as_ref() == Some(&payload), "the file came back whole");

        // A terminal (no stdin: closing a terminal's input hangs it up), resized before
        // `stty` asks its size.
        let mut resize = vec![4u8];
        resize.extend_from_slice(br#"{"Width":100,"Height":40}"#);
        let r = exec(
            addr,
            &admin,
            &["sh", "-c", "sleep 0.5; stty size"],
            None,
            true,
            Some(resize),
        )
        .await;
        assert!(String::from_utf8_lossy(&r.stdout).contains("40 100"), "{:?}", r);

        // exec_sync, as exec probes use it.
        let (code, output) = runtime
            .exec_sync(
                &current.id,
                &["sh".into(), "-c".into(), "echo probe; exit 2".into()],
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!((code, output.as_slice()), (2, &b"probe\n"[..]));
        let slow = runtime
            .exec_sync(&current.id, &["sleep".into(), "30".into()], Duration::from_millis(500))
            .await;
        assert!(slow.unwrap_err().to_string().contains("did not finish"), "timed out");

        // A client that leaves mid-exec has its process killed.
        let mut ws = websocket(
            addr,
            &admin,
            "/exec/default/web/main?command=sleep&command=299&stdout=true",
            "v5.channel.k8s.io",
        )
        .await;
        let ps = || async {
            let (_, out) = runtime
                .exec_sync(&current.id, &["ps".into()], Duration::from_secs(10))
                .await
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };
        let started = Instant::now();
        while !ps().await.contains("sleep 299") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the exec'd sleep never ran"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ws.close(None).await.unwrap();
        drop(ws);
        let started = Instant::now();
        loop {
            let listing = ps().await;
            if !listing.contains("sleep 299") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still running after the client left: {listing}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Port-forward to the web server on the pod's loopback, and to a closed port.
        let (data, error) = port_forward(addr, &admin, 8080, b"GET / HTTP/1.0\r\n\r\n").await;
        let response = String::from_utf8_lossy(&data);
        assert!(
            response.starts_with("HTTP/1.") && response.contains("pf-ok"),
            "{response}"
        );
        assert!(error.is_empty(), "{}", String::from_utf8_lossy(&error));
        let (data, error) = port_forward(addr, &admin, 9, b"").await;
        assert!(data.is_empty());
        let error = String::from_utf8_lossy(&error);
        assert!(error.contains("error forwarding port 9"), "{error}");

        // The follower got everything and ends when the container does.
        runtime
            .stop_container(&current.id, Duration::from_secs(1))
            .await
            .unwrap();
        pods.0
            .lock()
            .unwrap()
            .insert(("default".into(), "web".into()), info(false));
        let mut followed = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), follow.recv())
            .await
            .expect("the followed log ends once the container has stopped")
        {
            followed.extend_from_slice(&chunk);
        }
        let followed = String::from_utf8_lossy(&followed);
        assert!(
            followed.starts_with("one\n") && followed.contains("four\n"),
            "{followed:?}"
        );
        serving.abort();
    })
    .catch_unwind()
    .await;
    drop(netns);
    fixture.finish(outcome).await;
}
