//! Discovery documents (`/api`, `/apis`, per group-version lists, aggregated discovery v2) and
//! the OpenAPI v2/v3 documents, all derived from the resource table and the schemas once at
//! start-up.

use serde_json::{Map, Value, json};
use sha2::Digest;

use super::resources::{RESOURCES, Resource, Subresource, group_versions};
use super::schema::Schemas;

pub const AGGREGATED_CONTENT_TYPE: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub struct Discovery {
    pub api_versions: Value,
    pub api_group_list: Value,
    pub aggregated_core: Value,
    pub aggregated_groups: Value,
    /// `(path, document)` for `/api/v1`, `/apis/<group>`, `/apis/<group>/<version>`.
    pub documents: Vec<(String, Value)>,
    pub openapi_v2: Vec<u8>,
    pub openapi_v3_index: Value,
    /// `(path under /openapi/v3/, hash, document bytes)`.
    pub openapi_v3: Vec<(String, String, Vec<u8>)>,
}

fn subresource_kind(r: &Resource, sub: Subresource) -> (&'static str, &'static str, &'static str) {
    match sub {
        Subresource::Scale => ("autoscaling", "v1", "Scale"),
        Subresource::Binding => ("", "v1", "Binding"),
        Subresource::Token => ("authentication.k8s.io", "v1", "TokenRequest"),
        Subresource::Status | Subresource::Finalize | Subresource::Log => (r.group, r.version, r.kind),
        Subresource::Exec => ("", "v1", "PodExecOptions"),
        Subresource::PortForward => ("", "v1", "PodPortForwardOptions"),
    }
}

fn subresource_verbs(sub: Subresource) -> Vec<&'static str> {
    match sub {
        Subresource::Binding | Subresource::Token => vec!["create"],
        Subresource::Finalize => vec!["update"],
        Subresource::Log => vec!["get"],
        Subresource::Exec | Subresource::PortForward => vec!["create", "get"],
        _ => vec!["get", "patch", "update"],
    }
}

fn storage_version_hash(r: &Resource) -> String {
    let digest = sha2::Sha256::digest(format!("{}/{}/{}", r.group, r.version, r.kind));
    base64_short(&digest[..8])
}

fn base64_short(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
            "storageVersionHash": storage_version_hash(r),
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        for &sub in r.subresources {
            let (g, v, k) = subresource_kind(r, sub);
            let mut e = json!({
                "name": format!("{}/{}", r.plural, sub.name()),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": k,
                "verbs": subresource_verbs(sub),
            });
            if (g, v) != (group, version) {
                e["group"] = json!(g);
                e["version"] = json!(v);
            }
            resources.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn aggregated_version(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            let mut e = json!({
                "resource": r.plural,
                "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": r.singular,
                "verbs": r.verbs(),
            });
            if !r.short_names.is_empty() {
                e["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                e["categories"] = json!(r.categories);
            }
            if !r.subresources.is_empty() {
                e["subresources"] = r
                    .subresources
                    .iter()
                    .map(|&s| {
                        let (g, v, k) = subresource_kind(r, s);
                        json!({"subresource": s.name(), "responseKind": {"group": g, "version": v, "kind": k}, "verbs": subresource_verbs(s)})
                    })
                    .collect();
            }
            e
        })
        .collect();
    json!({"version": version, "resources": resources, "freshness": "Current"})
}

impl Discovery {
    pub fn build(schemas: &Schemas, server_version: &str) -> Discovery {
        let gvs = group_versions();
        let groups: Vec<&str> = {
            let mut g: Vec<&str> = gvs.iter().map(|(g, _)| *g).filter(|g| !g.is_empty()).collect();
            g.dedup();
            g
        };
        let group_doc = |group: &str| {
            let versions: Vec<Value> = gvs
                .iter()
                .filter(|(g, _)| *g == group)
                .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
        };
        let api_group_list = json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups.iter().map(|g| group_doc(g)).collect::<Vec<_>>(),
        });
        let api_versions = json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        });
        let aggregated_core = json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": [{"metadata": {"creationTimestamp": null}, "versions": [aggregated_version("", "v1")]}],
        });
        let aggregated_groups = json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": groups.iter().map(|g| {
                let versions: Vec<Value> = gvs.iter().filter(|(gg, _)| gg == g).map(|(gg, v)| aggregated_version(gg, v)).collect();
                json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
            }).collect::<Vec<_>>(),
        });

        let mut documents = vec![("/api/v1".to_string(), resource_list("", "v1"))];
        for g in &groups {
            let mut doc = group_doc(g);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            documents.push((format!("/apis/{g}"), doc));
        }
        for (g, v) in gvs.iter().filter(|(g, _)| !g.is_empty()) {
            documents.push((format!("/apis/{g}/{v}"), resource_list(g, v)));
        }

        let (openapi_v3_index, openapi_v3) = openapi_v3(schemas, server_version);
        Discovery {
            api_versions,
            api_group_list,
            aggregated_core,
            aggregated_groups,
            documents,
            openapi_v2: openapi_v2(schemas, server_version),
            openapi_v3_index,
            openapi_v3,
        }
    }

    pub fn document(&self, path: &str) -> Option<&Value> {
        self.documents.iter().find(|(p, _)| p == path).map(|(_, d)| d)
    }
}

fn api_prefix(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    }
}

fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string"}, "uniqueItems": true})
}

/// Operations for one resource: enough for kubectl's query-parameter checks (dryRun and
/// fieldValidation support is read from the PATCH operation's parameters) and for tools that
/// walk the paths.
fn resource_paths(r: &Resource, definition: &str, ref_prefix: &str, v3: bool) -> Vec<(String, Value)> {
    let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
    let ns = if r.namespaced { "/namespaces/{namespace}" } else { "" };
    let collection = format!("{}{}/{}", api_prefix(r.group, r.version), ns, r.plural);
    let item = format!("{collection}/{{name}}");
    let body_ref = json!({"$ref": format!("{ref_prefix}{definition}")});
    let response = if v3 {
        json!({"200": {"description": "OK", "content": {"application/json": {"schema": body_ref}}}})
    } else {
        json!({"200": {"description": "OK", "schema": body_ref}})
    };
    let params = |extra: &[&str]| -> Vec<Value> {
        let mut p = vec![query_param("pretty", "If 'true', then the output is pretty printed.")];
        for name in extra {
            p.push(query_param(name, ""));
        }
        p
    };
    let op = |action: &str, verb: &str, extra: &[&str]| {
        json!({
            "operationId": format!("{verb}{}", r.kind),
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
            "parameters": params(extra),
            "responses": response,
        })
    };
    let write_params = ["dryRun", "fieldManager", "fieldValidation"];
    let mut patch_params = write_params.to_vec();
    patch_params.push("force");
    let collection_ops = json!({
        "get": op("list", "list", &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch", "timeoutSeconds"]),
        "post": op("post", "create", &write_params),
        "delete": op("deletecollection", "deletecollection", &["labelSelector", "fieldSelector", "dryRun"]),
    });
    let item_ops = json!({
        "get": op("get", "read", &[]),
        "put": op("put", "replace", &write_params),
        "patch": op("patch", "patch", &patch_params),
        "delete": op("delete", "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
    });
    let mut out = vec![(collection, collection_ops), (item.clone(), item_ops)];
    for &sub in r.subresources {
        let path = format!("{item}/{}", sub.name());
        let ops = match sub {
            Subresource::Binding => json!({"post": op("post", "createBinding", &write_params)}),
            Subresource::Token => json!({"post": op("post", "createToken", &write_params)}),
            Subresource::Finalize => json!({"put": op("put", "replace", &write_params)}),
            Subresource::Log => json!({"get": op("get", "read", &[
                "container", "follow", "previous", "sinceSeconds", "sinceTime", "timestamps", "tailLines", "limitBytes"])}),
            Subresource::Exec => {
                let params = ["command", "container", "stdin", "stdout", "stderr", "tty"];
                json!({"get": op("connect", "connectGet", &params), "post": op("connect", "connectPost", &params)})
            }
            Subresource::PortForward => {
                json!({"get": op("connect", "connectGet", &["ports"]), "post": op("connect", "connectPost", &["ports"])})
            }
            _ => {
                json!({"get": op("get", "read", &[]), "put": op("put", "replace", &write_params), "patch": op("patch", "patch", &patch_params)})
            }
        };
        out.push((path, ops));
    }
    out
}

fn openapi_v2(schemas: &Schemas, server_version: &str) -> Vec<u8> {
    let mut paths = Map::new();
    for r in RESOURCES {
        if let Some(def) = schemas.kind_definition(r.group, r.version, r.kind) {
            for (path, ops) in resource_paths(r, def, "#/definitions/", false) {
                paths.insert(path, ops);
            }
        }
    }
    let doc = json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": server_version},
        "paths": paths,
        "definitions": schemas.definitions(),
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

fn openapi_v3(schemas: &Schemas, server_version: &str) -> (Value, Vec<(String, String, Vec<u8>)>) {
    // One copy of the schemas with v3 references, shared by every group-version document.
    let components = serde_json::to_string(schemas.definitions())
        .unwrap_or_default()
        .replace("#/definitions/", "#/components/schemas/");
    let components: Value = serde_json::from_str(&components).unwrap_or(Value::Null);
    let mut index = Map::new();
    let mut docs = Vec::new();
    for (group, version) in group_versions() {
        let mut paths = Map::new();
        for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
            if let Some(def) = schemas.kind_definition(r.group, r.version, r.kind) {
                for (path, ops) in resource_paths(r, def, "#/components/schemas/", true) {
                    paths.insert(path, ops);
                }
            }
        }
        let doc = json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": server_version},
            "paths": paths,
            "components": {"schemas": components},
        });
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        let hash: String = sha2::Sha512::digest(&bytes)
            .iter()
            .take(32)
            .map(|b| format!("{b:02X}"))
            .collect();
        let rel = api_prefix(group, version).trim_start_matches('/').to_string();
        index.insert(
            rel.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{rel}?hash={hash}")}),
        );
        docs.push((rel, hash, bytes));
    }
    (json!({"paths": index}), docs)
}
