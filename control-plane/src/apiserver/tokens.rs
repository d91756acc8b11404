//! Service account tokens: the TokenRequest subresource
//! (`POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`) issues ES256 JWTs with
//! Kubernetes' claims, signed by `pki/sa.key`, and bearer tokens of that form authenticate as
//! `system:serviceaccount:<ns>:<name>` while the account (and the pod a token is bound to)
//! still exists with the same uid. What such identities may do is `authz`'s business.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::authz::Identity;
use super::handler::ApiServer;
use super::resources;
use super::status::{ApiError, FieldCause};
use super::time;

/// The tokens' issuer, and the audience the API server accepts (Kubernetes' defaults).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// expirationSeconds when a request gives none.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest expirationSeconds Kubernetes accepts.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// The group of every service account, and the prefix of each namespace's group.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
const USER_PREFIX: &str = "system:serviceaccount:";

/// `name` and `uid` of an object a token names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectClaim {
    pub name: String,
    pub uid: String,
}

/// The private `kubernetes.io` claim.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectClaim,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectClaim>,
}

/// A service account token's claims, as Kubernetes writes them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// The signing and verifying halves of `pki/sa.key`.
pub struct ServiceAccountTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl ServiceAccountTokens {
    /// From the PKCS#8 PEM of an ECDSA P-256 key (`Pki::service_account_key_pem`).
    pub fn from_pem(private_key_pem: &str) -> Result<ServiceAccountTokens> {
        let pair = rcgen::KeyPair::from_pem(private_key_pem)
            .context("parsing pki/sa.key (delete it to have a new one made; issued tokens stop working)")?;
        Ok(ServiceAccountTokens {
            encoding: EncodingKey::from_ec_pem(private_key_pem.as_bytes()).context("loading pki/sa.key for signing")?,
            decoding: DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes())
                .context("loading the public half of pki/sa.key")?,
        })
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &self.encoding)
            .map_err(|e| ApiError::internal(format!("signing a service account token: {e}")))
    }

    /// The claims of `token` if it carries this server's signature, is within its validity
    /// window and is meant for the API server; None otherwise.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }

    /// The identity of bearer `token`: a valid token whose service account (and bound pod)
    /// still exist with the uids it names.
    pub async fn authenticate(&self, api: &ApiServer, token: &str) -> Option<Identity> {
        let claims = self.verify(token)?;
        let k = &claims.kubernetes;
        let (namespace, name) = claims.sub.strip_prefix(USER_PREFIX)?.split_once(':')?;
        if namespace != k.namespace || name != k.serviceaccount.name {
            return None;
        }
        let account = read(api, "serviceaccounts", namespace, name, true).await.ok()??;
        if uid_of(&account) != k.serviceaccount.uid {
            return None;
        }
        if let Some(pod) = &k.pod {
            let bound = read(api, "pods", namespace, &pod.name, true).await.ok()??;
            if uid_of(&bound) != pod.uid {
                return None;
            }
        }
        Some(service_account_identity(namespace, name))
    }
}

/// `system:serviceaccount:<ns>:<name>` in `system:serviceaccounts`,
/// `system:serviceaccounts:<ns>` and `system:authenticated`.
pub fn service_account_identity(namespace: &str, name: &str) -> Identity {
    Identity {
        user: format!("{USER_PREFIX}{namespace}:{name}"),
        groups: vec![
            SERVICE_ACCOUNTS_GROUP.into(),
            format!("{SERVICE_ACCOUNTS_GROUP}:{namespace}"),
            "system:authenticated".into(),
        ],
    }
}

fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

/// An object in storage form; `from_cache` for the hot authentication path (the store when
/// the cache has not seen it yet).
async fn read(
    api: &ApiServer,
    plural: &str,
    ns: &str,
    name: &str,
    from_cache: bool,
) -> Result<Option<Value>, ApiError> {
    let resource = resources::find("", "v1", plural).expect("a core resource");
    let key = resource.key(Some(ns), name);
    if from_cache && let Some(obj) = api.cache.get(&key).await {
        return Ok(Some(obj.value.clone()));
    }
    match api.store.get(&key).await? {
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| ApiError::internal(format!("undecodable object {key}: {e}"))),
        None => Ok(None),
    }
}

/// `(namespace, name)` when `path` is a service account's token subresource.
pub fn token_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some("serviceaccounts"), Some(name), Some("token"), None) if !ns.is_empty() && !name.is_empty() => {
            Some((ns, name))
        }
        _ => None,
    }
}

/// Serves the token subresource for `identity` (already authorized to create it).
pub async fn serve(
    api: &Arc<ApiServer>,
    tokens: &ServiceAccountTokens,
    identity: Option<&Identity>,
    method: &Method,
    headers: &HeaderMap,
    (namespace, name): (&str, &str),
    body: Bytes,
) -> Response {
    if *method != Method::POST {
        return ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} serviceaccounts/token): only POST (create) is served"
        ))
        .into_response();
    }
    match issue(api, tokens, identity, headers, namespace, name, &body).await {
        Ok(v) => (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&v).unwrap_or_default(),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

fn invalid(name: &str, cause: FieldCause) -> ApiError {
    ApiError::invalid("authentication.k8s.io", "TokenRequest", name, vec![cause])
}

async fn issue(
    api: &ApiServer,
    tokens: &ServiceAccountTokens,
    identity: Option<&Identity>,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let request = super::handler::decode(content_type, body)?;
    let spec = request.get("spec").cloned().unwrap_or(json!({}));
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
        Some(v) => v.as_i64().ok_or_else(|| {
            invalid(
                name,
                FieldCause::invalid("spec.expirationSeconds", v, "must be an integer"),
            )
        })?,
    };
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(invalid(
            name,
            FieldCause::invalid(
                "spec.expirationSeconds",
                expiration,
                "may not specify a duration less than 10 minutes",
            ),
        ));
    }
    if expiration > MAX_EXPIRATION_SECONDS {
        return Err(invalid(
            name,
            FieldCause::invalid(
                "spec.expirationSeconds",
                expiration,
                "may not specify a duration larger than 2^32 seconds",
            ),
        ));
    }
    let mut audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if audiences.is_empty() {
        audiences.push(ISSUER.into());
    }

    let account = read(api, "serviceaccounts", namespace, name, false)
        .await?
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let bound = spec.get("boundObjectRef").filter(|v| !v.is_null());
    let mut pod_claim = None;
    if let Some(bound) = bound {
        let kind = bound.get("kind").and_then(Value::as_str).unwrap_or_default();
        let api_version = bound.get("apiVersion").and_then(Value::as_str).unwrap_or("v1");
        if kind != "Pod" || api_version != "v1" {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount {name:?} to object of kind {api_version}/{kind:?}: Weir binds tokens to v1 Pods only"
            )));
        }
        let pod_name = bound.get("name").and_then(Value::as_str).unwrap_or_default();
        let pod = read(api, "pods", namespace, pod_name, false)
            .await?
            .ok_or_else(|| ApiError::not_found("", "pods", pod_name))?;
        let want_uid = bound.get("uid").and_then(Value::as_str).unwrap_or_default();
        if !want_uid.is_empty() && want_uid != uid_of(&pod) {
            return Err(ApiError::conflict("", "pods", pod_name).with_message(format!(
                "the UID in the bound object reference ({want_uid}) does not match the UID in record. The object might have been deleted and then recreated"
            )));
        }
        let pod_account = pod
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default");
        if pod_account != name {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount {name:?} to pod running with different serviceaccount name."
            )));
        }
        pod_claim = Some((pod_name.to_string(), uid_of(&pod).to_string(), pod));
    }
    // NodeRestriction: a node gets tokens only for pods scheduled to it.
    if let Some(node) = identity.and_then(Identity::node_name) {
        let on_node = pod_claim
            .as_ref()
            .and_then(|(_, _, pod)| pod.pointer("/spec/nodeName").and_then(Value::as_str));
        if on_node != Some(node) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "serviceaccounts \"{name}\" is forbidden: node \"{node}\" may only request tokens bound to pods scheduled to it"
                ),
            ));
        }
    }

    let now = time::now_unix();
    let exp = now + expiration;
    let claims = Claims {
        iss: ISSUER.into(),
        sub: format!("{USER_PREFIX}{namespace}:{name}"),
        aud: audiences.clone(),
        exp,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes: KubernetesClaims {
            namespace: namespace.into(),
            serviceaccount: ObjectClaim {
                name: name.into(),
                uid: uid_of(&account).into(),
            },
            pod: pod_claim.as_ref().map(|(n, u, _)| ObjectClaim {
                name: n.clone(),
                uid: u.clone(),
            }),
        },
    };
    let token = tokens.sign(&claims)?;
    let mut out_spec = json!({"audiences": audiences, "expirationSeconds": expiration, "boundObjectRef": null});
    if let Some((n, u, _)) = &pod_claim {
        out_spec["boundObjectRef"] = json!({"kind": "Pod", "apiVersion": "v1", "name": n, "uid": u});
    }
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": time::format_unix(now)},
        "spec": out_spec,
        "status": {"token": token, "expirationTimestamp": time::format_unix(exp)},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp_offset: i64) -> Claims {
        let now = time::now_unix();
        Claims {
            iss: ISSUER.into(),
            sub: "system:serviceaccount:ns:sa".into(),
            aud: vec![ISSUER.into()],
            exp: now + exp_offset,
            iat: now,
            nbf: now,
            jti: "j".into(),
            kubernetes: KubernetesClaims {
                namespace: "ns".into(),
                serviceaccount: ObjectClaim {
                    name: "sa".into(),
                    uid: "u".into(),
                },
                pod: None,
            },
        }
    }

    fn keys() -> ServiceAccountTokens {
        ServiceAccountTokens::from_pem(&rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap()
    }

    #[test]
    fn tokens_verify_only_with_our_key_in_time_and_for_the_api() {
        let ours = keys();
        let token = ours.sign(&claims(600)).unwrap();
        let verified = ours.verify(&token).expect("our own token verifies");
        assert_eq!(verified.sub, "system:serviceaccount:ns:sa");
        assert_eq!(verified.kubernetes, claims(600).kubernetes);
        let value: Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                token.split('.').nth(1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(value["kubernetes.io"]["serviceaccount"]["name"], "sa");
        assert!(keys().verify(&token).is_none(), "another key's signature");
        assert!(ours.verify(&ours.sign(&claims(-10)).unwrap()).is_none(), "expired");
        let mut other_audience = claims(600);
        other_audience.aud = vec!["vault".into()];
        assert!(
            ours.verify(&ours.sign(&other_audience).unwrap()).is_none(),
            "not for the API"
        );
        assert!(ours.verify("not.a.jwt").is_none());
    }

    #[test]
    fn token_paths_are_recognized() {
        assert_eq!(
            token_path("/api/v1/namespaces/ns/serviceaccounts/sa/token"),
            Some(("ns", "sa"))
        );
        assert_eq!(token_path("/api/v1/namespaces/ns/serviceaccounts/sa"), None);
        assert_eq!(token_path("/api/v1/namespaces/ns/serviceaccounts/sa/token/x"), None);
        assert_eq!(token_path("/api/v1/namespaces/ns/pods/sa/token"), None);
    }
}
