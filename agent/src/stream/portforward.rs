//! `/portForward/{namespace}/{pod}`: kubectl's port-forward, as kubectl 1.31+ speaks it
//! (KEP-4006): a WebSocket with subprotocol `SPDY/3.1+portforward.k8s.io` whose binary
//! messages carry a SPDY/3.1 byte stream (client-go's `TunnelingConnection`: frames do not
//! align with messages), inside which kubectl opens, per forwarded connection, two streams
//! with the headers `streamType` (`error` or `data`), `port` and `requestID`.
//!
//! The server answers every SYN_STREAM with a SYN_REPLY (the client waits for it), and once a
//! request has both streams connects to 127.0.0.1:port (else `[::1]:port`) inside the pod's
//! network namespace: the socket is made on a short-lived thread that joined the namespace
//! with setns(CLONE_NEWNET), then used from tokio (a socket stays in the namespace it was made
//! in). Bytes are copied both ways on the data stream; a FIN from the client half-closes the
//! TCP connection, the TCP end-of-file becomes a FIN to the client, and then the error stream
//! is closed (FIN) — empty on success, kubelet's message when the connection failed, which
//! kubectl prints. PINGs are echoed (kubectl pings every 10 s).

use std::collections::HashMap;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use super::spdy::{self, Codec, FLAG_FIN, Frame};
use super::websocket;
use super::{Body, StreamServer};

/// The subprotocol served: SPDY tunnelled in WebSocket, port-forward protocol v1.
pub const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Validates the request, answers the upgrade and runs the session once upgraded.
pub(super) fn handle(
    server: &StreamServer,
    mut req: Request<Incoming>,
    namespace: &str,
    pod_name: &str,
) -> Response<Body> {
    let pod = match server.pod(namespace, pod_name) {
        Ok(p) => p,
        Err(refusal) => return refusal.response(),
    };
    let accepted = match websocket::accept(&mut req, &[PROTOCOL]) {
        Ok(a) => a,
        Err(refusal) => return refusal.response(),
    };
    let target = Target {
        netns: pod.netns_path.clone(),
        pod: format!("{namespace}/{pod_name}"),
        uid: pod.uid.clone(),
    };
    tokio::spawn(async move {
        match websocket::socket(accepted.upgrade).await {
            Ok(socket) => session(socket, target).await,
            Err(e) => debug!(error = %e, "port-forward: the upgrade did not complete"),
        }
    });
    accepted.response
}

/// Where connections go.
#[derive(Clone)]
struct Target {
    netns: Option<PathBuf>,
    pod: String,
    uid: String,
}

/// One forwarded connection's streams, paired by request id.
#[derive(Default)]
struct Pair {
    port: Option<u16>,
    error: Option<u32>,
    data: Option<u32>,
    /// Client → pod bytes of the data stream, until the forwarder takes them.
    data_rx: Option<mpsc::Receiver<Bytes>>,
}

async fn session(socket: websocket::Socket, target: Target) {
    let (mut sink, mut source) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut codec = Codec::new();
    let mut buf = BytesMut::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Client → pod senders of data streams, by stream id; dropped on FIN or RST.
    let mut to_pod: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut forwarders = tokio::task::JoinSet::new();
    'session: while let Some(message) = source.next().await {
        match message {
            Ok(Message::Binary(bytes)) => buf.extend_from_slice(&bytes),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        }
        loop {
            let frame = match codec.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    warn!(pod = %target.pod, error = %e, "port-forward: closing the session");
                    break 'session;
                }
            };
            match frame {
                Frame::SynStream { stream_id, headers, .. } => {
                    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
                    let port = header("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0);
                    let kind = header("streamtype");
                    let request = header("requestid").or_else(|| header("port")).unwrap_or_default();
                    let (Some(port), Some(kind)) = (port, kind) else {
                        let _ = out_tx.send(spdy::rst_stream(stream_id, spdy::RST_REFUSED_STREAM)).await;
                        continue;
                    };
                    let _ = out_tx.send(codec.syn_reply(stream_id, 0, &[])).await;
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.port = Some(port);
                    match kind.as_str() {
                        "error" => pair.error = Some(stream_id),
                        "data" => {
                            let (tx, rx) = mpsc::channel(16);
                            to_pod.insert(stream_id, tx);
                            pair.data = Some(stream_id);
                            pair.data_rx = Some(rx);
                        }
                        _ => {
                            let _ = out_tx.send(spdy::rst_stream(stream_id, spdy::RST_REFUSED_STREAM)).await;
                            continue;
                        }
                    }
                    if let (Some(error), Some(data), Some(port)) = (pair.error, pair.data, pair.port)
                        && let Some(rx) = pair.data_rx.take()
                    {
                        pairs.remove(&request);
                        forwarders.spawn(forward(target.clone(), port, error, data, rx, out_tx.clone()));
                    }
                }
                Frame::Data { stream_id, flags, data } => {
                    if let Some(tx) = to_pod.get(&stream_id)
                        && !data.is_empty()
                        && tx.send(Bytes::from(data)).await.is_err()
                    {
                        to_pod.remove(&stream_id);
                    }
                    if flags & FLAG_FIN != 0 {
                        to_pod.remove(&stream_id);
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    to_pod.remove(&stream_id);
                }
                Frame::Ping { id } => {
                    let _ = out_tx.send(spdy::ping(id)).await;
                }
                Frame::GoAway { .. } => break 'session,
                Frame::SynReply { .. } | Frame::Other { .. } => {}
            }
        }
    }
    // The client went away: every forwarded connection ends with it.
    drop(to_pod);
    forwarders.abort_all();
    let _ = out_tx.send(spdy::goaway(0)).await;
    drop(out_tx);
    let _ = writer.await;
}

/// Forwards one connection: connects in the pod, copies both ways, reports on the error stream.
async fn forward(
    target: Target,
    port: u16,
    error_stream: u32,
    data_stream: u32,
    mut from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let tcp = match connect(target.netns.clone(), port).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let message = format!(
                "error forwarding port {port} to pod {}, uid {}: failed to connect to localhost:{port} inside the \
                 pod's network namespace: {e}",
                target.pod, target.uid
            );
            debug!(%message, "port-forward");
            let _ = out.send(spdy::data(error_stream, 0, message.as_bytes())).await;
            let _ = out.send(spdy::data(error_stream, FLAG_FIN, &[])).await;
            let _ = out.send(spdy::data(data_stream, FLAG_FIN, &[])).await;
            return;
        }
    };
    let (mut read, mut write) = tcp.into_split();
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = from_client.recv().await {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // FIN (or reset) from the client: half-close, the pod's side may still answer.
        let _ = write.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send(spdy::data(data_stream, 0, &buf[..n])).await.is_err() {
                    upstream.abort();
                    return;
                }
            }
        }
    }
    let _ = out.send(spdy::data(data_stream, FLAG_FIN, &[])).await;
    let _ = out.send(spdy::data(error_stream, FLAG_FIN, &[])).await;
    // The client side ends when the client closes or resets its half (or the session ends).
    let _ = upstream.await;
}

/// A TCP connection to the pod's loopback `port`: made on a thread that joined the pod's
/// network namespace (the thread ends right after; the socket stays in that namespace).
async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("weir-portforward-connect".into())
        .spawn(move || {
            let connected = (|| {
                if let Some(path) = &netns {
                    let file = std::fs::File::open(path).map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("opening the network namespace {}: {e}", path.display()),
                        )
                    })?;
                    // SAFETY: setns on a valid fd; it changes only this thread's namespace,
                    // and this thread ends after connecting.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("joining the network namespace {}: {e}", path.display()),
                        ));
                    }
                }
                let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
                let stream = std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT)
                    .or_else(|e4| std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e4))?;
                stream.set_nonblocking(true)?;
                Ok(stream)
            })();
            let _ = tx.send(connected);
        })?;
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread panicked"))??;
    let stream = tokio::net::TcpStream::from_std(stream)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
