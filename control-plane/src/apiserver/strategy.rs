//! Per-kind behaviour of the generic registry, as Kubernetes' REST strategies: defaulting,
//! validation on create and update, immutable fields and what an update may not touch. Pure
//! functions of objects; storage and allocation stay in the handler.

use serde_json::{Map, Value, json};

use super::resources::Resource;
use super::status::FieldCause;

type Causes = Vec<FieldCause>;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    name_ok && prefix.is_none_or(is_dns_subdomain)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

const DNS_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS_1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const DNS_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

#[derive(Clone, Copy)]
enum NameRule {
    Label,
    Label1035,
    Subdomain,
    /// Event names and similar: anything path-safe.
    PathSegment,
}

fn name_rule(r: &Resource) -> NameRule {
    match r.kind {
        "Namespace" => NameRule::Label,
        "Service" => NameRule::Label1035,
        "Event" => NameRule::PathSegment,
        _ => NameRule::Subdomain,
    }
}

fn check_name(field: &str, name: &str, rule: NameRule, causes: &mut Causes) {
    let ok = match rule {
        NameRule::Label => is_dns_label(name),
        NameRule::Label1035 => is_dns_1035_label(name),
        NameRule::Subdomain => is_dns_subdomain(name),
        NameRule::PathSegment => {
            !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('%')
        }
    };
    if !ok {
        let msg = match rule {
            NameRule::Label => DNS_LABEL_MSG,
            NameRule::Label1035 => DNS_1035_MSG,
            NameRule::Subdomain => DNS_SUBDOMAIN_MSG,
            NameRule::PathSegment => "may not be '.' or '..' and may not contain '/' or '%'",
        };
        causes.push(FieldCause::invalid(field, name, msg));
    }
}

fn str_at<'a>(obj: &'a Value, path: &str) -> Option<&'a str> {
    obj.pointer(path).and_then(Value::as_str)
}

fn ensure_object<'a>(obj: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !obj.get(key).is_some_and(Value::is_object) {
        obj[key] = json!({});
    }
    obj[key].as_object_mut().expect("just made an object")
}

fn default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj.insert(key.to_string(), value);
    }
}

/// Finalizers Kubernetes' StorageObjectInUseProtection admission puts on new claims and
/// volumes; the volume controller removes them once nothing uses the object.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";

/// Create-only admission: the in-use protection finalizer of claims and volumes.
pub fn admit_new(r: &Resource, obj: &mut Value) {
    let finalizer = match (r.group, r.kind) {
        ("", "PersistentVolumeClaim") => PVC_PROTECTION,
        ("", "PersistentVolume") => PV_PROTECTION,
        _ => return,
    };
    let meta = ensure_object(obj, "metadata");
    let list = meta.entry("finalizers").or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().expect("just made an array");
    if !list.iter().any(|f| f == finalizer) {
        list.push(json!(finalizer));
    }
}

/// The annotation that marks a StorageClass as the default (DefaultStorageClass admission).
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";

/// The class a new PVC without `storageClassName` gets, as Kubernetes' DefaultStorageClass
/// admission picks it: among classes annotated default, the newest (then the first by name).
pub fn default_storage_class<'a>(classes: impl IntoIterator<Item = &'a Value>) -> Option<String> {
    classes
        .into_iter()
        .filter(|c| {
            str_at(
                c,
                &format!("/metadata/annotations/{}", DEFAULT_CLASS_ANNOTATION.replace('/', "~1")),
            ) == Some("true")
        })
        .filter_map(|c| {
            Some((
                str_at(c, "/metadata/creationTimestamp").unwrap_or(""),
                str_at(c, "/metadata/name")?,
            ))
        })
        .max_by(|(ta, na), (tb, nb)| ta.cmp(tb).then_with(|| nb.cmp(na)))
        .map(|(_, name)| name.to_string())
}

/// Whether a new PVC asks for the default class: `storageClassName` absent or null (an empty
/// string explicitly asks for no class).
pub fn wants_default_class(pvc: &Value) -> bool {
    pvc.pointer("/spec/storageClassName").is_none_or(Value::is_null)
}

/// Fill in Kubernetes' defaults for a new or updated object.
pub fn apply_defaults(r: &Resource, obj: &mut Value) {
    match (r.group, r.kind) {
        ("", "Namespace") => {
            let spec = ensure_object(obj, "spec");
            default(spec, "finalizers", json!(["kubernetes"]));
            let status = ensure_object(obj, "status");
            default(status, "phase", json!("Active"));
        }
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            let status = ensure_object(obj, "status");
            default(status, "phase", json!("Pending"));
            if obj.pointer("/status/qosClass").is_none() {
                let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
                obj["status"]["qosClass"] = json!(qos);
            }
        }
        ("", "Service") => default_service(obj),
        ("", "Secret") => {
            let o = obj.as_object_mut().expect("objects are JSON objects");
            default(o, "type", json!("Opaque"));
            // stringData is write-only: merged into data, base64-encoded.
            if let Some(Value::Object(string_data)) = o.remove("stringData") {
                use base64::Engine;
                let data = o.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                for (k, v) in string_data {
                    let text = v.as_str().unwrap_or_default();
                    data[k.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                default(spec, "volumeMode", json!("Filesystem"));
            }
            let status = ensure_object(obj, "status");
            default(status, "phase", json!("Pending"));
        }
        ("", "PersistentVolume") => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
                default(spec, "volumeMode", json!("Filesystem"));
            }
            let status = ensure_object(obj, "status");
            default(status, "phase", json!("Pending"));
        }
        ("", "ServiceAccount") | ("", "ConfigMap") | ("", "Endpoints") | ("", "Event") | ("", "Node") => {}
        ("apps", kind) => default_workload(kind, obj),
        ("storage.k8s.io", "StorageClass") => {
            let o = obj.as_object_mut().expect("objects are JSON objects");
            default(o, "reclaimPolicy", json!("Delete"));
            default(o, "volumeBindingMode", json!("Immediate"));
        }
        ("networking.k8s.io", "Ingress") => {
            let status = ensure_object(obj, "status");
            default(status, "loadBalancer", json!({}));
        }
        _ => {}
    }
}

/// Admission settings applied to new objects (kube-apiserver's admission plugins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// DefaultTolerationSeconds: for `node.kubernetes.io/not-ready:NoExecute`.
    pub not_ready_toleration_seconds: u32,
    /// DefaultTolerationSeconds: for `node.kubernetes.io/unreachable:NoExecute`.
    pub unreachable_toleration_seconds: u32,
}

impl Default for Admission {
    fn default() -> Admission {
        Admission {
            not_ready_toleration_seconds: 300,
            unreachable_toleration_seconds: 300,
        }
    }
}

pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Admission on create only (an update never gains these): DefaultTolerationSeconds gives every
/// pod that does not already tolerate them `not-ready` and `unreachable` NoExecute tolerations,
/// so a node failure evicts its pods after a bounded time rather than at once.
pub fn admit_create(r: &Resource, obj: &mut Value, admission: &Admission) {
    if (r.group, r.kind) != ("", "Pod") {
        return;
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    // `tolerations: null` (an empty Helm value) is no tolerations, not something to skip.
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    if tolerations.is_null() {
        *tolerations = json!([]);
    }
    if !tolerations.is_array() {
        // Left for validation to reject.
        return;
    }
    let list = tolerations.as_array_mut().expect("checked");
    for (key, seconds) in [
        (TAINT_NOT_READY, admission.not_ready_toleration_seconds),
        (TAINT_UNREACHABLE, admission.unreachable_toleration_seconds),
    ] {
        // As the Kubernetes plugin: any toleration for this key (or for every key) with a
        // NoExecute or empty effect counts, whatever its operator or seconds.
        let tolerated = list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str).unwrap_or_default();
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or_default();
            (k.is_empty() || k == key) && (effect.is_empty() || effect == "NoExecute")
        });
        if !tolerated {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}));
        }
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let mut any = false;
    let mut all_guaranteed = !containers.is_empty();
    for c in &containers {
        let req = c.pointer("/resources/requests").and_then(Value::as_object);
        let lim = c.pointer("/resources/limits").and_then(Value::as_object);
        if req.is_some_and(|m| !m.is_empty()) || lim.is_some_and(|m| !m.is_empty()) {
            any = true;
        }
        let guaranteed = lim.is_some_and(|l| {
            ["cpu", "memory"].iter().all(|k| l.contains_key(*k))
                && req.is_none_or(|r| r.iter().all(|(k, v)| l.get(k) == Some(v)))
        });
        all_guaranteed &= guaranteed;
    }
    if all_guaranteed {
        "Guaranteed"
    } else if any {
        "Burstable"
    } else {
        "BestEffort"
    }
}

fn default_container(c: &mut Value) {
    let Some(c) = c.as_object_mut() else { return };
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    if c.get("imagePullPolicy").is_none() {
        let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
        let last = image.rsplit('/').next().unwrap_or_default();
        let latest = !last.contains(':') && !image.contains('@') || last.ends_with(":latest");
        c.insert(
            "imagePullPolicy".into(),
            json!(if latest { "Always" } else { "IfNotPresent" }),
        );
    }
    default(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    let Some(s) = spec.as_object_mut() else { return };
    default(s, "restartPolicy", json!("Always"));
    default(s, "terminationGracePeriodSeconds", json!(30));
    default(s, "dnsPolicy", json!("ClusterFirst"));
    default(s, "securityContext", json!({}));
    default(s, "schedulerName", json!("default-scheduler"));
    default(s, "enableServiceLinks", json!(true));
    default(s, "serviceAccountName", json!("default"));
    if s.get("serviceAccount").is_none() {
        let sa = s["serviceAccountName"].clone();
        s.insert("serviceAccount".into(), sa);
    }
    for key in ["containers", "initContainers"] {
        if let Some(list) = s.get_mut(key).and_then(Value::as_array_mut) {
            list.iter_mut().for_each(default_container);
        }
    }
}

fn default_workload(kind: &str, obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if kind != "DaemonSet" {
        default(spec, "replicas", json!(1));
    }
    default(spec, "revisionHistoryLimit", json!(10));
    match kind {
        "Deployment" => {
            default_update_strategy(spec, "strategy", json!({"maxUnavailable": "25%", "maxSurge": "25%"}));
            default(spec, "progressDeadlineSeconds", json!(600));
        }
        "StatefulSet" => {
            default(spec, "podManagementPolicy", json!("OrderedReady"));
            default_update_strategy(spec, "updateStrategy", json!({"partition": 0}));
            default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            if let Some(templates) = spec.get_mut("volumeClaimTemplates").and_then(Value::as_array_mut) {
                for t in templates.iter_mut() {
                    if let Some(ts) = t.get_mut("spec").and_then(Value::as_object_mut) {
                        default(ts, "volumeMode", json!("Filesystem"));
                    }
                    if let Some(t) = t.as_object_mut() {
                        t.insert("apiVersion".into(), json!("v1"));
                        t.insert("kind".into(), json!("PersistentVolumeClaim"));
                        let status = t.entry("status").or_insert_with(|| json!({}));
                        if let Some(status) = status.as_object_mut() {
                            default(status, "phase", json!("Pending"));
                        }
                    }
                }
            }
        }
        "DaemonSet" => {
            default_update_strategy(spec, "updateStrategy", json!({"maxUnavailable": 1, "maxSurge": 0}));
        }
        _ => {}
    }
    if let Some(pod_spec) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        default_pod_spec(pod_spec);
    }
    if let Some(template) = spec.get_mut("template").and_then(Value::as_object_mut) {
        let meta = template.entry("metadata").or_insert_with(|| json!({}));
        if let Some(meta) = meta.as_object_mut() {
            meta.remove("creationTimestamp");
        }
    }
    // Workloads start with an empty status, as Kubernetes returns them.
    ensure_object(obj, "status");
}

/// `type` defaults to RollingUpdate, and a RollingUpdate strategy gets each missing
/// parameter of `rolling` (an explicit `strategy: {}` is defaulted too, as in Kubernetes).
fn default_update_strategy(spec: &mut Map<String, Value>, field: &str, rolling: Value) {
    let strategy = spec.entry(field).or_insert_with(|| json!({}));
    if !strategy.is_object() {
        *strategy = json!({});
    }
    let strategy = strategy.as_object_mut().expect("just made an object");
    default(strategy, "type", json!("RollingUpdate"));
    if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
        let params = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
        if !params.is_object() {
            *params = json!({});
        }
        if let (Some(params), Some(defaults)) = (params.as_object_mut(), rolling.as_object()) {
            for (k, v) in defaults {
                default(params, k, v.clone());
            }
        }
    }
}

fn default_service(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    default(spec, "type", json!("ClusterIP"));
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty != "ExternalName" {
        default(spec, "sessionAffinity", json!("None"));
        default(spec, "internalTrafficPolicy", json!("Cluster"));
        default(spec, "ipFamilyPolicy", json!("SingleStack"));
        default(spec, "ipFamilies", json!(["IPv4"]));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if ty == "LoadBalancer" {
        default(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
            if p.get("targetPort").is_none_or(Value::is_null) {
                let port = p.get("port").cloned().unwrap_or(Value::Null);
                p.insert("targetPort".into(), port);
            }
        }
    }
    let status = ensure_object(obj, "status");
    default(status, "loadBalancer", json!({}));
}

/// Validate metadata common to every kind.
pub fn validate_metadata(r: &Resource, obj: &Value, causes: &mut Causes) {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    if name.is_empty() {
        causes.push(FieldCause::required("metadata.name"));
    } else {
        check_name("metadata.name", name, name_rule(r), causes);
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(FieldCause::invalid("metadata.labels", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            match v.as_str() {
                Some(v) if is_label_value(v) => {}
                _ => causes.push(FieldCause::invalid(
                    "metadata.labels",
                    v.as_str().unwrap_or_default(),
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
            }
        }
    }
    if let Some(ann) = obj.pointer("/metadata/annotations").and_then(Value::as_object) {
        let total: usize = ann.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len)).sum();
        if total > 256 * 1024 {
            causes.push(FieldCause {
                reason: "FieldValueTooLong",
                field: "metadata.annotations".into(),
                message: format!("Too long: may not be more than 262144 bytes (got {total})"),
            });
        }
        for k in ann.keys().filter(|k| !is_qualified_name(k)) {
            causes.push(FieldCause::invalid(
                "metadata.annotations",
                k,
                "name part must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
    }
}

fn validate_containers(field: &str, containers: Option<&Value>, required: bool, causes: &mut Causes) {
    let list = containers.and_then(Value::as_array);
    if required && list.is_none_or(|l| l.is_empty()) {
        causes.push(FieldCause::required(field));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in list.into_iter().flatten().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            causes.push(FieldCause::required(format!("{field}[{i}].name")));
        } else if !is_dns_label(name) {
            causes.push(FieldCause::invalid(format!("{field}[{i}].name"), name, DNS_LABEL_MSG));
        } else if !seen.insert(name.to_string()) {
            causes.push(FieldCause::duplicate(format!("{field}[{i}].name"), name));
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            causes.push(FieldCause::required(format!("{field}[{i}].image")));
        }
        for (j, p) in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_port(p, "containerPort", &format!("{field}[{i}].ports[{j}]"), causes);
        }
    }
}

/// A port number field (1-65535) and the protocol of one container or Service port.
fn check_port(p: &Value, number_field: &str, path: &str, causes: &mut Causes) {
    let port = p.get(number_field).and_then(Value::as_i64).unwrap_or(0);
    if !(1..=65535).contains(&port) {
        causes.push(FieldCause::invalid(
            format!("{path}.{number_field}"),
            port,
            "must be between 1 and 65535, inclusive",
        ));
    }
    if let Some(proto) = p.get("protocol").and_then(Value::as_str)
        && !["TCP", "UDP", "SCTP"].contains(&proto)
    {
        causes.push(FieldCause::not_supported(
            format!("{path}.protocol"),
            proto,
            &["SCTP", "TCP", "UDP"],
        ));
    }
}

fn validate_pod_spec(field: &str, spec: Option<&Value>, causes: &mut Causes) {
    let Some(spec) = spec else {
        causes.push(FieldCause::required(field));
        return;
    };
    validate_containers(&format!("{field}.containers"), spec.get("containers"), true, causes);
    validate_containers(
        &format!("{field}.initContainers"),
        spec.get("initContainers"),
        false,
        causes,
    );
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&policy)
    {
        causes.push(FieldCause::not_supported(
            format!("{field}.restartPolicy"),
            policy,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn validate_selector_matches_template(obj: &Value, causes: &mut Causes) {
    let selector = obj.pointer("/spec/selector");
    let has_terms = selector.is_some_and(|s| {
        s.get("matchLabels")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
            || s.get("matchExpressions")
                .and_then(Value::as_array)
                .is_some_and(|m| !m.is_empty())
    });
    if !has_terms {
        causes.push(FieldCause::required("spec.selector"));
        return;
    }
    let labels = obj
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    let matches = selector
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector
            .and_then(|s| s.get("matchExpressions"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .all(|e| {
                let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
                let values: Vec<&str> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let actual = labels.get(key).and_then(Value::as_str);
                match e.get("operator").and_then(Value::as_str).unwrap_or_default() {
                    "In" => actual.is_some_and(|a| values.contains(&a)),
                    "NotIn" => actual.is_none_or(|a| !values.contains(&a)),
                    "Exists" => actual.is_some(),
                    "DoesNotExist" => actual.is_none(),
                    _ => false,
                }
            });
    if !matches {
        let shown = serde_json::to_string(&labels).unwrap_or_default();
        causes.push(FieldCause::invalid(
            "spec.template.metadata.labels",
            shown,
            "`selector` does not match template `labels`",
        ));
    }
}

fn validate_service(obj: &Value, causes: &mut Causes) {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    let ty = spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP");
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !types.contains(&ty) {
        causes.push(FieldCause::not_supported("spec.type", ty, &types));
        return;
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let ports: Vec<&Value> = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if ports.is_empty() && !headless && ty != "ExternalName" {
        causes.push(FieldCause::required("spec.ports"));
    }
    if ty == "ExternalName"
        && spec
            .get("externalName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        causes.push(FieldCause::required("spec.externalName"));
    }
    if headless && (ty == "NodePort" || ty == "LoadBalancer") {
        causes.push(FieldCause::invalid(
            "spec.clusterIP",
            "None",
            format!("may not be set to 'None' for {ty} services"),
        ));
    }
    if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str)
        && !ip.is_empty()
        && ip != "None"
        && !super::allocator::in_service_cidr(ip)
    {
        causes.push(FieldCause::invalid(
            "spec.clusterIP",
            ip,
            "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        check_port(p, "port", &format!("spec.ports[{i}]"), causes);
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            causes.push(FieldCause::required(format!("spec.ports[{i}].name")));
        } else if !name.is_empty() && !names.insert(name.to_string()) {
            causes.push(FieldCause::duplicate(format!("spec.ports[{i}].name"), name));
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64).filter(|np| *np != 0) {
            if ty == "ClusterIP" || ty == "ExternalName" {
                causes.push(FieldCause::forbidden(
                    format!("spec.ports[{i}].nodePort"),
                    format!("may not be used when `type` is '{ty}'"),
                ));
            } else if !super::allocator::NODE_PORTS.contains(&np) {
                causes.push(FieldCause::invalid(
                    format!("spec.ports[{i}].nodePort"),
                    np,
                    "provided port is not in the valid range. The range of valid ports is 30000-32767",
                ));
            }
        }
    }
    for (field, allowed) in [
        ("sessionAffinity", &["ClientIP", "None"][..]),
        ("externalTrafficPolicy", &["Cluster", "Local"][..]),
        ("internalTrafficPolicy", &["Cluster", "Local"][..]),
    ] {
        if let Some(v) = spec.get(field).and_then(Value::as_str)
            && !allowed.contains(&v)
        {
            causes.push(FieldCause::not_supported(format!("spec.{field}"), v, allowed));
        }
    }
}

fn validate_data_keys(obj: &Value, field: &str, causes: &mut Causes) {
    for (k, _) in obj.get(field).and_then(Value::as_object).into_iter().flatten() {
        let ok = !k.is_empty() && k.len() <= 253 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            causes.push(FieldCause::invalid(format!("{field}[{k}]"), k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
        }
    }
}

/// Validate a whole object (create, and update after `validate_update`).
pub fn validate(r: &Resource, obj: &Value) -> Causes {
    let mut causes = Vec::new();
    validate_metadata(r, obj, &mut causes);
    match (r.group, r.kind) {
        ("", "Pod") => validate_pod_spec("spec", obj.get("spec"), &mut causes),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            if obj.get("spec").is_none() {
                causes.push(FieldCause::required("spec"));
            } else {
                validate_selector_matches_template(obj, &mut causes);
                validate_pod_spec("spec.template.spec", obj.pointer("/spec/template/spec"), &mut causes);
                if let Some(n) = obj.pointer("/spec/replicas").and_then(Value::as_i64)
                    && n < 0
                {
                    causes.push(FieldCause::invalid(
                        "spec.replicas",
                        n,
                        "must be greater than or equal to 0",
                    ));
                }
                if r.kind == "Deployment"
                    && let Some(t) = obj.pointer("/spec/strategy/type").and_then(Value::as_str)
                    && !["Recreate", "RollingUpdate"].contains(&t)
                {
                    causes.push(FieldCause::not_supported(
                        "spec.strategy.type",
                        t,
                        &["Recreate", "RollingUpdate"],
                    ));
                }
            }
        }
        ("", "Service") => validate_service(obj, &mut causes),
        ("", "ConfigMap") => {
            validate_data_keys(obj, "data", &mut causes);
            validate_data_keys(obj, "binaryData", &mut causes);
        }
        ("", "Secret") => {
            validate_data_keys(obj, "data", &mut causes);
            use base64::Engine;
            for (k, v) in obj.get("data").and_then(Value::as_object).into_iter().flatten() {
                let ok = v
                    .as_str()
                    .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
                if !ok {
                    causes.push(FieldCause::invalid(
                        format!("data[{k}]"),
                        "<secret>",
                        "must be base64-encoded",
                    ));
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            if obj
                .pointer("/spec/accessModes")
                .and_then(Value::as_array)
                .is_none_or(|a| a.is_empty())
            {
                causes.push(FieldCause::required("spec.accessModes"));
            }
            if obj.pointer("/spec/resources/requests/storage").is_none() && obj.pointer("/spec/dataSourceRef").is_none()
            {
                causes.push(FieldCause::required("spec.resources[storage]"));
            }
        }
        ("", "PersistentVolume") => {
            if obj.pointer("/spec/capacity/storage").is_none() {
                causes.push(FieldCause::required("spec.capacity"));
            }
            if obj
                .pointer("/spec/accessModes")
                .and_then(Value::as_array)
                .is_none_or(|a| a.is_empty())
            {
                causes.push(FieldCause::required("spec.accessModes"));
            }
            let sources = [
                "hostPath",
                "local",
                "nfs",
                "csi",
                "iscsi",
                "fc",
                "rbd",
                "cephfs",
                "azureDisk",
                "azureFile",
                "gcePersistentDisk",
                "awsElasticBlockStore",
            ];
            let spec = obj.get("spec").and_then(Value::as_object);
            if !spec.is_some_and(|s| sources.iter().any(|k| s.contains_key(*k))) {
                causes.push(FieldCause::required("spec.persistentvolumesource"));
            }
        }
        ("networking.k8s.io", "Ingress") => validate_ingress(obj, &mut causes),
        ("networking.k8s.io", "IngressClass")
            if obj
                .pointer("/spec/controller")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty) =>
        {
            causes.push(FieldCause::required("spec.controller"));
        }
        ("storage.k8s.io", "StorageClass")
            if obj.get("provisioner").and_then(Value::as_str).is_none_or(str::is_empty) =>
        {
            causes.push(FieldCause::required("provisioner"));
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let types = ["IPv4", "IPv6", "FQDN"];
            match obj.get("addressType").and_then(Value::as_str) {
                None => causes.push(FieldCause::required("addressType")),
                Some(t) if !types.contains(&t) => causes.push(FieldCause::not_supported("addressType", t, &types)),
                _ => {}
            }
        }
        _ => {}
    }
    causes
}

fn validate_ingress(obj: &Value, causes: &mut Causes) {
    let check_backend = |field: String, b: &Value, causes: &mut Causes| {
        let svc = b.get("service");
        if svc.is_none() && b.get("resource").is_none() {
            causes.push(FieldCause::invalid(
                field,
                "{}",
                "one backend (service or resource) must be specified",
            ));
        } else if let Some(svc) = svc {
            if svc.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
                causes.push(FieldCause::required(format!("{field}.service.name")));
            }
            let port = svc.get("port");
            if port.is_none_or(|p| p.get("number").is_none() && p.get("name").is_none()) {
                causes.push(FieldCause::required(format!("{field}.service.port")));
            }
        }
    };
    if let Some(b) = obj.pointer("/spec/defaultBackend") {
        check_backend("spec.defaultBackend".into(), b, causes);
    }
    for (i, rule) in obj
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(host) = rule.get("host").and_then(Value::as_str) {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if !is_dns_subdomain(bare) {
                causes.push(FieldCause::invalid(
                    format!("spec.rules[{i}].host"),
                    host,
                    DNS_SUBDOMAIN_MSG,
                ));
            }
        }
        for (j, p) in rule
            .pointer("/http/paths")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("spec.rules[{i}].http.paths[{j}]");
            let types = ["Exact", "ImplementationSpecific", "Prefix"];
            match p.get("pathType").and_then(Value::as_str) {
                None => causes.push(FieldCause::required(format!("{field}.pathType"))),
                Some(t) if !types.contains(&t) => {
                    causes.push(FieldCause::not_supported(format!("{field}.pathType"), t, &types))
                }
                Some(t) => {
                    let path = p.get("path").and_then(Value::as_str).unwrap_or_default();
                    if t != "ImplementationSpecific" && !path.starts_with('/') {
                        causes.push(FieldCause::invalid(
                            format!("{field}.path"),
                            path,
                            "must be an absolute path",
                        ));
                    }
                }
            }
            match p.get("backend") {
                Some(b) => check_backend(format!("{field}.backend"), b, causes),
                None => causes.push(FieldCause::required(format!("{field}.backend"))),
            }
        }
    }
}

fn immutable(old: &Value, new: &Value, path: &str, field: &str, causes: &mut Causes) {
    if old.pointer(path) != new.pointer(path) {
        let shown = new
            .pointer(path)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "null".into());
        causes.push(FieldCause::invalid(field, shown, "field is immutable"));
    }
}

/// Fields an update may not change, by kind. Runs before `validate`.
pub fn validate_update(r: &Resource, old: &Value, new: &Value) -> Causes {
    let mut causes = Vec::new();
    match (r.group, r.kind) {
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            immutable(old, new, "/spec/selector", "spec.selector", &mut causes);
            if r.kind == "StatefulSet" {
                for (path, field) in [
                    ("/spec/serviceName", "spec.serviceName"),
                    ("/spec/podManagementPolicy", "spec.podManagementPolicy"),
                    ("/spec/volumeClaimTemplates", "spec.volumeClaimTemplates"),
                ] {
                    if old.pointer(path) != new.pointer(path) {
                        causes.push(FieldCause::forbidden("spec", format!("updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden ({field})")));
                    }
                }
            }
        }
        ("", "Service") => {
            let old_ip = old
                .pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let new_ip = new
                .pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let was_external = old.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName");
            if !was_external && !old_ip.is_empty() && new_ip != old_ip {
                causes.push(FieldCause::invalid(
                    "spec.clusterIPs[0]",
                    format!("[]string{{\"{new_ip}\"}}"),
                    "may not change once set",
                ));
            }
        }
        ("", "Secret" | "ConfigMap") => {
            if r.kind == "Secret" {
                immutable(old, new, "/type", "type", &mut causes);
            }
            if old.get("immutable").and_then(Value::as_bool) == Some(true) {
                for f in ["data", "binaryData", "immutable"] {
                    if old.get(f) != new.get(f) {
                        causes.push(FieldCause::forbidden(f, "field is immutable when `immutable` is set"));
                    }
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            let strip = |v: &Value| {
                let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
                if let Some(s) = spec.as_object_mut() {
                    s.remove("resources");
                    s.remove("volumeName");
                    s.remove("volumeAttributesClassName");
                }
                spec
            };
            if strip(old) != strip(new) {
                causes.push(FieldCause::forbidden("spec", "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims"));
            }
        }
        ("", "Pod") => {
            // A pod's spec is fixed once created, but for images, activeDeadlineSeconds and
            // added tolerations, and the scheduler's binding (nodeName set once).
            let strip = |v: &Value| {
                let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
                if let Some(s) = spec.as_object_mut() {
                    s.remove("activeDeadlineSeconds");
                    s.remove("tolerations");
                    for key in ["containers", "initContainers"] {
                        if let Some(list) = s.get_mut(key).and_then(Value::as_array_mut) {
                            for c in list.iter_mut().filter_map(Value::as_object_mut) {
                                c.remove("image");
                            }
                        }
                    }
                    if old.pointer("/spec/nodeName").is_none() {
                        s.remove("nodeName");
                    }
                }
                spec
            };
            if strip(old) != strip(new) {
                causes.push(FieldCause::forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"));
            }
        }
        ("networking.k8s.io", "IngressClass") => {
            immutable(old, new, "/spec/controller", "spec.controller", &mut causes)
        }
        ("storage.k8s.io", "StorageClass") => {
            for f in ["provisioner", "parameters", "reclaimPolicy", "volumeBindingMode"] {
                immutable(old, new, &format!("/{f}"), f, &mut causes);
            }
        }
        ("discovery.k8s.io", "EndpointSlice") => immutable(old, new, "/addressType", "addressType", &mut causes),
        _ => {}
    }
    causes
}

/// The old object's fields an update of the main resource keeps: status is written only
/// through the status subresource, for kinds that have one.
pub fn keep_on_update(r: &Resource, old: &Value, new: &mut Value) {
    if r.has(super::resources::Subresource::Status)
        && let Some(obj) = new.as_object_mut()
    {
        match old.get("status") {
            Some(status) => obj.insert("status".into(), status.clone()),
            None => obj.remove("status"),
        };
    }
    if r.kind == "Namespace" && r.group.is_empty() {
        // spec.finalizers change only through the finalize subresource.
        match old.pointer("/spec/finalizers") {
            Some(f) => new["spec"]["finalizers"] = f.clone(),
            None => {
                if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.remove("finalizers");
                }
            }
        }
    }
    if r.kind == "Service" {
        // An update that leaves out allocated values keeps them, as Kubernetes does.
        if new
            .pointer("/spec/clusterIP")
            .is_none_or(|v| v.as_str().is_none_or(str::is_empty))
            && let Some(ip) = old.pointer("/spec/clusterIP").cloned()
            && let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("clusterIP".into(), ip);
            if let Some(ips) = old.pointer("/spec/clusterIPs").cloned() {
                spec.insert("clusterIPs".into(), ips);
            }
        }
        let old_ports: Vec<Value> = old
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let ty = new
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        if (ty == "NodePort" || ty == "LoadBalancer")
            && let Some(ports) = new.pointer_mut("/spec/ports").and_then(Value::as_array_mut)
        {
            for p in ports.iter_mut() {
                if p.get("nodePort").and_then(Value::as_i64).is_some_and(|n| n != 0) {
                    continue;
                }
                let same = old_ports.iter().find(|o| {
                    o.get("port") == p.get("port")
                        && o.get("protocol").or(Some(&json!("TCP"))) == p.get("protocol").or(Some(&json!("TCP")))
                });
                if let Some(np) = same.and_then(|o| o.get("nodePort")) {
                    p["nodePort"] = np.clone();
                }
            }
        }
    }
}

/// Whether a change between two versions bumps `metadata.generation` (a spec change).
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    #[test]
    fn new_pods_get_default_not_ready_and_unreachable_tolerations() {
        let r = find("", "v1", "pods").unwrap();
        let admission = Admission {
            not_ready_toleration_seconds: 2,
            unreachable_toleration_seconds: 300,
        };
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "x"}]}});
        admit_create(r, &mut pod, &admission);
        assert_eq!(
            pod["spec"]["tolerations"],
            json!([
                {"key": TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2},
                {"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ])
        );
        // A pod that already tolerates one (here: forever) keeps its own.
        let own = json!({"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute"});
        let mut pod = json!({"spec": {"containers": [], "tolerations": [own.clone()]}});
        admit_create(r, &mut pod, &admission);
        let t = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0], own);
        assert_eq!(t[1]["key"], TAINT_NOT_READY);
        // `tolerations: null` (an empty Helm value) gets the defaults too.
        let mut pod = json!({"spec": {"containers": [], "tolerations": null}});
        admit_create(r, &mut pod, &admission);
        assert_eq!(pod["spec"]["tolerations"].as_array().unwrap().len(), 2);
        // Tolerating everything covers both.
        let mut pod = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        admit_create(r, &mut pod, &admission);
        assert_eq!(pod["spec"]["tolerations"].as_array().unwrap().len(), 1);
        // Other kinds are untouched.
        let d = find("apps", "v1", "deployments").unwrap();
        let mut dep = json!({"spec": {}});
        admit_create(d, &mut dep, &admission);
        assert_eq!(dep, json!({"spec": {}}));
    }

    #[test]
    fn pod_without_containers_is_invalid_with_field_cause() {
        let r = find("", "v1", "pods").unwrap();
        let causes = validate(r, &json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.containers");
    }

    #[test]
    fn uppercase_names_are_rejected() {
        let r = find("", "v1", "configmaps").unwrap();
        let causes = validate(r, &json!({"metadata": {"name": "Bad"}}));
        assert_eq!(causes[0].field, "metadata.name");
    }

    #[test]
    fn deployment_selector_must_match_template_labels() {
        let r = find("apps", "v1", "deployments").unwrap();
        let d = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let causes = validate(r, &d);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn service_defaults_target_port_and_protocol() {
        let r = find("", "v1", "services").unwrap();
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        apply_defaults(r, &mut s);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["type"], "ClusterIP");
    }

    #[test]
    fn secret_string_data_is_folded_into_data() {
        let r = find("", "v1", "secrets").unwrap();
        let mut s = json!({"metadata": {"name": "s"}, "stringData": {"a": "hi"}});
        apply_defaults(r, &mut s);
        assert_eq!(s["data"]["a"], "aGk=");
        assert!(s.get("stringData").is_none());
    }

    #[test]
    fn empty_deployment_strategy_gets_rolling_update_defaults() {
        let r = find("apps", "v1", "deployments").unwrap();
        let mut d = json!({"spec": {"strategy": {}, "template": {"spec": {"containers": []}}}});
        apply_defaults(r, &mut d);
        assert_eq!(
            d["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        let mut recreate = json!({"spec": {"strategy": {"type": "Recreate"}}});
        apply_defaults(r, &mut recreate);
        assert!(recreate["spec"]["strategy"].get("rollingUpdate").is_none());
    }

    #[test]
    fn deployment_selector_is_immutable() {
        let r = find("apps", "v1", "deployments").unwrap();
        let old = json!({"spec": {"selector": {"matchLabels": {"app": "a"}}}});
        let new = json!({"spec": {"selector": {"matchLabels": {"app": "b"}}}});
        assert_eq!(validate_update(r, &old, &new)[0].field, "spec.selector");
    }
}
