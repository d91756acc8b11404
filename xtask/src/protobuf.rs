//! `cargo xtask gen-protobuf`: the protobuf field-number table the API server uses to decode
//! `application/vnd.kubernetes.protobuf` request bodies. Source: the prost-generated Rust of
//! the crate `k8s-pb` (every Kubernetes `.proto` message with its field tags), downloaded from
//! crates.io into `target/tools/`. Field names are matched to the JSON properties of
//! `control-plane/openapi/definitions.json`. Writes only `control-plane/openapi/protobuf.json`;
//! its layout is documented in `control-plane/src/apiserver/protobuf.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::command::{self, status};
use crate::workspace::Workspace;

const K8S_PB: &str = "k8s-pb";
const K8S_PB_VERSION: &str = "0.9.0";
/// sha256 of `k8s-pb-0.9.0.crate` as published on crates.io.
const K8S_PB_SHA256: &str = "43b6ba14400b62feaa58ebbbd32ce2d9a4601339b2820af393f68033b9cea620";
const DEFINITIONS: &str = "control-plane/openapi/definitions.json";
const OUTPUT: &str = "control-plane/openapi/protobuf.json";

/// Messages the decoder special-cases or needs for the envelope, kept even when no served kind
/// reaches them.
const EXTRA_ROOTS: &[&str] = &[
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
    "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Duration",
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1",
    "io.k8s.apimachinery.pkg.runtime.TypeMeta",
    "io.k8s.apimachinery.pkg.runtime.Unknown",
    "io.k8s.apimachinery.pkg.runtime.RawExtension",
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
    "io.k8s.apimachinery.pkg.api.resource.Quantity",
];

pub fn generate(ws: &Workspace) -> Result<()> {
    let src = fetch_source(ws)?;
    let defs_path = ws.root.join(DEFINITIONS);
    let defs_text = std::fs::read_to_string(&defs_path).with_context(|| format!("reading {}", defs_path.display()))?;
    let defs: Value = serde_json::from_str(&defs_text).with_context(|| format!("parsing {DEFINITIONS}"))?;
    let defs = defs
        .as_object()
        .with_context(|| format!("{DEFINITIONS} is not an object"))?;

    let mut files = Vec::new();
    collect_mod_files(&src, &src, &mut files)?;
    files.sort();
    let names = DefinitionNames::new(defs);
    let mut messages = BTreeMap::new();
    for (path, module) in &files {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for message in
            parse_module(&text, module, &names).with_context(|| format!("gen-protobuf: parsing {}", path.display()))?
        {
            messages.insert(message.name.clone(), message);
        }
    }
    status(format!(
        "gen-protobuf: parsed {} messages from {} modules of {K8S_PB} {K8S_PB_VERSION}",
        messages.len(),
        files.len()
    ));

    let table = table(&messages, defs)?;
    let count = table.as_object().map_or(0, Map::len);
    let mut text = serde_json::to_string(&table)?;
    text.push('\n');
    let path = ws.root.join(OUTPUT);
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    status(format!(
        "gen-protobuf: wrote {OUTPUT}: {count} messages, {} bytes",
        text.len()
    ));
    Ok(())
}

/// The unpacked `src/` of k8s-pb: cached under `target/tools/`, else downloaded from crates.io
/// (or, offline, copied from cargo's own download cache), checked against the pinned sha256.
fn fetch_source(ws: &Workspace) -> Result<PathBuf> {
    let tools = ws.tools();
    let dir = tools.join(format!("{K8S_PB}-{K8S_PB_VERSION}"));
    let src = dir.join("src");
    if src.is_dir() {
        status(format!(
            "gen-protobuf: {K8S_PB} {K8S_PB_VERSION}: cached at {}",
            dir.display()
        ));
        return Ok(src);
    }
    std::fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    let archive = tools.join(format!("{K8S_PB}-{K8S_PB_VERSION}.crate"));
    let url = format!("https://crates.io/api/v1/crates/{K8S_PB}/{K8S_PB_VERSION}/download");
    status(format!("gen-protobuf: downloading {url} into {}", tools.display()));
    let downloaded = command::run(
        &format!("download {K8S_PB} {K8S_PB_VERSION}"),
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, urllib.request\n\
                 req = urllib.request.Request(sys.argv[1], headers={'User-Agent': 'weir-xtask'})\n\
                 data = urllib.request.urlopen(req, timeout=120).read()\n\
                 open(sys.argv[2], 'wb').write(data)",
            )
            .arg(&url)
            .arg(&archive),
        "check that crates.io is reachable",
    );
    if let Err(err) = downloaded {
        let Some(cached) = cargo_cache_copy() else {
            return Err(err);
        };
        status(format!(
            "gen-protobuf: download failed; using cargo's cached copy {}",
            cached.display()
        ));
        std::fs::copy(&cached, &archive)
            .with_context(|| format!("copying {} to {}", cached.display(), archive.display()))?;
    }
    command::run(
        &format!("unpack {K8S_PB} {K8S_PB_VERSION}"),
        Command::new("python3")
            .arg("-c")
            .arg(
                "import hashlib, sys, tarfile\n\
                 data = open(sys.argv[1], 'rb').read()\n\
                 got = hashlib.sha256(data).hexdigest()\n\
                 if got != sys.argv[3]:\n    sys.exit(f'sha256 mismatch: got {got}, want {sys.argv[3]}')\n\
                 tarfile.open(sys.argv[1], 'r:gz').extractall(sys.argv[2], filter='data')",
            )
            .arg(&archive)
            .arg(&tools)
            .arg(K8S_PB_SHA256),
        &format!("delete {} and run again", archive.display()),
    )?;
    if !src.is_dir() {
        bail!("gen-protobuf: {} has no {}", archive.display(), src.display());
    }
    Ok(src)
}

/// `$CARGO_HOME/registry/cache/*/k8s-pb-<version>.crate`, if cargo ever downloaded it.
fn cargo_cache_copy() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let file = format!("{K8S_PB}-{K8S_PB_VERSION}.crate");
    let mut found: Vec<PathBuf> = std::fs::read_dir(home.join("registry").join("cache"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(&file))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Every `mod.rs` under `src/`, with its module path (`["api", "core", "v1"]`).
fn collect_mod_files(src: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<String>)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_mod_files(src, &path, out)?;
        } else if path.file_name().is_some_and(|n| n == "mod.rs") {
            let module = path
                .parent()
                .and_then(|p| p.strip_prefix(src).ok())
                .map(|rel| rel.iter().map(|s| s.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            out.push((path, module));
        }
    }
    Ok(())
}

/// Maps a prost struct to its OpenAPI definition name. prost renames messages to Rust case
/// (`HTTPGetAction` → `HttpGetAction`), so names are matched case-insensitively.
struct DefinitionNames {
    by_lowercase: HashMap<String, String>,
}

impl DefinitionNames {
    fn new(defs: &Map<String, Value>) -> Self {
        DefinitionNames {
            by_lowercase: defs.keys().map(|k| (k.to_ascii_lowercase(), k.clone())).collect(),
        }
    }

    /// `["api", "core", "v1"]` + `Pod` → `io.k8s.api.core.v1.Pod`; crate directories use `_`
    /// where Go packages use `-` (`apiextensions_apiserver`).
    fn name(&self, module: &[String], rust_name: &str) -> String {
        let mut name = String::from("io.k8s");
        for segment in module {
            name.push('.');
            name.push_str(&segment.replace('_', "-"));
        }
        name.push('.');
        name.push_str(rust_name);
        self.by_lowercase
            .get(&name.to_ascii_lowercase())
            .cloned()
            .unwrap_or(name)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Message {
    name: String,
    fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    tag: u32,
    /// The Rust field name, without `r#`.
    rust_name: String,
    /// string, int32, int64, bool, double, bytes, message or map.
    kind: &'static str,
    /// The message name for `message`; the value kind or message name for `map`.
    type_name: String,
    repeated: bool,
}

/// The `pub struct` blocks of one prost-generated module.
fn parse_module(text: &str, module: &[String], names: &DefinitionNames) -> Result<Vec<Message>> {
    let mut messages = Vec::new();
    let mut current: Option<Message> = None;
    let mut attribute: Option<String> = None;
    let mut declaration = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = rest.trim_end_matches('{').trim();
            current = Some(Message {
                name: names.name(module, name),
                fields: Vec::new(),
            });
            continue;
        }
        let Some(message) = current.as_mut() else {
            continue;
        };
        if line == "}" {
            messages.extend(current.take());
            continue;
        }
        let line = line.trim();
        if attribute.is_none() {
            if let Some(attr) = line.strip_prefix("#[prost(").and_then(|a| a.strip_suffix(")]")) {
                attribute = Some(attr.to_string());
                declaration.clear();
            }
            continue;
        }
        if line.starts_with("///") || line.starts_with("#[") {
            continue;
        }
        declaration.push_str(line);
        let depth = declaration.matches('<').count() as i64 - declaration.matches('>').count() as i64;
        if depth == 0 && declaration.ends_with(',') {
            let attr = attribute.take().unwrap_or_default();
            let field = parse_field(&attr, &declaration, module, names)
                .with_context(|| format!("{}: field `{declaration}` (#[prost({attr})])", message.name))?;
            message.fields.push(field);
        }
    }
    if let Some(open) = current {
        bail!("struct {} is not closed", open.name);
    }
    Ok(messages)
}

/// One field from its `#[prost(...)]` attribute and its `pub name: Type,` declaration.
fn parse_field(attr: &str, declaration: &str, module: &[String], names: &DefinitionNames) -> Result<Field> {
    let (name, ty) = declaration
        .strip_prefix("pub ")
        .and_then(|d| d.strip_suffix(','))
        .and_then(|d| d.split_once(':'))
        .context("not `pub name: Type,`")?;
    let rust_name = name.trim().trim_start_matches("r#").to_string();
    let ty = ty.trim();
    let tag = attr
        .split_once("tag = \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .and_then(|(tag, _)| tag.parse::<u32>().ok())
        .context("no tag")?;
    let repeated = attr.split(',').any(|part| part.trim() == "repeated");
    let first = attr.split(',').next().unwrap_or_default().trim();
    let message_type = || -> Result<String> {
        let path = innermost_type(ty).context("no message type")?;
        Ok(resolve(path, module, names))
    };
    let (kind, type_name) = if let Some((_, rest)) = attr.split_once("map = \"") {
        // `btree_map = "string, message"`: the spec itself contains a comma.
        let spec = rest.split('"').next().unwrap_or_default();
        let (key, value) = spec.split_once(',').context("map spec without a comma")?;
        if key.trim() != "string" {
            bail!("map key {key} is not string");
        }
        let value = match value.trim() {
            "message" => message_type()?,
            scalar @ ("string" | "bytes") => scalar.to_string(),
            other => bail!("unsupported map value kind {other}"),
        };
        ("map", value)
    } else {
        let kind = match first {
            "string" => "string",
            "int32" => "int32",
            "int64" => "int64",
            "bool" => "bool",
            "double" => "double",
            "message" => "message",
            b if b.starts_with("bytes") => "bytes",
            other => bail!("unsupported field kind {other}"),
        };
        let type_name = if kind == "message" {
            message_type()?
        } else {
            String::new()
        };
        (kind, type_name)
    };
    Ok(Field {
        tag,
        rust_name,
        kind,
        type_name,
        repeated,
    })
}

/// The element type inside `Option<…>`, `Vec<…>`, `Box<…>`, or the value of `BTreeMap<K, V>`.
fn innermost_type(ty: &str) -> Option<&str> {
    let mut ty = ty.trim().trim_end_matches(',');
    loop {
        let Some(open) = ty.find('<') else {
            return Some(ty.trim());
        };
        let inner = ty[open + 1..]
            .trim_end()
            .strip_suffix('>')?
            .trim()
            .trim_end_matches(',');
        ty = if ty[..open].ends_with("Map") {
            // Split `K, V` at the top-level comma.
            let mut depth = 0;
            let split = inner.char_indices().find(|&(_, c)| {
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })?;
            inner[split.0 + 1..].trim()
        } else {
            inner
        };
    }
}

/// A Rust type path as written in the module (`super::super::…::ObjectMeta`, `Container`) to
/// the definition name.
fn resolve(path: &str, module: &[String], names: &DefinitionNames) -> String {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let name = segments.pop().unwrap_or_default();
    let mut base: Vec<String> = module.to_vec();
    let mut rest = segments.as_slice();
    if rest.first() == Some(&"crate") {
        base.clear();
        rest = &rest[1..];
    }
    while rest.first() == Some(&"super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().map(|s| s.to_string()));
    names.name(&base, name)
}

/// The output table: every message reachable from a definition in definitions.json (and the
/// `EXTRA_ROOTS`), each `{tag: [json, kind, type, repeated, required]}`, keys sorted.
fn table(messages: &BTreeMap<String, Message>, defs: &Map<String, Value>) -> Result<Value> {
    let mut queue: VecDeque<String> = messages
        .keys()
        .filter(|name| defs.contains_key(*name))
        .cloned()
        .collect();
    queue.extend(EXTRA_ROOTS.iter().map(|s| s.to_string()));
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Map::new();
    let mut guessed = Vec::new();
    // Embedded structs without a definition of their own take their JSON names from the parent.
    let mut embedded_in: HashMap<String, &Map<String, Value>> = HashMap::new();
    while let Some(name) = queue.pop_front() {
        if !done.insert(name.clone()) {
            continue;
        }
        let message = messages
            .get(&name)
            .with_context(|| format!("gen-protobuf: {name} is referenced but {K8S_PB} does not define it"))?;
        let def = defs.get(&name);
        let properties = def
            .and_then(|d| d.get("properties"))
            .and_then(Value::as_object)
            .or_else(|| embedded_in.get(&name).copied());
        let required: BTreeSet<&str> = def
            .and_then(|d| d.get("required"))
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut fields: Vec<&Field> = message.fields.iter().collect();
        fields.sort_by_key(|f| f.tag);
        let mut entry = Map::new();
        for field in fields {
            let json_name = json_name(&field.rust_name, properties);
            let mut kind = field.kind;
            if let Some(props) = properties
                && !props.contains_key(&json_name)
            {
                if field.kind == "message" && !field.repeated && is_embedded(messages.get(&field.type_name), props) {
                    kind = "inline";
                    if !defs.contains_key(&field.type_name) {
                        embedded_in.entry(field.type_name.clone()).or_insert(props);
                    }
                } else {
                    guessed.push(format!("{name}.{json_name}"));
                }
            }
            let refers = field.kind == "message"
                || (field.kind == "map" && !matches!(field.type_name.as_str(), "string" | "bytes"));
            if refers {
                if !messages.contains_key(&field.type_name) {
                    bail!(
                        "gen-protobuf: {name}.{json_name} refers to unknown message {}",
                        field.type_name
                    );
                }
                queue.push_back(field.type_name.clone());
            }
            let is_required = required.contains(json_name.as_str());
            entry.insert(
                field.tag.to_string(),
                json!([json_name, kind, field.type_name, field.repeated, is_required]),
            );
        }
        out.insert(name, Value::Object(entry));
    }
    if !guessed.is_empty() {
        status(format!(
            "gen-protobuf: note: {} fields are not in {DEFINITIONS} (named in lowerCamelCase): {}",
            guessed.len(),
            guessed.join(", ")
        ));
    }
    let mut sorted: Vec<(String, Value)> = out.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Value::Object(sorted.into_iter().collect()))
}

/// A Go embedded struct (`json:",inline"`, e.g. `Volume.VolumeSource`) is a message field in
/// protobuf but its fields sit directly in the parent's JSON: every one of them is a property
/// of the parent definition.
fn is_embedded(message: Option<&Message>, parent: &Map<String, Value>) -> bool {
    message.is_some_and(|m| {
        !m.fields.is_empty()
            && m.fields
                .iter()
                .all(|f| parent.contains_key(&json_name(&f.rust_name, Some(parent))))
    })
}

/// The JSON property the Rust field came from: prost's snake_case is not reversible
/// (`volume_id` ← `volumeID`), so compare without case and underscores; else lowerCamelCase.
fn json_name(rust_name: &str, properties: Option<&Map<String, Value>>) -> String {
    let key = |s: &str| s.replace('_', "").to_ascii_lowercase();
    let wanted = key(rust_name);
    if let Some(found) = properties.and_then(|p| p.keys().find(|k| key(k) == wanted)) {
        return found.clone();
    }
    let mut out = String::with_capacity(rust_name.len());
    let mut upper = false;
    for c in rust_name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> DefinitionNames {
        let defs = json!({
            "io.k8s.api.core.v1.HTTPGetAction": {},
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {},
        });
        DefinitionNames::new(defs.as_object().unwrap())
    }

    fn module(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    #[test]
    fn struct_names_match_definitions_without_case() {
        let names = names();
        assert_eq!(
            names.name(&module("api/core/v1"), "HttpGetAction"),
            "io.k8s.api.core.v1.HTTPGetAction"
        );
        assert_eq!(
            names.name(
                &module("apiextensions_apiserver/pkg/apis/apiextensions/v1"),
                "JsonSchemaProps"
            ),
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JsonSchemaProps"
        );
    }

    #[test]
    fn parses_fields_with_relative_paths_and_maps() {
        let text = r#"
/// A doc comment.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Pod {
    /// metadata
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<super::super::super::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    pub containers: ::prost::alloc::vec::Vec<Container>,
    #[prost(string, optional, tag = "3")]
    pub r#type: ::core::option::Option<::prost::alloc::string::String>,
    #[prost(btree_map = "string, message", tag = "4")]
    pub limits: ::prost::alloc::collections::BTreeMap<
        ::prost::alloc::string::String,
        super::super::super::apimachinery::pkg::api::resource::Quantity,
    >,
    #[prost(btree_map = "string, bytes", tag = "5")]
    pub data: ::prost::alloc::collections::BTreeMap<::prost::alloc::string::String, ::prost::alloc::vec::Vec<u8>>,
    #[prost(int32, repeated, packed = "false", tag = "6")]
    pub codes: ::prost::alloc::vec::Vec<i32>,
}
impl crate::Resource for Pod {
    const KIND: &'static str = "Pod";
}
"#;
        let messages = parse_module(text, &module("api/core/v1"), &names()).unwrap();
        assert_eq!(messages.len(), 1);
        let f = &messages[0].fields;
        assert_eq!(f.len(), 6);
        assert_eq!(f[0].kind, "message");
        assert_eq!(f[0].type_name, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta");
        assert_eq!(
            (f[1].type_name.as_str(), f[1].repeated),
            ("io.k8s.api.core.v1.Container", true)
        );
        assert_eq!((f[2].rust_name.as_str(), f[2].kind), ("type", "string"));
        assert_eq!(
            (f[3].kind, f[3].type_name.as_str()),
            ("map", "io.k8s.apimachinery.pkg.api.resource.Quantity")
        );
        assert_eq!((f[4].kind, f[4].type_name.as_str()), ("map", "bytes"));
        assert_eq!((f[5].kind, f[5].repeated, f[5].tag), ("int32", true, 6));
    }

    #[test]
    fn json_names_come_from_the_definition_else_camel_case() {
        let props = json!({"volumeID": {}, "fsType": {}});
        let props = props.as_object();
        assert_eq!(json_name("volume_id", props), "volumeID");
        assert_eq!(json_name("fs_type", props), "fsType");
        assert_eq!(json_name("read_only", props), "readOnly");
        assert_eq!(json_name("int_val", None), "intVal");
    }
}
