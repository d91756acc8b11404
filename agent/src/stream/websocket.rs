//! The server side of a WebSocket upgrade over hyper (tokio-tungstenite does the framing;
//! the handshake is answered here because the request arrives through hyper, not a raw
//! socket), and the channel framing of Kubernetes' streaming protocols: every binary
//! message starts with its channel byte.

use http::{HeaderMap, Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{Body, Refusal, full};

/// An accepted upgrade: the 101 to answer and the connection once hyper hands it over.
pub struct Accepted {
    /// The `101 Switching Protocols` response.
    pub response: Response<Body>,
    /// Resolves to the upgraded connection after the response is sent.
    pub upgrade: OnUpgrade,
    /// The subprotocol chosen.
    pub protocol: String,
}

/// The upgraded connection as a WebSocket.
pub type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The subprotocols the client offers (`Sec-WebSocket-Protocol`, comma-separated, possibly
/// in several headers), in its order.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks `req` is a WebSocket upgrade offering one of `supported` (in our preference order)
/// and prepares the 101; otherwise the 400 to answer.
pub(crate) fn accept<B>(req: &mut Request<B>, supported: &[&str]) -> Result<Accepted, Refusal> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec());
    let (true, Some(key)) = (is_upgrade, key) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "Upgrade request required: connect with a WebSocket (Upgrade: websocket) offering one of the \
                 subprotocols {supported:?}"
            ),
        ));
    };
    let offered = offered_protocols(headers);
    let Some(protocol) = supported.iter().find(|s| offered.iter().any(|o| o == *s)) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("none of the offered subprotocols {offered:?} is supported: offer one of {supported:?}"),
        ));
    };
    let Some(upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "this connection cannot be upgraded (HTTP/1.1 is required)",
        ));
    };
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key),
        )
        .header(header::SEC_WEBSOCKET_PROTOCOL, *protocol)
        .body(full(""))
        .expect("static response parts");
    Ok(Accepted {
        response,
        upgrade,
        protocol: protocol.to_string(),
    })
}

/// Waits for hyper to hand over the upgraded connection and wraps it as a server WebSocket.
pub async fn socket(upgrade: OnUpgrade) -> Result<Socket, hyper::Error> {
    let upgraded = upgrade.await?;
    Ok(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await)
}

/// A channel message: the channel byte, then the data.
pub fn channel_message(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// Splits a channel message; `None` for an empty one.
pub fn split_channel(message: &[u8]) -> Option<(u8, &[u8])> {
    message.split_first().map(|(channel, data)| (*channel, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_framing_round_trips() {
        let m = channel_message(2, b"oops");
        assert_eq!(m, b"\x02oops");
        assert_eq!(split_channel(&m), Some((2, &b"oops"[..])));
        assert_eq!(split_channel(b"\x00"), Some((0, &b""[..])));
        assert_eq!(split_channel(b""), None);
    }

    #[test]
    fn upgrades_need_websocket_and_a_known_protocol() {
        let request = |protocols: &str, upgrade: bool| {
            let mut b = Request::builder().uri("/exec/ns/p/c");
            if upgrade {
                b = b
                    .header(header::UPGRADE, "websocket")
                    .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
            }
            let mut req = b.header(header::SEC_WEBSOCKET_PROTOCOL, protocols).body(()).unwrap();
            req.extensions_mut().insert(());
            req
        };
        let mut plain = request("v5.channel.k8s.io", false);
        let refused = accept(&mut plain, &["v5.channel.k8s.io"]).err().unwrap();
        assert_eq!(refused.code, StatusCode::BAD_REQUEST);
        let mut unknown = request("v3.channel.k8s.io, base64.channel.k8s.io", true);
        assert_eq!(
            accept(&mut unknown, &["v5.channel.k8s.io"]).err().unwrap().code,
            StatusCode::BAD_REQUEST
        );
        let headers = request("v4.channel.k8s.io,v5.channel.k8s.io", true);
        assert_eq!(
            offered_protocols(headers.headers()),
            ["v4.channel.k8s.io", "v5.channel.k8s.io"]
        );
        // The sample key of RFC 6455 section 1.3.
        assert_eq!(
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
