//! `meta.k8s.io/v1` Table rendering, so `kubectl get` prints the same columns as it does
//! against Kubernetes. One column list and one row function per kind.

use serde_json::{Value, json};

use super::resources::Resource;

struct Column {
    name: &'static str,
    kind: &'static str,
    /// 0: always shown; 1: only with `-o wide`.
    priority: u8,
}

const fn col(name: &'static str, kind: &'static str, priority: u8) -> Column {
    Column { name, kind, priority }
}

fn columns(r: &Resource) -> Vec<Column> {
    let name = col("Name", "string", 0);
    let age = col("Age", "string", 0);
    match (r.group, r.kind) {
        ("", "Namespace") => vec![name, col("Status", "string", 0), age],
        ("", "Pod") => vec![
            name,
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            age,
            col("IP", "string", 1),
            col("Node", "string", 1),
            col("Nominated Node", "string", 1),
            col("Readiness Gates", "string", 1),
        ],
        ("", "Service") => vec![
            name,
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            age,
            col("Selector", "string", 1),
        ],
        ("", "Endpoints") => vec![name, col("Endpoints", "string", 0), age],
        ("", "ConfigMap") => vec![name, col("Data", "integer", 0), age],
        ("", "Secret") => vec![name, col("Type", "string", 0), col("Data", "integer", 0), age],
        ("", "Node") => vec![
            name,
            col("Status", "string", 0),
            col("Roles", "string", 0),
            age,
            col("Version", "string", 0),
            col("Internal-IP", "string", 1),
            col("External-IP", "string", 1),
        ],
        ("", "ServiceAccount") => vec![name, col("Secrets", "string", 0), age],
        (_, "Event") => vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ],
        ("", "PersistentVolume") => vec![
            name,
            col("Capacity", "string", 0),
            col("Access Modes", "string", 0),
            col("Reclaim Policy", "string", 0),
            col("Status", "string", 0),
            col("Claim", "string", 0),
            col("StorageClass", "string", 0),
            col("VolumeAttributesClass", "string", 0),
            col("Reason", "string", 0),
            age,
        ],
        ("", "PersistentVolumeClaim") => vec![
            name,
            col("Status", "string", 0),
            col("Volume", "string", 0),
            col("Capacity", "string", 0),
            col("Access Modes", "string", 0),
            col("StorageClass", "string", 0),
            col("VolumeAttributesClass", "string", 0),
            age,
        ],
        ("apps", "Deployment") => vec![
            name,
            col("Ready", "string", 0),
            col("Up-to-date", "string", 0),
            col("Available", "string", 0),
            age,
            col("Containers", "string", 1),
            col("Images", "string", 1),
            col("Selector", "string", 1),
        ],
        ("apps", "ReplicaSet") => vec![
            name,
            col("Desired", "integer", 0),
            col("Current", "integer", 0),
            col("Ready", "integer", 0),
            age,
            col("Containers", "string", 1),
            col("Images", "string", 1),
            col("Selector", "string", 1),
        ],
        ("apps", "StatefulSet") => {
            vec![
                name,
                col("Ready", "string", 0),
                age,
                col("Containers", "string", 1),
                col("Images", "string", 1),
            ]
        }
        ("apps", "ControllerRevision") => {
            vec![name, col("Controller", "string", 0), col("Revision", "integer", 0), age]
        }
        ("apps", "DaemonSet") => vec![
            name,
            col("Desired", "integer", 0),
            col("Current", "integer", 0),
            col("Ready", "integer", 0),
            col("Up-to-date", "integer", 0),
            col("Available", "integer", 0),
            col("Node Selector", "string", 0),
            age,
        ],
        (_, "EndpointSlice") => {
            vec![
                name,
                col("AddressType", "string", 0),
                col("Ports", "string", 0),
                col("Endpoints", "string", 0),
                age,
            ]
        }
        (_, "Ingress") => vec![
            name,
            col("Class", "string", 0),
            col("Hosts", "string", 0),
            col("Address", "string", 0),
            col("Ports", "string", 0),
            age,
        ],
        (_, "IngressClass") => vec![
            name,
            col("Controller", "string", 0),
            col("Parameters", "string", 0),
            age,
        ],
        (_, "StorageClass") => vec![
            name,
            col("Provisioner", "string", 0),
            col("ReclaimPolicy", "string", 0),
            col("VolumeBindingMode", "string", 0),
            col("AllowVolumeExpansion", "string", 0),
            age,
        ],
        (_, "Lease") => vec![name, col("Holder", "string", 0), age],
        _ => vec![name, age],
    }
}

fn s<'a>(obj: &'a Value, path: &str) -> Option<&'a str> {
    obj.pointer(path).and_then(Value::as_str)
}

fn i(obj: &Value, path: &str) -> i64 {
    obj.pointer(path).and_then(Value::as_i64).unwrap_or(0)
}

fn len(obj: &Value, path: &str) -> usize {
    match obj.pointer(path) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn join(items: impl IntoIterator<Item = String>, sep: &str) -> String {
    items.into_iter().collect::<Vec<_>>().join(sep)
}

fn array<'a>(obj: &'a Value, path: &str) -> impl Iterator<Item = &'a Value> {
    obj.pointer(path).and_then(Value::as_array).into_iter().flatten()
}

fn selector(obj: &Value, path: &str) -> String {
    match obj.pointer(path).and_then(Value::as_object) {
        Some(m) => join(
            m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())),
            ",",
        ),
        None => String::new(),
    }
}

fn template_containers(obj: &Value) -> (String, String) {
    let containers: Vec<&Value> = array(obj, "/spec/template/spec/containers").collect();
    let names = join(
        containers.iter().map(|c| s(c, "/name").unwrap_or_default().to_string()),
        ",",
    );
    let images = join(
        containers
            .iter()
            .map(|c| s(c, "/image").unwrap_or_default().to_string()),
        ",",
    );
    (names, images)
}

/// Kubernetes' short human durations (`5s`, `3m2s`, `10h`, `4d`, `2y`), from
/// apimachinery's `HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(obj: &Value, path: &str, now: i64) -> String {
    match s(obj, path).and_then(super::time::parse_rfc3339) {
        Some(t) => human_duration(now - t),
        None => "<unknown>".into(),
    }
}

fn service_ports(obj: &Value) -> String {
    or_none(join(
        array(obj, "/spec/ports").map(|p| {
            let port = i(p, "/port");
            let proto = s(p, "/protocol").unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{port}:{np}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        }),
        ",",
    ))
}

fn service_external(obj: &Value) -> String {
    let mut ips: Vec<String> = array(obj, "/spec/externalIPs")
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let ty = s(obj, "/spec/type").unwrap_or("ClusterIP");
    match ty {
        "ExternalName" => s(obj, "/spec/externalName").unwrap_or_default().to_string(),
        "LoadBalancer" => {
            ips.extend(array(obj, "/status/loadBalancer/ingress").filter_map(|i| {
                i.get("ip")
                    .or(i.get("hostname"))
                    .and_then(Value::as_str)
                    .map(String::from)
            }));
            if ips.is_empty() {
                "<pending>".into()
            } else {
                ips.join(",")
            }
        }
        _ => or_none(ips.join(",")),
    }
}

fn pod_cells(obj: &Value) -> (String, String, i64) {
    let statuses: Vec<&Value> = array(obj, "/status/containerStatuses").collect();
    let total = len(obj, "/spec/containers");
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
    let mut reason = s(obj, "/status/reason")
        .or(s(obj, "/status/phase"))
        .unwrap_or("Pending")
        .to_string();
    for c in &statuses {
        if let Some(r) = s(c, "/state/waiting/reason").or(s(c, "/state/terminated/reason")) {
            reason = r.to_string();
        }
    }
    if obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null()) {
        reason = "Terminating".into();
    }
    (format!("{ready}/{total}"), reason, restarts)
}

fn cells(r: &Resource, obj: &Value, now: i64) -> Vec<Value> {
    let name = json!(s(obj, "/metadata/name").unwrap_or_default());
    let created = age(obj, "/metadata/creationTimestamp", now);
    match (r.group, r.kind) {
        ("", "Namespace") => vec![name, json!(s(obj, "/status/phase").unwrap_or("Active")), json!(created)],
        ("", "Pod") => {
            let (ready, status, restarts) = pod_cells(obj);
            let gates = len(obj, "/spec/readinessGates");
            vec![
                name,
                json!(ready),
                json!(status),
                json!(restarts.to_string()),
                json!(created),
                json!(s(obj, "/status/podIP").unwrap_or("<none>")),
                json!(s(obj, "/spec/nodeName").unwrap_or("<none>")),
                json!(s(obj, "/status/nominatedNodeName").unwrap_or("<none>")),
                json!(if gates == 0 {
                    "<none>".to_string()
                } else {
                    format!("0/{gates}")
                }),
            ]
        }
        ("", "Service") => vec![
            name,
            json!(s(obj, "/spec/type").unwrap_or("ClusterIP")),
            json!(s(obj, "/spec/clusterIP").unwrap_or("<none>")),
            json!(service_external(obj)),
            json!(service_ports(obj)),
            json!(created),
            json!(or_none(selector(obj, "/spec/selector"))),
        ],
        ("", "Endpoints") => {
            let eps: Vec<String> = array(obj, "/subsets")
                .flat_map(|sub| {
                    let ports: Vec<i64> = array(sub, "/ports").map(|p| i(p, "/port")).collect();
                    array(sub, "/addresses")
                        .flat_map(move |a| {
                            let ip = s(a, "/ip").unwrap_or_default().to_string();
                            let ports = ports.clone();
                            if ports.is_empty() {
                                vec![ip]
                            } else {
                                ports.iter().map(|p| format!("{ip}:{p}")).collect()
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            vec![name, json!(or_none(eps.join(","))), json!(created)]
        }
        ("", "ConfigMap") => vec![name, json!(len(obj, "/data") + len(obj, "/binaryData")), json!(created)],
        ("", "Secret") => {
            vec![
                name,
                json!(s(obj, "/type").unwrap_or("Opaque")),
                json!(len(obj, "/data")),
                json!(created),
            ]
        }
        ("", "Node") => {
            let ready = array(obj, "/status/conditions")
                .find(|c| s(c, "/type") == Some("Ready"))
                .map(|c| {
                    if s(c, "/status") == Some("True") {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if obj.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = obj
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                .collect();
            let addr = |ty: &str| {
                array(obj, "/status/addresses")
                    .find(|a| s(a, "/type") == Some(ty))
                    .and_then(|a| s(a, "/address"))
                    .unwrap_or("<none>")
                    .to_string()
            };
            vec![
                name,
                json!(status),
                json!(or_none(roles.join(","))),
                json!(created),
                json!(s(obj, "/status/nodeInfo/kubeletVersion").unwrap_or_default()),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
            ]
        }
        ("", "ServiceAccount") => vec![name, json!(len(obj, "/secrets").to_string()), json!(created)],
        (_, "Event") => {
            let last = s(obj, "/lastTimestamp")
                .or(s(obj, "/eventTime"))
                .or(s(obj, "/deprecatedLastTimestamp"))
                .or(s(obj, "/metadata/creationTimestamp"))
                .and_then(super::time::parse_rfc3339)
                .map(|t| human_duration(now - t))
                .unwrap_or_else(|| "<unknown>".into());
            let regarding = obj
                .get("involvedObject")
                .or(obj.get("regarding"))
                .cloned()
                .unwrap_or(Value::Null);
            let object = format!(
                "{}/{}",
                s(&regarding, "/kind").unwrap_or_default().to_lowercase(),
                s(&regarding, "/name").unwrap_or_default()
            );
            vec![
                json!(last),
                json!(s(obj, "/type").unwrap_or_default()),
                json!(s(obj, "/reason").unwrap_or_default()),
                json!(object),
                json!(s(obj, "/message").or(s(obj, "/note")).unwrap_or_default()),
            ]
        }
        ("", "PersistentVolume") => {
            let claim = match (s(obj, "/spec/claimRef/namespace"), s(obj, "/spec/claimRef/name")) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => String::new(),
            };
            vec![
                name,
                json!(s(obj, "/spec/capacity/storage").unwrap_or_default()),
                json!(access_modes(obj, "/spec/accessModes")),
                json!(s(obj, "/spec/persistentVolumeReclaimPolicy").unwrap_or("Retain")),
                json!(s(obj, "/status/phase").unwrap_or("Pending")),
                json!(claim),
                json!(s(obj, "/spec/storageClassName").unwrap_or_default()),
                json!(s(obj, "/spec/volumeAttributesClassName").unwrap_or("<unset>")),
                json!(s(obj, "/status/reason").unwrap_or_default()),
                json!(created),
            ]
        }
        ("", "PersistentVolumeClaim") => vec![
            name,
            json!(s(obj, "/status/phase").unwrap_or("Pending")),
            json!(s(obj, "/spec/volumeName").unwrap_or_default()),
            json!(s(obj, "/status/capacity/storage").unwrap_or_default()),
            json!(access_modes(obj, "/status/accessModes")),
            json!(s(obj, "/spec/storageClassName").unwrap_or("<unset>")),
            json!(s(obj, "/spec/volumeAttributesClassName").unwrap_or("<unset>")),
            json!(created),
        ],
        ("apps", "Deployment") => {
            let (containers, images) = template_containers(obj);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(obj, "/status/readyReplicas"),
                    i(obj, "/spec/replicas")
                )),
                json!(i(obj, "/status/updatedReplicas")),
                json!(i(obj, "/status/availableReplicas")),
                json!(created),
                json!(containers),
                json!(images),
                json!(selector(obj, "/spec/selector/matchLabels")),
            ]
        }
        ("apps", "ReplicaSet") => {
            let (containers, images) = template_containers(obj);
            vec![
                name,
                json!(i(obj, "/spec/replicas")),
                json!(i(obj, "/status/replicas")),
                json!(i(obj, "/status/readyReplicas")),
                json!(created),
                json!(containers),
                json!(images),
                json!(selector(obj, "/spec/selector/matchLabels")),
            ]
        }
        ("apps", "StatefulSet") => {
            let (containers, images) = template_containers(obj);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(obj, "/status/readyReplicas"),
                    i(obj, "/spec/replicas")
                )),
                json!(created),
                json!(containers),
                json!(images),
            ]
        }
        ("apps", "ControllerRevision") => {
            // `<kind>.<group>/<name>` of the controlling owner, as kubectl prints it.
            let controller = array(obj, "/metadata/ownerReferences")
                .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
                .map(|o| {
                    let kind = s(o, "/kind").unwrap_or_default().to_lowercase();
                    let group = s(o, "/apiVersion").unwrap_or_default();
                    let group = group.rsplit_once('/').map(|(g, _)| format!(".{g}")).unwrap_or_default();
                    format!("{kind}{group}/{}", s(o, "/name").unwrap_or_default())
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(controller), json!(i(obj, "/revision")), json!(created)]
        }
        ("apps", "DaemonSet") => vec![
            name,
            json!(i(obj, "/status/desiredNumberScheduled")),
            json!(i(obj, "/status/currentNumberScheduled")),
            json!(i(obj, "/status/numberReady")),
            json!(i(obj, "/status/updatedNumberScheduled")),
            json!(i(obj, "/status/numberAvailable")),
            json!(or_none(selector(obj, "/spec/template/spec/nodeSelector"))),
            json!(created),
        ],
        (_, "EndpointSlice") => {
            let ports = join(array(obj, "/ports").map(|p| i(p, "/port").to_string()), ",");
            let addrs: Vec<String> = array(obj, "/endpoints")
                .flat_map(|e| {
                    array(e, "/addresses")
                        .filter_map(|a| a.as_str().map(String::from))
                        .collect::<Vec<_>>()
                })
                .collect();
            vec![
                name,
                json!(s(obj, "/addressType").unwrap_or_default()),
                json!(or_none(ports)),
                json!(or_none(addrs.join(","))),
                json!(created),
            ]
        }
        (_, "Ingress") => {
            let hosts = join(
                array(obj, "/spec/rules").filter_map(|r| s(r, "/host").map(String::from)),
                ",",
            );
            let addrs = join(
                array(obj, "/status/loadBalancer/ingress").filter_map(|i| {
                    i.get("ip")
                        .or(i.get("hostname"))
                        .and_then(Value::as_str)
                        .map(String::from)
                }),
                ",",
            );
            let ports = if len(obj, "/spec/tls") > 0 { "80, 443" } else { "80" };
            vec![
                name,
                json!(s(obj, "/spec/ingressClassName").unwrap_or("<none>")),
                json!(if hosts.is_empty() { "*".to_string() } else { hosts }),
                json!(addrs),
                json!(ports),
                json!(created),
            ]
        }
        (_, "IngressClass") => {
            let params = match obj.pointer("/spec/parameters") {
                Some(p) if p.is_object() => {
                    format!(
                        "{}/{}",
                        s(p, "/kind").unwrap_or_default(),
                        s(p, "/name").unwrap_or_default()
                    )
                }
                _ => "<none>".into(),
            };
            vec![
                name,
                json!(s(obj, "/spec/controller").unwrap_or_default()),
                json!(params),
                json!(created),
            ]
        }
        (_, "StorageClass") => {
            let mut n = s(obj, "/metadata/name").unwrap_or_default().to_string();
            if s(
                obj,
                "/metadata/annotations/storageclass.kubernetes.io~1is-default-class",
            ) == Some("true")
            {
                n.push_str(" (default)");
            }
            vec![
                json!(n),
                json!(s(obj, "/provisioner").unwrap_or_default()),
                json!(s(obj, "/reclaimPolicy").unwrap_or("Delete")),
                json!(s(obj, "/volumeBindingMode").unwrap_or("Immediate")),
                json!(
                    obj.get("allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                        .to_string()
                ),
                json!(created),
            ]
        }
        (_, "Lease") => vec![
            name,
            json!(s(obj, "/spec/holderIdentity").unwrap_or_default()),
            json!(created),
        ],
        _ => vec![name, json!(created)],
    }
}

fn access_modes(obj: &Value, path: &str) -> String {
    join(
        array(obj, path).filter_map(Value::as_str).map(|m| {
            match m {
                "ReadWriteOnce" => "RWO",
                "ReadOnlyMany" => "ROX",
                "ReadWriteMany" => "RWX",
                "ReadWriteOncePod" => "RWOP",
                other => other,
            }
            .to_string()
        }),
        ",",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// A Table of `objects`; `with_columns = false` leaves out the column definitions (watch
/// events after the first).
pub fn table(
    r: &Resource,
    objects: &[&Value],
    include: IncludeObject,
    list_meta: Value,
    with_columns: bool,
    now: i64,
) -> Value {
    let column_definitions: Vec<Value> = if with_columns {
        columns(r)
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": c.kind,
                    "format": if c.name == "Name" { "name" } else { "" },
                    "description": "",
                    "priority": c.priority,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let mut row = json!({"cells": cells(r, obj, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Object => row["object"] = (*obj).clone(),
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_duration_matches_kubectl_style() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(182), "3m2s");
        assert_eq!(human_duration(60 * 60), "60m");
        assert_eq!(human_duration(4 * 3600 + 60), "4h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400), "3d");
    }

    #[test]
    fn service_table_has_kubernetes_columns_and_ports() {
        let r = super::super::resources::find("", "v1", "services").unwrap();
        let svc = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.5",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        let t = table(r, &[&svc], IncludeObject::None, json!({}), true, 0);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names[..6],
            ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age"]
        );
        assert_eq!(t["rows"][0]["cells"][4], "80:30080/TCP");
    }
}
