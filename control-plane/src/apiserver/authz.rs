//! Who a request is from, and what nodes may do. Client certificates name their holder as
//! Kubernetes reads them (CN = user, O = group). Members of `system:masters` (the admin
//! certificate; the admin bearer token) may do anything. Members of `system:nodes` (the
//! certificates `weir agent` gets when it joins) get what a kubelet needs, in the spirit of
//! Kubernetes' Node authorizer and NodeRestriction admission: read everything; write only
//! their own Node (and its status) and Lease, pod status, pod deletion, Events, and service
//! account tokens for their pods (`tokens` checks the pod is theirs). Service accounts
//! (bearer tokens from `tokens`) may read only the discovery documents: there is no RBAC
//! yet, and denying is the safe default (Kubernetes' default service account has no more).
//!
//! Logs, exec and port-forward (`pods/log`, `exec`, `portforward`, `attach`, `proxy`) are
//! for cluster admins only.
//!
//! Not yet as strict as Kubernetes: reads are not limited to the objects of the node's own
//! pods (the Node authorizer's graph), and pod status and deletion are allowed for pods of
//! any node.

use http::{Method, StatusCode};

use super::status::ApiError;

const MASTERS: &str = "system:masters";
const NODES: &str = "system:nodes";
const NODE_USER_PREFIX: &str = "system:node:";
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
const SERVICE_ACCOUNTS: &str = super::tokens::SERVICE_ACCOUNTS_GROUP;

/// What `system:discovery` lets anyone authenticated read: the API's shape, not its objects.
fn is_discovery(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(
        segments.as_slice(),
        ["version"]
            | ["api"]
            | ["api", _]
            | ["apis"]
            | ["apis", _]
            | ["apis", _, _]
            | ["openapi", "v2"]
            | ["openapi", "v3", ..]
    )
}

/// The holder of a request's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// The admin bearer token's holder.
    pub fn admin() -> Identity {
        Identity {
            user: "admin".into(),
            groups: vec![MASTERS.into()],
        }
    }

    /// The subject of a client certificate the TLS layer has verified against the cluster CA.
    pub fn from_certificate(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let user = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
        let groups = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect();
        Some(Identity { user, groups })
    }

    /// The node name of a node's identity (`system:node:<name>` in `system:nodes`).
    pub fn node_name(&self) -> Option<&str> {
        if self.groups.iter().any(|g| g == NODES) {
            self.user.strip_prefix(NODE_USER_PREFIX)
        } else {
            None
        }
    }
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    group: &'a str,
    namespace: Option<&'a str>,
    resource: &'a str,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

fn target(path: &str) -> Option<Target<'_>> {
    let (group, rest) = if let Some(rest) = path.strip_prefix("/api/v1") {
        ("", rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let (group, rest) = rest.split_once('/')?;
        let (_version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        (group, rest)
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, segments): (Option<&str>, &[&str]) = match segments.as_slice() {
        ["namespaces", ns] => {
            return Some(Target {
                group,
                namespace: None,
                resource: "namespaces",
                name: Some(ns),
                subresource: None,
            });
        }
        ["namespaces", ns, rest @ ..] => (Some(*ns), rest),
        other => (None, other),
    };
    let (resource, name, subresource) = match segments {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        group,
        namespace,
        resource,
        name,
        subresource,
    })
}

/// Whether `identity` may send `method` to `path`; the 403 to answer otherwise.
pub fn authorize(identity: &Identity, method: &Method, path: &str) -> Result<(), ApiError> {
    if identity.groups.iter().any(|g| g == MASTERS) {
        return Ok(());
    }
    if identity.groups.iter().any(|g| g == SERVICE_ACCOUNTS) {
        // No RBAC yet: service accounts may read what system:discovery grants, nothing else.
        return if matches!(*method, Method::GET | Method::HEAD) && is_discovery(path) {
            Ok(())
        } else {
            Err(forbidden(
                identity,
                method,
                path,
                "service accounts may only read the discovery documents (/api, /apis, /version, /openapi) until Weir has RBAC",
            ))
        };
    }
    let Some(node) = identity.node_name() else {
        return Err(forbidden(
            identity,
            method,
            path,
            "only cluster admins and nodes have access",
        ));
    };
    // Logs, exec and port-forward reach into containers: cluster admins only, as with
    // Kubernetes' Node authorizer (a node must not exec into other nodes' pods).
    if let Some(t) = target(path)
        && matches!(t.subresource, Some("log" | "exec" | "portforward" | "attach" | "proxy"))
    {
        return Err(forbidden(
            identity,
            method,
            path,
            "only cluster admins may read logs, exec or port-forward",
        ));
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let Some(t) = target(path) else {
        return Err(forbidden(identity, method, path, "nodes may not write here"));
    };
    let own = t.name == Some(node);
    let writes_object = matches!(*method, Method::PUT | Method::PATCH | Method::DELETE);
    let allowed = match (t.group, t.resource, t.subresource) {
        // Registering (the name is checked by what the agent sends; it registers its own).
        ("", "nodes", None) if *method == Method::POST => true,
        ("", "nodes", None | Some("status")) => writes_object && own,
        ("coordination.k8s.io", "leases", None) if t.namespace == Some(NODE_LEASE_NAMESPACE) => {
            *method == Method::POST || (writes_object && own)
        }
        ("", "pods", Some("status")) => matches!(*method, Method::PUT | Method::PATCH),
        // Tokens for the pods' projected volumes; `tokens` checks the pod is on this node.
        ("", "serviceaccounts", Some("token")) => *method == Method::POST,
        ("", "pods", None) => *method == Method::DELETE && t.name.is_some(),
        ("", "events", None) | ("events.k8s.io", "events", None) => {
            matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        }
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        let why = if t.resource == "nodes" || t.resource == "leases" {
            format!("node \"{node}\" may only modify its own {}", t.resource)
        } else {
            "nodes may not do this".to_owned()
        };
        Err(forbidden(identity, method, path, &why))
    }
}

fn forbidden(identity: &Identity, method: &Method, path: &str, why: &str) -> ApiError {
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    let what = target(path).map_or_else(
        || format!("path \"{path}\""),
        |t| {
            let scope = t.namespace.map_or_else(
                || "at the cluster scope".to_owned(),
                |ns| format!("in the namespace \"{ns}\""),
            );
            let resource = match t.subresource {
                Some(sub) => format!("{}/{sub}", t.resource),
                None => t.resource.to_owned(),
            };
            format!("resource \"{resource}\" in API group \"{}\" {scope}", t.group)
        },
    );
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("User \"{}\" cannot {verb} {what}: {why}", identity.user),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Identity {
        Identity {
            user: format!("system:node:{name}"),
            groups: vec![NODES.into()],
        }
    }

    fn ok(identity: &Identity, method: Method, path: &str) -> bool {
        authorize(identity, &method, path).is_ok()
    }

    #[test]
    fn paths_name_their_targets() {
        assert_eq!(
            target("/api/v1/namespaces/default/pods/web-0/status"),
            Some(Target {
                group: "",
                namespace: Some("default"),
                resource: "pods",
                name: Some("web-0"),
                subresource: Some("status")
            })
        );
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"),
            Some(Target {
                group: "coordination.k8s.io",
                namespace: Some("kube-node-lease"),
                resource: "leases",
                name: Some("n1"),
                subresource: None
            })
        );
        assert_eq!(target("/api/v1/nodes").unwrap().resource, "nodes");
        assert_eq!(target("/api/v1/namespaces/kube-system").unwrap().resource, "namespaces");
    }

    #[test]
    fn nodes_write_only_what_a_kubelet_writes() {
        let n1 = node("n1");
        assert!(ok(&n1, Method::GET, "/api/v1/secrets"));
        assert!(ok(&n1, Method::POST, "/api/v1/nodes"));
        assert!(ok(&n1, Method::PATCH, "/api/v1/nodes/n1/status"));
        assert!(!ok(&n1, Method::PATCH, "/api/v1/nodes/n2/status"));
        assert!(!ok(&n1, Method::DELETE, "/api/v1/nodes/n2"));
        let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
        assert!(ok(&n1, Method::POST, lease));
        assert!(ok(&n1, Method::PATCH, &format!("{lease}/n1")));
        assert!(!ok(&n1, Method::PATCH, &format!("{lease}/n2")));
        assert!(!ok(
            &n1,
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/default/leases"
        ));
        assert!(ok(&n1, Method::PATCH, "/api/v1/namespaces/default/pods/p/status"));
        assert!(ok(&n1, Method::DELETE, "/api/v1/namespaces/default/pods/p"));
        assert!(!ok(&n1, Method::DELETE, "/api/v1/namespaces/default/pods"));
        assert!(!ok(&n1, Method::POST, "/api/v1/namespaces/default/pods"));
        assert!(ok(&n1, Method::POST, "/api/v1/namespaces/default/events"));
        assert!(!ok(&n1, Method::POST, "/api/v1/namespaces"));
        assert!(!ok(&n1, Method::POST, "/api/v1/namespaces/default/secrets"));
        assert!(!ok(&n1, Method::PUT, "/apis/apps/v1/namespaces/default/deployments/d"));
        let err = authorize(&n1, &Method::POST, "/api/v1/namespaces/default/secrets").unwrap_err();
        assert!(
            err.message
                .contains("User \"system:node:n1\" cannot create resource \"secrets\" in API group \"\" in the namespace \"default\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn service_accounts_read_discovery_only_and_nodes_request_their_tokens() {
        let sa = crate::apiserver::tokens::service_account_identity("ns", "builder");
        assert_eq!(sa.user, "system:serviceaccount:ns:builder");
        for path in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/version",
            "/openapi/v2",
            "/openapi/v3/apis/apps/v1",
        ] {
            assert!(ok(&sa, Method::GET, path), "{path}");
        }
        for path in [
            "/api/v1/namespaces/ns/pods",
            "/api/v1/namespaces/ns/secrets/s",
            "/apis/apps/v1/deployments",
            "/metrics",
        ] {
            assert!(!ok(&sa, Method::GET, path), "{path}");
        }
        assert!(!ok(
            &sa,
            Method::POST,
            "/api/v1/namespaces/ns/serviceaccounts/builder/token"
        ));
        let err = authorize(&sa, &Method::GET, "/api/v1/namespaces/ns/pods").unwrap_err();
        assert!(
            err.message
                .contains("User \"system:serviceaccount:ns:builder\" cannot get"),
            "{}",
            err.message
        );
        let n1 = node("n1");
        assert!(ok(
            &n1,
            Method::POST,
            "/api/v1/namespaces/ns/serviceaccounts/builder/token"
        ));
        assert!(!ok(
            &n1,
            Method::PUT,
            "/api/v1/namespaces/ns/serviceaccounts/builder/token"
        ));
        assert!(!ok(&n1, Method::POST, "/api/v1/namespaces/ns/serviceaccounts"));
    }

    #[test]
    fn only_admins_reach_into_containers() {
        let n1 = node("n1");
        for sub in ["log", "exec", "portforward", "attach"] {
            let path = format!("/api/v1/namespaces/default/pods/web/{sub}");
            assert!(!ok(&n1, Method::GET, &path), "{sub}");
            assert!(!ok(&n1, Method::POST, &path), "{sub}");
            assert!(ok(&Identity::admin(), Method::GET, &path), "{sub}");
        }
        assert!(ok(&n1, Method::GET, "/api/v1/namespaces/default/pods/web"));
        assert!(ok(&n1, Method::GET, "/api/v1/namespaces/default/pods/web/status"));
    }

    #[test]
    fn admins_may_do_anything_and_strangers_nothing() {
        assert!(ok(&Identity::admin(), Method::DELETE, "/api/v1/namespaces/default"));
        let stranger = Identity {
            user: "someone".into(),
            groups: vec![],
        };
        assert!(!ok(&stranger, Method::GET, "/api/v1/pods"));
        // A node-looking name without the group is no node.
        let pretender = Identity {
            user: "system:node:n1".into(),
            groups: vec![],
        };
        assert!(!ok(&pretender, Method::GET, "/api/v1/pods"));
    }
}
