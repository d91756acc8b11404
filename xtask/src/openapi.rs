//! `cargo xtask gen-openapi`: turns Kubernetes' published JSON schemas (PyPI
//! `kubernetes-validate`) into `control-plane/openapi/definitions.json`, the OpenAPI
//! definitions the API server serves and uses for patch semantics. Writes only that file.

use std::collections::{BTreeSet, VecDeque};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::command::status;
use crate::wheel;
use crate::workspace::Workspace;

const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const SCHEMA_MEMBER: &str = "kubernetes_validate/kubernetes-json-schema/v1.37.0-local/_definitions.json";
const SOURCE_REF_PREFIX: &str = "#/$defs/";
const REF_PREFIX: &str = "#/definitions/";
const OUTPUT: &str = "control-plane/openapi/definitions.json";

/// The kinds Weir serves, by definition-name prefix. Each `<Kind>List` comes along when it exists.
const SERVED_KINDS: &[(&str, &[&str])] = &[
    (
        "io.k8s.api.core.v1",
        &[
            "Namespace",
            "Pod",
            "Binding",
            "Service",
            "Endpoints",
            "ConfigMap",
            "Secret",
            "Node",
            "ServiceAccount",
            "Event",
            "PersistentVolume",
            "PersistentVolumeClaim",
        ],
    ),
    (
        "io.k8s.api.apps.v1",
        &[
            "Deployment",
            "ReplicaSet",
            "StatefulSet",
            "DaemonSet",
            "ControllerRevision",
        ],
    ),
    ("io.k8s.api.autoscaling.v1", &["Scale"]),
    ("io.k8s.api.authentication.v1", &["TokenRequest"]),
    ("io.k8s.api.discovery.v1", &["EndpointSlice"]),
    ("io.k8s.api.networking.v1", &["Ingress", "IngressClass"]),
    ("io.k8s.api.storage.v1", &["StorageClass"]),
    ("io.k8s.api.coordination.v1", &["Lease"]),
    ("io.k8s.api.events.v1", &["Event"]),
];

/// meta/v1 types the API server returns outside any kind (errors, discovery, watch).
const META_PREFIX: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";
const META_TYPES: &[&str] = &[
    "Status",
    "DeleteOptions",
    "WatchEvent",
    "APIResourceList",
    "APIGroupList",
    "APIVersions",
    "Patch",
];

/// Upstream's own wording, used when the source schema carries no description.
const INT_OR_STRING_DESCRIPTION: &str = "IntOrString is a type that can hold an int32 or a string.  When used in JSON or YAML marshalling and unmarshalling, it produces or consumes the inner type.  This allows you to have, for example, a JSON field that can accept a name or number.";
const QUANTITY_DESCRIPTION: &str = "Quantity is a fixed-point representation of a number. It provides convenient marshaling/unmarshaling in JSON and YAML, in addition to String() and AsInt64() accessors.";

pub fn generate(ws: &Workspace) -> Result<()> {
    let wheel = wheel::fetch(ws, KUBERNETES_VALIDATE, KUBERNETES_VALIDATE_VERSION)?;
    status(format!("gen-openapi: reading {SCHEMA_MEMBER}"));
    let raw = wheel::python(
        "gen-openapi: read schemas from the wheel",
        "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))",
        &[wheel.as_path(), std::path::Path::new(SCHEMA_MEMBER)],
    )?;
    let source: Value = serde_json::from_str(&raw).context("gen-openapi: parsing _definitions.json")?;
    let source = source
        .get("$defs")
        .and_then(Value::as_object)
        .context("gen-openapi: _definitions.json has no \"$defs\" object")?;

    let definitions = definitions(source)?;
    let count = definitions.as_object().map_or(0, Map::len);
    let mut text = serde_json::to_string(&definitions)?;
    text.push('\n');

    let path = ws.root.join(OUTPUT);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    status(format!(
        "gen-openapi: wrote {OUTPUT}: {count} definitions, {} bytes",
        text.len()
    ));
    Ok(())
}

/// Every definition reachable from the served kinds, converted and with keys sorted.
fn definitions(source: &Map<String, Value>) -> Result<Value> {
    let mut queue: VecDeque<String> = roots(source)?.into();
    let mut done = Map::new();
    while let Some(name) = queue.pop_front() {
        if done.contains_key(&name) {
            continue;
        }
        let schema = source
            .get(&name)
            .with_context(|| format!("gen-openapi: {name} is referenced but not defined"))?;
        let schema = convert(schema)?;
        let mut refs = BTreeSet::new();
        collect_refs(&schema, &mut refs);
        queue.extend(refs.into_iter().filter(|r| !done.contains_key(r)));
        done.insert(name, schema);
    }
    for (name, schema) in &done {
        let text = schema.to_string();
        if ["\"oneOf\"", "\"anyOf\"", "\"allOf\""].iter().any(|k| text.contains(k)) {
            status(format!("gen-openapi: note: {name} keeps a oneOf/anyOf/allOf"));
        }
    }
    Ok(sorted(Value::Object(done)))
}

fn roots(source: &Map<String, Value>) -> Result<Vec<String>> {
    let mut roots = Vec::new();
    for (prefix, kinds) in SERVED_KINDS {
        for kind in *kinds {
            let name = format!("{prefix}.{kind}");
            if !source.contains_key(&name) {
                bail!("gen-openapi: {name} is not in {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION}");
            }
            let list = format!("{name}List");
            if source.contains_key(&list) {
                roots.push(list);
            }
            roots.push(name);
        }
    }
    for meta in META_TYPES {
        let name = format!("{META_PREFIX}.{meta}");
        if source.contains_key(&name) {
            roots.push(name);
        } else {
            status(format!("gen-openapi: note: {name} is not in the source; skipped"));
        }
    }
    Ok(roots)
}

/// JSON Schema (draft 2020, nullable types, `$defs`) to OpenAPI v2 style. Recurses only
/// through keywords that hold schemas, so a property *named* `$ref` or `type` is left alone.
fn convert(schema: &Value) -> Result<Value> {
    let Value::Object(map) = schema else {
        return Ok(schema.clone());
    };
    if let Some(special) = int_or_string_or_quantity(map) {
        return Ok(special);
    }
    let mut out = Map::new();
    for (key, value) in map {
        let value = match key.as_str() {
            "type" => without_null(value),
            "$ref" => {
                let target = value
                    .as_str()
                    .and_then(|r| r.strip_prefix(SOURCE_REF_PREFIX))
                    .with_context(|| format!("gen-openapi: unexpected $ref {value}"))?;
                Value::String(format!("{REF_PREFIX}{target}"))
            }
            "properties" | "patternProperties" => {
                let Value::Object(props) = value else {
                    bail!("gen-openapi: {key} is not an object: {value}");
                };
                let mut converted = Map::new();
                for (name, prop) in props {
                    let mut prop = convert(prop)?;
                    // kubernetes-validate pins apiVersion/kind of each kind with an enum; the
                    // server serves these schemas for several group-versions, so they must go.
                    if (name == "apiVersion" || name == "kind")
                        && let Value::Object(p) = &mut prop
                    {
                        p.remove("enum");
                    }
                    converted.insert(name.clone(), prop);
                }
                Value::Object(converted)
            }
            "items" | "additionalProperties" | "not" => convert(value)?,
            "oneOf" | "anyOf" | "allOf" => match value {
                Value::Array(branches) => Value::Array(branches.iter().map(convert).collect::<Result<_>>()?),
                _ => value.clone(),
            },
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    Ok(Value::Object(out))
}

/// `IntOrString` and `Quantity` are `oneOf` two scalar types in the source; OpenAPI v2 (and
/// kubectl's validation) expect Kubernetes' own encoding as a string with a format.
fn int_or_string_or_quantity(map: &Map<String, Value>) -> Option<Value> {
    let branches = map.get("oneOf")?.as_array()?;
    let types = branches
        .iter()
        .map(|b| {
            let t = without_null(b.get("type")?);
            t.as_str().map(str::to_owned)
        })
        .collect::<Option<BTreeSet<String>>>()?;
    let types: Vec<&str> = types.iter().map(String::as_str).collect();
    let description = map.get("description").and_then(Value::as_str);
    let mut out = if types == ["integer", "string"] {
        json!({
            "type": "string",
            "format": "int-or-string",
            "x-kubernetes-int-or-string": true,
            "description": description.unwrap_or(INT_OR_STRING_DESCRIPTION),
        })
    } else if types == ["number", "string"] {
        json!({
            "type": "string",
            "format": "quantity",
            "description": description.unwrap_or(QUANTITY_DESCRIPTION),
        })
    } else {
        return None;
    };
    for (key, value) in map {
        if key.starts_with("x-kubernetes-") {
            out[key] = value.clone();
        }
    }
    Some(out)
}

/// `["string", "null"]` → `"string"`; a list of several real types stays a list.
fn without_null(types: &Value) -> Value {
    match types {
        Value::Array(list) => {
            let real: Vec<&Value> = list.iter().filter(|t| t.as_str() != Some("null")).collect();
            match real.as_slice() {
                [single] => (*single).clone(),
                _ => Value::Array(real.into_iter().cloned().collect()),
            }
        }
        other => other.clone(),
    }
}

fn collect_refs(value: &Value, refs: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix(REF_PREFIX) {
                            refs.insert(name.to_string());
                        }
                    }
                    _ => collect_refs(v, refs),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

/// Objects with keys in byte order at every level, so regenerating gives the same file.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(list) => Value::Array(list.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_types_become_plain_types() {
        let out = convert(&json!({"type": ["string", "null"], "format": "date-time"})).unwrap();
        assert_eq!(out, json!({"type": "string", "format": "date-time"}));
    }

    #[test]
    fn refs_point_at_definitions() {
        let out = convert(&json!({"items": {"$ref": "#/$defs/io.k8s.api.core.v1.Container"}})).unwrap();
        assert_eq!(
            out["items"]["$ref"],
            json!("#/definitions/io.k8s.api.core.v1.Container")
        );
    }

    #[test]
    fn api_version_and_kind_lose_their_enum_but_other_enums_stay() {
        let out = convert(&json!({"properties": {
            "apiVersion": {"type": ["string", "null"], "enum": ["v1"]},
            "kind": {"type": ["string", "null"], "enum": ["Pod"]},
            "phase": {"type": "string", "enum": ["Pending", "Running"]},
        }}))
        .unwrap();
        assert_eq!(out["properties"]["apiVersion"], json!({"type": "string"}));
        assert_eq!(out["properties"]["kind"], json!({"type": "string"}));
        assert_eq!(out["properties"]["phase"]["enum"], json!(["Pending", "Running"]));
    }

    #[test]
    fn int_or_string_becomes_a_formatted_string() {
        let out = convert(&json!({"oneOf": [
            {"type": ["string", "null"]}, {"type": ["integer", "null"]}
        ]}))
        .unwrap();
        assert_eq!(out["type"], json!("string"));
        assert_eq!(out["format"], json!("int-or-string"));
        assert_eq!(out["x-kubernetes-int-or-string"], json!(true));
        assert!(out.get("oneOf").is_none());
    }

    #[test]
    fn quantity_becomes_a_formatted_string() {
        let out = convert(&json!({"oneOf": [
            {"type": ["string", "null"]}, {"type": ["number", "null"]}
        ]}))
        .unwrap();
        assert_eq!(out["type"], json!("string"));
        assert_eq!(out["format"], json!("quantity"));
    }

    #[test]
    fn a_property_named_like_a_keyword_is_not_rewritten() {
        let out = convert(&json!({"properties": {"$ref": {"type": ["string", "null"]}}})).unwrap();
        assert_eq!(out["properties"]["$ref"], json!({"type": "string"}));
    }

    #[test]
    fn only_reachable_definitions_are_kept() {
        let mut source = Map::new();
        for (prefix, kinds) in SERVED_KINDS {
            for kind in *kinds {
                source.insert(format!("{prefix}.{kind}"), json!({"type": "object"}));
            }
        }
        source.insert(
            "io.k8s.api.core.v1.Pod".into(),
            json!({"properties": {"spec": {"$ref": "#/$defs/io.k8s.api.core.v1.PodSpec"}}}),
        );
        source.insert("io.k8s.api.core.v1.PodSpec".into(), json!({"type": "object"}));
        source.insert("io.k8s.api.batch.v1.Job".into(), json!({"type": "object"}));
        let out = definitions(&source).unwrap();
        assert!(out.get("io.k8s.api.core.v1.PodSpec").is_some());
        assert!(out.get("io.k8s.api.batch.v1.Job").is_none());
    }
}
