//! A container's environment as kubelet builds it (`makeEnvironmentVariables`): `envFrom`
//! (ConfigMaps and Secrets, with prefixes), then `env` in order (values with `$(VAR)`
//! references to earlier variables, `valueFrom` ConfigMap and Secret keys, `fieldRef`,
//! `resourceFieldRef`), then the service variables for names not yet set. Also the `$(VAR)`
//! expansion of `command` and `args`. Pure: the worker fetches the objects first.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, ResourceRequirements, Secret};

use super::quantity;

/// The objects a pod's environment refers to, fetched by the worker: `None` for one that
/// does not exist.
#[derive(Clone, Debug, Default)]
pub struct EnvSources {
    pub config_maps: HashMap<String, Option<ConfigMap>>,
    pub secrets: HashMap<String, Option<Secret>>,
}

/// What `fieldRef` and defaults for `resourceFieldRef` read besides the pod itself.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub host_ips: Vec<String>,
    pub pod_ips: Vec<String>,
    /// The node's allocatable CPU in millicores and memory in bytes: a container without a
    /// limit reports these for `limits.cpu` / `limits.memory`, as kubelet does.
    pub allocatable_millicores: i128,
    pub allocatable_memory: i128,
    pub allocatable_ephemeral_storage: i128,
}

/// The names of the ConfigMaps and Secrets a pod's containers take variables from.
pub fn referenced_objects(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let mut config_maps = Vec::new();
    let mut secrets = Vec::new();
    for c in all_containers(pod) {
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                config_maps.push(r.name.clone());
            }
            if let Some(r) = &from.secret_ref {
                secrets.push(r.name.clone());
            }
        }
        for var in c.env.iter().flatten() {
            let Some(from) = &var.value_from else { continue };
            if let Some(r) = &from.config_map_key_ref {
                config_maps.push(r.name.clone());
            }
            if let Some(r) = &from.secret_key_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    config_maps.sort();
    config_maps.dedup();
    secrets.sort();
    secrets.dedup();
    (config_maps, secrets)
}

/// Every container of the pod: init containers first.
pub fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()))
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` becomes the variable's value when it is
/// defined and stays as written otherwise; `$$` is a literal `$`.
pub fn expand(input: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match vars(name) {
                            Some(value) => out.push_str(&value),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch = input[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(String::from_utf8_lossy(&v.0).into_owned());
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

fn config_map_value(cm: &ConfigMap, key: &str) -> Option<String> {
    if let Some(v) = cm.data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    cm.binary_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_graphic() && c != '=')
}

/// `metadata.labels['key']` and friends (also the downward API volumes' files).
pub fn field_value(pod: &Pod, facts: &NodeFacts, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['").or_else(|| rest.strip_prefix("[\"")))
            .and_then(|rest| rest.strip_suffix("']").or_else(|| rest.strip_suffix("\"]")))
            .map(str::to_owned)
    };
    let map_text = |m: &Option<BTreeMap<String, String>>| {
        m.iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_text(&meta.labels),
        "metadata.annotations" => map_text(&meta.annotations),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" => facts.host_ips.first().cloned().unwrap_or_default(),
        "status.hostIPs" => facts.host_ips.join(","),
        "status.podIP" => facts.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => facts.pod_ips.join(","),
        _ => {
            if let Some(key) = subscript("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = subscript("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("fieldRef {path:?} is not a field a container can read"));
            }
        }
    })
}

/// `resourceFieldRef`: the container's request or limit (a limit defaults to the node's
/// allocatable) divided by the divisor, rounded up.
pub fn resource_value(
    resources: Option<&ResourceRequirements>,
    facts: &NodeFacts,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String, String> {
    let get = |which: &str, name: &str| quantity::resource_milli(resources, which, name);
    let milli = match resource {
        "limits.cpu" => get("limits", "cpu").unwrap_or(facts.allocatable_millicores),
        "requests.cpu" => get("requests", "cpu").unwrap_or(0),
        "limits.memory" => get("limits", "memory").unwrap_or(facts.allocatable_memory * 1000),
        "requests.memory" => get("requests", "memory").unwrap_or(0),
        "limits.ephemeral-storage" => {
            get("limits", "ephemeral-storage").unwrap_or(facts.allocatable_ephemeral_storage * 1000)
        }
        "requests.ephemeral-storage" => get("requests", "ephemeral-storage").unwrap_or(0),
        other => {
            return Err(format!(
                "resourceFieldRef {other:?} is not a resource a container can read"
            ));
        }
    };
    let divisor = match divisor {
        Some(d) => quantity::milli_value(d).ok_or_else(|| format!("divisor {d:?} is not a quantity"))?,
        // The default divisor is 1 (core, byte).
        None => 1000,
    };
    if divisor <= 0 {
        return Err("resourceFieldRef divisor must be positive".into());
    }
    // Rounded up, at least 1 for a non-zero CPU request, as kubelet's ExtractContainerResourceValue.
    let value = (milli + divisor - 1).div_euclid(divisor);
    Ok(value.to_string())
}

/// The container's environment, in order. An error says which variable could not be set and
/// why (kubelet reports it as `CreateContainerConfigError`).
pub fn container_env(
    pod: &Pod,
    container: &Container,
    sources: &EnvSources,
    facts: &NodeFacts,
    service_env: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    let set = |name: String, value: String, order: &mut Vec<String>, values: &mut HashMap<String, String>| {
        if values.insert(name.clone(), value).is_none() {
            order.push(name);
        }
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let pairs: Vec<(String, String)> = if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name).cloned().flatten() {
                Some(cm) => {
                    let mut pairs: Vec<(String, String)> = cm.data.clone().unwrap_or_default().into_iter().collect();
                    pairs.sort();
                    pairs
                }
                None if r.optional == Some(true) => Vec::new(),
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name).cloned().flatten() {
                Some(secret) => {
                    let mut keys: Vec<String> = secret.data.iter().flatten().map(|(k, _)| k.clone()).collect();
                    keys.extend(secret.string_data.iter().flatten().map(|(k, _)| k.clone()));
                    keys.sort();
                    keys.dedup();
                    keys.into_iter()
                        .filter_map(|k| secret_value(&secret, &k).map(|v| (k, v)))
                        .collect()
                }
                None if r.optional == Some(true) => Vec::new(),
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        } else {
            Vec::new()
        };
        for (key, value) in pairs {
            let name = format!("{prefix}{key}");
            // kubelet skips keys that are not valid variable names (and records an event).
            if is_env_name(&name) {
                set(name, value, &mut order, &mut values);
            }
        }
    }
    let service: HashMap<&str, &str> = service_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(r) = &from.config_map_key_ref {
                match sources.config_maps.get(&r.name).cloned().flatten() {
                    Some(cm) => match config_map_value(&cm, &r.key) {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("couldn't find key {} in ConfigMap {}", r.key, r.name)),
                    },
                    None if r.optional == Some(true) => continue,
                    None => return Err(format!("configmap \"{}\" not found", r.name)),
                }
            } else if let Some(r) = &from.secret_key_ref {
                match sources.secrets.get(&r.name).cloned().flatten() {
                    Some(secret) => match secret_value(&secret, &r.key) {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("couldn't find key {} in Secret {}", r.key, r.name)),
                    },
                    None if r.optional == Some(true) => continue,
                    None => return Err(format!("secret \"{}\" not found", r.name)),
                }
            } else if let Some(r) = &from.field_ref {
                field_value(pod, facts, &r.field_path)?
            } else if let Some(r) = &from.resource_field_ref {
                let target = match r.container_name.as_deref() {
                    Some(name) if !name.is_empty() => all_containers(pod)
                        .find(|c| c.name == name)
                        .ok_or_else(|| format!("resourceFieldRef names container {name:?}, which the pod lacks"))?,
                    _ => container,
                };
                resource_value(
                    target.resources.as_ref(),
                    facts,
                    &r.resource,
                    r.divisor.as_ref().map(|d| d.0.as_str()),
                )?
            } else {
                return Err(format!("env {}: valueFrom names no source", var.name));
            }
        } else {
            let raw = var.value.clone().unwrap_or_default();
            expand(&raw, &|name| {
                values
                    .get(name)
                    .cloned()
                    .or_else(|| service.get(name).map(|v| v.to_string()))
            })
        };
        set(var.name.clone(), value, &mut order, &mut values);
    }
    for (name, value) in service_env {
        if !values.contains_key(name) {
            set(name.clone(), value.clone(), &mut order, &mut values);
        }
    }
    Ok(order
        .into_iter()
        .map(|name| {
            let value = values.remove(&name).unwrap_or_default();
            (name, value)
        })
        .collect())
}

/// `command` and `args` with `$(VAR)` expanded from the container's environment.
pub fn expand_all(items: &Option<Vec<String>>, env: &[(String, String)]) -> Option<Vec<String>> {
    let vars: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    items.as_ref().map(|items| {
        items
            .iter()
            .map(|s| expand(s, &|name| vars.get(name).map(|v| v.to_string())))
            .collect()
    })
}

/// Docker-links-style variables for Services, as kubelet gives every container (the
/// `kubernetes` Service of `default` always, the pod's namespace's Services when
/// `enableServiceLinks` is not false): `NAME_SERVICE_HOST`, `NAME_SERVICE_PORT`,
/// `NAME_SERVICE_PORT_<PORTNAME>`, `NAME_PORT`, `NAME_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]`.
pub fn service_env(services: &[k8s_openapi::api::core::v1::Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let name = svc
            .metadata
            .name
            .clone()
            .unwrap_or_default()
            .to_ascii_uppercase()
            .replace('-', "_");
        let ports = spec.ports.clone().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        out.push((format!("{name}_SERVICE_HOST"), ip.to_owned()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in &ports {
            if let Some(port_name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        port_name.to_ascii_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{host}:{}", proto(first).to_ascii_lowercase(), first.port),
        ));
        for p in &ports {
            let proto = proto(p);
            let prefix = format!("{name}_PORT_{}_{}", p.port, proto.to_ascii_uppercase());
            out.push((
                prefix.clone(),
                format!("{}://{host}:{}", proto.to_ascii_lowercase(), p.port),
            ));
            out.push((format!("{prefix}_PROTO"), proto.to_ascii_lowercase()));
            out.push((format!("{prefix}_PORT"), p.port.to_string()));
            out.push((format!("{prefix}_ADDR"), ip.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": containers},
        }))
        .unwrap()
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            host_ips: vec!["10.0.0.5".into()],
            pod_ips: vec!["10.244.0.7".into()],
            allocatable_millicores: 2000,
            allocatable_memory: 1 << 30,
            allocatable_ephemeral_storage: 1 << 34,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("ünï $(A)", &vars), "ünï x");
    }

    #[test]
    fn env_from_config_maps_secrets_fields_and_resources() {
        let p = pod(json!([{
            "name": "c", "image": "i",
            "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "missing", "optional": true}}],
            "env": [
                {"name": "GREETING", "value": "hello $(CFG_who)"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "CPULIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                {"name": "SVC", "value": "$(WEB_SERVICE_HOST)"},
            ],
        }]));
        let mut sources = EnvSources::default();
        sources.config_maps.insert(
            "cfg".into(),
            Some(serde_json::from_value(json!({"data": {"who": "world", "bad key": "x"}})).unwrap()),
        );
        sources.secrets.insert(
            "db".into(),
            Some(serde_json::from_value(json!({"data": {"password": "czNjcmV0"}})).unwrap()),
        );
        sources.secrets.insert("missing".into(), None);
        let service = vec![("WEB_SERVICE_HOST".to_string(), "10.96.0.9".to_string())];
        let container = &p.spec.as_ref().unwrap().containers[0];
        let env = container_env(&p, container, &sources, &facts(), &service).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_who"), Some("world"));
        assert_eq!(get("CFG_bad key"), None, "invalid names are skipped");
        assert_eq!(get("GREETING"), Some("hello world"));
        assert_eq!(get("PASSWORD"), Some("s3cret"));
        assert_eq!(get("POD"), Some("web-1"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("IP"), Some("10.244.0.7"));
        assert_eq!(get("MEM"), Some("64"));
        assert_eq!(get("CPU"), Some("250"));
        assert_eq!(get("CPULIMIT"), Some("2"), "no limit: the node's allocatable");
        assert_eq!(get("SVC"), Some("10.96.0.9"));
        assert_eq!(get("WEB_SERVICE_HOST"), Some("10.96.0.9"));
    }

    #[test]
    fn missing_required_sources_are_errors_naming_them() {
        let p = pod(json!([{"name": "c", "image": "i",
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}]}]));
        let container = &p.spec.as_ref().unwrap().containers[0];
        let err = container_env(&p, container, &EnvSources::default(), &facts(), &[]).unwrap_err();
        assert_eq!(err, "configmap \"cfg\" not found");
        let mut sources = EnvSources::default();
        sources
            .config_maps
            .insert("cfg".into(), Some(serde_json::from_value(json!({"data": {}})).unwrap()));
        let err = container_env(&p, container, &sources, &facts(), &[]).unwrap_err();
        assert_eq!(err, "couldn't find key k in ConfigMap cfg");
    }

    #[test]
    fn service_links_look_like_docker_links() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "my-db"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]},
        }))
        .unwrap();
        let env = service_env(&[svc]);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MY_DB_SERVICE_HOST"), Some("10.96.0.20"));
        assert_eq!(get("MY_DB_SERVICE_PORT"), Some("5432"));
        assert_eq!(get("MY_DB_SERVICE_PORT_SQL"), Some("5432"));
        assert_eq!(get("MY_DB_PORT"), Some("tcp://10.96.0.20:5432"));
        assert_eq!(get("MY_DB_PORT_5432_TCP_ADDR"), Some("10.96.0.20"));
    }
}
