//! Nodes joining the cluster, k3s' way: the join token `K10<CA hash>::node:<secret>`
//! (`<data-dir>/node-token`) first lets the agent fetch the CA from [`CA_CERTS_PATH`] over
//! an unverified connection and check it against the hash, then, over a connection that
//! trusts that CA, trade the secret at [`JOIN_PATH`] for a client certificate of its own
//! (CN `system:node:<name>`, O `system:nodes`), and a serving certificate for its streaming
//! server (the node name and the `addresses` it sends as SANs). A wrong secret gets 401 and
//! nothing else.

use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use super::constant_time_eq;
use super::pki::Pki;
use super::status::ApiError;

/// The cluster CA certificate (PEM), for anyone: the token's hash is what makes it trusted.
pub const CA_CERTS_PATH: &str = "/cacerts";
/// `POST {"nodeName": NAME, "addresses": [IP...]}` with `Authorization: Bearer <secret>` (or the whole token).
pub const JOIN_PATH: &str = "/weir/v1/join";

/// Join requests are a node name; anything larger is refused.
const MAX_JOIN_BODY: usize = 4096;

pub async fn serve(pki: &Pki, parts: &http::request::Parts, body: hyper::body::Incoming) -> Response {
    if parts.uri.path() == CA_CERTS_PATH {
        if parts.method != Method::GET {
            return ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "GET the CA certificate",
            )
            .into_response();
        }
        return ([(header::CONTENT_TYPE, "application/x-pem-file")], pki.ca_pem.clone()).into_response();
    }
    if parts.method != Method::POST {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST {\"nodeName\": ...} to join",
        )
        .into_response();
    }
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    // The whole token or its secret part.
    let secret = presented.rsplit_once("::node:").map_or(presented, |(_, secret)| secret);
    if !constant_time_eq(secret.as_bytes(), pki.node_secret.as_bytes()) {
        tracing::warn!("join: refused a node with a wrong token");
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the join token is not this cluster's: use the token in the server's <data-dir>/node-token",
        )
        .into_response();
    }
    let body = match Limited::new(body, MAX_JOIN_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return ApiError::too_large().into_response(),
    };
    let request = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(value) => value,
        Err(e) => return ApiError::bad_request(format!("the join request is not JSON: {e}")).into_response(),
    };
    let name = request
        .get("nodeName")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    let addresses = match addresses(&request) {
        Ok(a) => a,
        Err(e) => return ApiError::bad_request(e).into_response(),
    };
    if !valid_node_name(&name) {
        return ApiError::bad_request(format!(
            "nodeName {name:?} is not a valid node name (lowercase letters, digits, '-' and '.', at most 253)"
        ))
        .into_response();
    }
    let issued = pki.issue_node_credentials(&name).and_then(|client| {
        let serving = pki.issue_node_serving_certificate(&name, &addresses)?;
        Ok((client, serving))
    });
    match issued {
        Ok(((cert, key), (serving_cert, serving_key))) => {
            tracing::info!(node = %name, ?addresses, "join: issued node credentials");
            let body = json!({"caCert": pki.ca_pem, "clientCert": cert, "clientKey": key,
                              "servingCertificate": serving_cert, "servingKey": serving_key});
            ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("issuing node credentials: {e:#}"),
        )
        .into_response(),
    }
}

/// The request's `addresses`: the node's IPs, for its serving certificate's SANs.
fn addresses(request: &serde_json::Value) -> Result<Vec<std::net::IpAddr>, String> {
    let Some(list) = request.get("addresses") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or("addresses must be a list of IP addresses, like [\"192.0.2.10\"]")?;
    if list.len() > 16 {
        return Err(format!("{} addresses: at most 16", list.len()));
    }
    list.iter()
        .map(|a| {
            a.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("address {a} is not an IP address"))
        })
        .collect()
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ips() {
        assert_eq!(addresses(&json!({})).unwrap(), Vec::<std::net::IpAddr>::new());
        let ips = addresses(&json!({"addresses": ["192.0.2.1", "2001:db8::1"]})).unwrap();
        assert_eq!(ips.len(), 2);
        assert!(
            addresses(&json!({"addresses": ["node-a"]}))
                .unwrap_err()
                .contains("not an IP")
        );
        assert!(
            addresses(&json!({"addresses": "192.0.2.1"}))
                .unwrap_err()
                .contains("list")
        );
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        assert!(valid_node_name("node-a"));
        assert!(valid_node_name("worker-1.example.com"));
        for bad in ["", "Node", "a_b", "-a", "a-", "a..b", &"x".repeat(254)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }
}
