//! The table of API resources Weir serves: names, kinds, scope and subresources, the single
//! source for routing, discovery, OpenAPI paths and storage keys. Per-kind behaviour lives in
//! `strategy`, not here.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Status,
    Scale,
    Binding,
    /// `namespaces/{name}/finalize`: writes only `spec.finalizers` of a Namespace.
    Finalize,
    /// `serviceaccounts/{name}/token`: TokenRequest, served by `tokens` (it needs the caller).
    Token,
    /// `pods/{name}/log`, served by the pod's node (see `proxy`).
    Log,
    /// `pods/{name}/exec`, served by the pod's node.
    Exec,
    /// `pods/{name}/portforward`, served by the pod's node.
    PortForward,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Finalize => "finalize",
            Subresource::Token => "token",
            Subresource::Log => "log",
            Subresource::Exec => "exec",
            Subresource::PortForward => "portforward",
        }
    }
}

#[derive(Debug)]
pub struct Resource {
    /// API group; "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Plural name, used in URLs and storage keys.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [Subresource],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_version(&self) -> (&'static str, &'static str) {
        (self.group, self.version)
    }

    /// The storage key prefix: `/registry/<group-qualified plural>/`. Core and apps resources use
    /// the bare plural, as Kubernetes does; others are qualified so names never collide. Kinds
    /// stored as another kind (see `convert`) share that kind's prefix.
    pub fn key_prefix(&self) -> String {
        if self.group == "events.k8s.io" {
            return "/registry/events/".to_string();
        }
        if self.group.is_empty() || self.group == "apps" {
            format!("/registry/{}/", self.plural)
        } else {
            format!("/registry/{}.{}/", self.plural, self.group)
        }
    }

    /// Key of one object (namespace ignored for cluster-scoped resources).
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{}/{}", self.key_prefix(), ns, name),
            _ => format!("{}{}", self.key_prefix(), name),
        }
    }

    /// Prefix for listing: one namespace, or all of them.
    pub fn list_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{}/", self.key_prefix(), ns),
            _ => self.key_prefix(),
        }
    }

    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

use Subresource::*;

macro_rules! resource {
    ($group:literal, $version:literal, $kind:literal, $plural:literal, $singular:literal, $namespaced:literal,
     [$($short:literal),*], [$($cat:literal),*], [$($sub:ident),*]) => {
        Resource {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: &[$($short),*],
            categories: &[$($cat),*],
            subresources: &[$($sub),*],
        }
    };
}

pub static RESOURCES: &[Resource] = &[
    resource!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        ["ns"],
        [],
        [Status, Finalize]
    ),
    resource!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        ["po"],
        ["all"],
        [Status, Binding, Log, Exec, PortForward]
    ),
    resource!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        ["svc"],
        ["all"],
        [Status]
    ),
    resource!("", "v1", "Endpoints", "endpoints", "endpoints", true, ["ep"], [], []),
    resource!("", "v1", "ConfigMap", "configmaps", "configmap", true, ["cm"], [], []),
    resource!("", "v1", "Secret", "secrets", "secret", true, [], [], []),
    resource!("", "v1", "Node", "nodes", "node", false, ["no"], [], [Status]),
    resource!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        ["sa"],
        [],
        [Token]
    ),
    resource!("", "v1", "Event", "events", "event", true, ["ev"], [], []),
    resource!(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        "persistentvolume",
        false,
        ["pv"],
        [],
        [Status]
    ),
    resource!(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        true,
        ["pvc"],
        [],
        [Status]
    ),
    resource!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        ["deploy"],
        ["all"],
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        ["rs"],
        ["all"],
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        ["sts"],
        ["all"],
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        ["ds"],
        ["all"],
        [Status]
    ),
    resource!(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        [],
        [],
        []
    ),
    resource!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        [],
        [],
        []
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        ["ing"],
        [],
        [Status]
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        "ingressclass",
        false,
        [],
        [],
        []
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        "storageclass",
        false,
        ["sc"],
        [],
        []
    ),
    resource!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        [],
        [],
        []
    ),
    resource!("events.k8s.io", "v1", "Event", "events", "event", true, ["ev"], [], []),
];

/// The group/versions served, in discovery order (core first).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&r.group_version()) {
            out.push(r.group_version());
        }
    }
    out
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn find_kind(group: &str, version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind)
}

/// The resource a storage key belongs to, with the key's namespace and name.
pub fn from_key(key: &str) -> Option<(&'static Resource, Option<&str>, &str)> {
    RESOURCES.iter().find_map(|r| {
        let rest = key.strip_prefix(&r.key_prefix())?;
        if r.namespaced {
            let (ns, name) = rest.split_once('/')?;
            Some((r, Some(ns), name))
        } else {
            (!rest.contains('/')).then_some((r, None, rest))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_event_apis_share_one_storage_and_others_never_collide() {
        let core = find_kind("", "v1", "Event").unwrap();
        let events = find_kind("events.k8s.io", "v1", "Event").unwrap();
        assert_eq!(events.key(Some("a"), "b"), core.key(Some("a"), "b"));
        let prefixes: Vec<String> = RESOURCES
            .iter()
            .filter(|r| r.group != "events.k8s.io")
            .map(|r| r.key_prefix())
            .collect();
        for (i, a) in prefixes.iter().enumerate() {
            for b in &prefixes[i + 1..] {
                assert!(!a.starts_with(b.as_str()) && !b.starts_with(a.as_str()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn key_round_trips_through_from_key() {
        for r in RESOURCES {
            let key = r.key(Some("ns1"), "obj");
            let (found, ns, name) = from_key(&key).unwrap();
            assert_eq!(found.kind, r.kind);
            assert_eq!(found.key_prefix(), r.key_prefix());
            assert_eq!(name, "obj");
            assert_eq!(ns.is_some(), r.namespaced);
        }
    }
}
