//! Patch semantics of the API server: JSON patch (RFC 6902), JSON merge patch (RFC 7386),
//! Kubernetes strategic merge patch, and server-side apply with field ownership tracking in
//! `metadata.managedFields`.
//!
//! All functions are pure transformations of `serde_json::Value`s; the API server decides the
//! content type, loads the live object, and stores the result.
//!
//! Strategic merge patch follows `k8s.io/apimachinery/pkg/util/strategicpatch` as the API server
//! runs it (parallel lists merged, unmatched nulls ignored), driven by the
//! `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key` extensions of the OpenAPI
//! definitions instead of Go struct tags. Deliberate differences:
//! - fields the schema does not know are merged like plain maps (lists are replaced) instead of
//!   failing the patch;
//! - `$patch: merge` is accepted (and ignored) in maps and list elements;
//! - values taken whole from the patch (new fields, replaced lists) are cleaned of directives and
//!   nulls, so no `$…` key can leak into a stored object;
//! - a merging list of maps whose field declares no merge key is replaced instead of failing.
//!
//! Server-side apply is a simplified structured-merge-diff. Known gaps:
//! - a field set to `null` in an apply configuration is ignored (neither set nor owned);
//! - removing a field owned by the applier only leaves the enclosing map in place, even if it
//!   becomes empty; a list-map element is kept whenever another manager owns anything inside it;
//! - `status` is never tracked (Kubernetes tracks it for writes to the status subresource), and
//!   managers are identified by name and operation only (no subresource dimension);
//! - conflicts are only detected for leaf fields (scalars, atomic lists/maps, empty maps/lists);
//! - list-map key fields missing from an element get no defaults except `protocol: TCP`;
//! - no version conversion: every entry is recorded with the apiVersion of the request.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::schema::Schemas;

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch document is malformed (not JSON patch operations, unknown directive, missing
    /// merge key, …). HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The patch is well formed but cannot be applied to this object (a JSON patch `test` failed,
    /// a path does not exist, …). HTTP 422.
    #[error("{0}")]
    Invalid(String),
    /// Server-side apply would change fields owned by other managers. HTTP 409; each conflict
    /// becomes a `FieldManagerConflict` cause in the Status.
    #[error("{message}")]
    Conflict {
        message: String,
        conflicts: Vec<FieldConflict>,
    },
}

impl PatchError {
    /// The HTTP status code Kubernetes uses for this error.
    pub fn status_code(&self) -> u16 {
        match self {
            PatchError::BadRequest(_) => 400,
            PatchError::Invalid(_) => 422,
            PatchError::Conflict { .. } => 409,
        }
    }
}

/// One field an apply would take from another manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConflict {
    pub manager: String,
    pub operation: String,
    pub api_version: Option<String>,
    /// The field in structured-merge-diff notation, e.g. `.spec.containers[name="web"].image`.
    pub field: String,
}

impl FieldConflict {
    /// The message of the `FieldManagerConflict` status cause, e.g. `conflict with "kubectl" using apps/v1`.
    pub fn cause_message(&self) -> String {
        format!(
            "conflict with {}",
            describe_manager(&self.manager, self.api_version.as_deref())
        )
    }
}

fn bad(msg: impl Into<String>) -> PatchError {
    PatchError::BadRequest(msg.into())
}

// ---------------------------------------------------------------------------------------------
// JSON patch and JSON merge patch
// ---------------------------------------------------------------------------------------------

/// Apply an RFC 6902 JSON patch (`application/json-patch+json`).
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| bad(format!("invalid JSON patch: {e}")))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &ops)
        .map_err(|e| PatchError::Invalid(format!("the JSON patch could not be applied: {e}")))?;
    Ok(out)
}

/// Apply an RFC 7386 JSON merge patch (`application/merge-patch+json`).
pub fn merge_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Schema navigation shared by strategic merge patch and server-side apply
// ---------------------------------------------------------------------------------------------

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER_PREFIX: &str = "$setElementOrder/";
const DELETE_PRIMITIVE_PREFIX: &str = "$deleteFromPrimitiveList/";

/// A position in the schema: the property schema as written (carrying the `x-kubernetes-*`
/// extensions next to `$ref`) and its resolved form. Both are `None` for unknown fields.
#[derive(Clone, Copy, Default)]
struct Node<'a> {
    raw: Option<&'a Value>,
    schema: Option<&'a Value>,
}

#[derive(Clone, Copy)]
struct Nav<'a> {
    schemas: &'a Schemas,
}

impl<'a> Nav<'a> {
    fn node(&self, raw: &'a Value) -> Node<'a> {
        Node {
            raw: Some(raw),
            schema: Some(self.schemas.resolve(raw)),
        }
    }

    fn root(&self, definition: &str) -> Node<'a> {
        self.schemas
            .definition(definition)
            .map(|d| self.node(d))
            .unwrap_or_default()
    }

    /// The schema of `key` inside an object (a declared property, else the map value schema).
    fn field(&self, parent: Node<'a>, key: &str) -> Node<'a> {
        let Some(schema) = parent.schema else {
            return Node::default();
        };
        if let Some(raw) = schema.get("properties").and_then(|p| p.get(key)) {
            return self.node(raw);
        }
        match schema.get("additionalProperties") {
            Some(raw @ Value::Object(_)) => self.node(raw),
            _ => Node::default(),
        }
    }

    fn item(&self, list: Node<'a>) -> Node<'a> {
        list.schema
            .and_then(|s| s.get("items"))
            .map(|raw| self.node(raw))
            .unwrap_or_default()
    }
}

impl<'a> Node<'a> {
    /// An extension on the property schema, else on the resolved definition.
    fn ext(&self, name: &str) -> Option<&'a Value> {
        self.raw
            .and_then(|r| r.get(name))
            .or_else(|| self.schema.and_then(|s| s.get(name)))
    }

    fn raw_str(&self, name: &str) -> Option<&'a str> {
        self.raw.and_then(|r| r.get(name)).and_then(Value::as_str)
    }

    fn has_strategy(&self, strategy: &str) -> bool {
        self.raw_str("x-kubernetes-patch-strategy")
            .is_some_and(|s| s.split(',').any(|part| part.trim() == strategy))
    }

    fn merge_key(&self) -> Option<&'a str> {
        self.raw_str("x-kubernetes-patch-merge-key")
    }
}

// ---------------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------------

/// Apply a Kubernetes strategic merge patch (`application/strategic-merge-patch+json`) to
/// `original`, an object of the OpenAPI `definition` (e.g. `io.k8s.api.apps.v1.Deployment`).
pub fn strategic_merge_patch(
    schemas: &Schemas,
    definition: &str,
    original: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(bad("a strategic merge patch must be a JSON object"));
    };
    let original = match original {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let smp = Smp { nav: Nav { schemas } };
    let root = smp.nav.root(definition);
    Ok(Value::Object(smp.merge_map(root, original, patch.clone())?))
}

struct Smp<'a> {
    nav: Nav<'a>,
}

impl<'a> Smp<'a> {
    fn merge_map(
        &self,
        node: Node<'a>,
        mut original: Map<String, Value>,
        mut patch: Map<String, Value>,
    ) -> Result<Map<String, Value>, PatchError> {
        if let Some(directive) = patch.shift_remove(DIRECTIVE) {
            match directive.as_str() {
                Some("replace") => return self.merge_map(node, Map::new(), patch),
                Some("delete") => return Ok(Map::new()),
                Some("merge") => {}
                _ => return Err(bad(format!("unknown patch type {directive} in map"))),
            }
        }

        if let Some(retain) = patch.shift_remove(RETAIN_KEYS) {
            let keys = retain
                .as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<&str>>>())
                .ok_or_else(|| bad("$retainKeys must be a list of strings"))?;
            for (k, v) in &patch {
                if v.is_null() || k.starts_with(SET_ORDER_PREFIX) || k.starts_with(DELETE_PRIMITIVE_PREFIX) {
                    continue;
                }
                if !keys.contains(&k.as_str()) {
                    return Err(bad(format!(
                        "field {k:?} is in the patch but missing from $retainKeys {keys:?}"
                    )));
                }
            }
            original.retain(|k, _| keys.contains(&k.as_str()));
        }

        // `$setElementOrder/<field>` is processed together with `<field>` itself.
        let order_keys: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(SET_ORDER_PREFIX))
            .cloned()
            .collect();
        for order_key in order_keys {
            let order = patch.shift_remove(&order_key).unwrap_or(Value::Null);
            let field = &order_key[SET_ORDER_PREFIX.len()..];
            let Value::Array(order) = order else {
                return Err(bad(format!("{order_key} must be a list")));
            };
            let meta = self.nav.field(node, field);
            let key = meta.merge_key();
            let patch_list = match patch.shift_remove(field) {
                None => None,
                Some(Value::Array(a)) => Some(a),
                Some(_) => {
                    return Err(bad(format!("{field} must be a list when {order_key} is present")));
                }
            };
            let original_list = match original.get(field) {
                Some(Value::Array(a)) => Some(a.clone()),
                _ => None,
            };
            if let Some(p) = &patch_list {
                validate_set_order(p, &order, key, &order_key)?;
            }
            let merged = match (&original_list, patch_list) {
                (Some(o), None) => o.clone(),
                (None, Some(p)) => self.fill_list(meta, p)?,
                (Some(o), Some(p)) if meta.has_strategy("merge") => self.merge_list(meta, o.clone(), p)?,
                (Some(_), Some(p)) => self.fill_list(meta, p)?,
                (None, None) => continue,
            };
            let server_order = original_list.unwrap_or_default();
            let ordered = order_list(merged, &order, &server_order, key);
            set_field(&mut original, field, Value::Array(ordered));
        }

        let mut deletions = Vec::new();
        for (k, patch_value) in patch {
            if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE_PREFIX) {
                deletions.push((field.to_string(), patch_value));
                continue;
            }
            if patch_value.is_null() {
                original.shift_remove(&k);
                continue;
            }
            let meta = self.nav.field(node, &k);
            let merged = match original.get_mut(&k).map(Value::take) {
                None => self.fill(meta, patch_value)?,
                Some(Value::Object(o)) => match patch_value {
                    Value::Object(p) if !meta.has_strategy("replace") => Value::Object(self.merge_map(meta, o, p)?),
                    other => self.fill(meta, other)?,
                },
                Some(Value::Array(o)) => match patch_value {
                    Value::Array(p) if meta.has_strategy("merge") => Value::Array(self.merge_list(meta, o, p)?),
                    other => self.fill(meta, other)?,
                },
                Some(_) => self.fill(meta, patch_value)?,
            };
            set_field(&mut original, &k, merged);
        }

        for (field, list) in deletions {
            let Value::Array(remove) = list else {
                return Err(bad(format!("{DELETE_PRIMITIVE_PREFIX}{field} must be a list")));
            };
            if let Some(Value::Array(current)) = original.get_mut(&field) {
                current.retain(|v| !remove.contains(v));
            }
        }
        Ok(original)
    }

    /// Merge a list whose field has the `merge` strategy.
    fn merge_list(&self, meta: Node<'a>, original: Vec<Value>, patch: Vec<Value>) -> Result<Vec<Value>, PatchError> {
        if original.is_empty() && patch.is_empty() {
            return Ok(original);
        }
        let of_maps = original.iter().chain(patch.iter()).any(Value::is_object);
        if !of_maps {
            // Lists of primitives are unioned; items named by the patch are ordered as in the patch.
            let mut merged: Vec<Value> = Vec::with_capacity(original.len() + patch.len());
            for v in original.iter().chain(patch.iter()) {
                if !merged.contains(v) {
                    merged.push(v.clone());
                }
            }
            return Ok(order_list(merged, &patch, &original, None));
        }
        let Some(key) = meta.merge_key() else {
            return self.fill_list(meta, patch);
        };
        let item = self.nav.item(meta);

        let mut original = original;
        let mut plain = Vec::with_capacity(patch.len());
        let mut replace = false;
        for element in patch {
            let Value::Object(mut m) = element else {
                return Err(bad(format!("list elements must be objects when merging by {key:?}")));
            };
            match m.get(DIRECTIVE).map(|d| d.as_str()) {
                None => plain.push(m),
                Some(Some("delete")) => {
                    let value = m.get(key).ok_or_else(|| missing_merge_key(&m, key))?;
                    original.retain(|o| o.get(key) != Some(value));
                }
                Some(Some("replace")) => replace = true,
                Some(Some("merge")) => {
                    m.shift_remove(DIRECTIVE);
                    plain.push(m);
                }
                Some(_) => {
                    return Err(bad(format!("unknown patch type {} in list element", m[DIRECTIVE])));
                }
            }
        }
        if replace {
            return plain
                .into_iter()
                .map(|m| Ok(Value::Object(self.merge_map(item, Map::new(), m)?)))
                .collect();
        }

        let server_order = original.clone();
        let mut merged = original;
        let mut order = Vec::with_capacity(plain.len());
        for m in plain {
            let value = m.get(key).ok_or_else(|| missing_merge_key(&m, key))?.clone();
            order.push(json!({ key: value.clone() }));
            match merged.iter().position(|o| o.get(key) == Some(&value)) {
                Some(pos) => {
                    let existing = match merged[pos].take() {
                        Value::Object(o) => o,
                        _ => Map::new(),
                    };
                    merged[pos] = Value::Object(self.merge_map(item, existing, m)?);
                }
                None => merged.push(Value::Object(self.merge_map(item, Map::new(), m)?)),
            }
        }
        Ok(order_list(merged, &order, &server_order, Some(key)))
    }

    /// A patch value taken as is (no original to merge into): cleaned of directives and nulls.
    fn fill(&self, meta: Node<'a>, value: Value) -> Result<Value, PatchError> {
        Ok(match value {
            Value::Object(m) => Value::Object(self.merge_map(meta, Map::new(), m)?),
            Value::Array(a) => Value::Array(self.fill_list(meta, a)?),
            other => other,
        })
    }

    fn fill_list(&self, meta: Node<'a>, list: Vec<Value>) -> Result<Vec<Value>, PatchError> {
        if meta.has_strategy("merge") && meta.merge_key().is_some() {
            return self.merge_list(meta, Vec::new(), list);
        }
        let item = self.nav.item(meta);
        list.into_iter()
            .map(|v| match v {
                Value::Object(m) => Ok(Value::Object(self.merge_map(item, Map::new(), m)?)),
                other => Ok(other),
            })
            .collect()
    }
}

fn missing_merge_key(element: &Map<String, Value>, key: &str) -> PatchError {
    bad(format!(
        "map {} does not contain declared merge key {key:?}",
        Value::Object(element.clone())
    ))
}

/// Replace a field's value in place (keeping its position), or append it.
fn set_field(map: &mut Map<String, Value>, key: &str, value: Value) {
    match map.get_mut(key) {
        Some(slot) => *slot = value,
        None => {
            map.insert(key.to_string(), value);
        }
    }
}

/// What identifies a list element: its merge key value, or the element itself.
fn identity<'v>(v: &'v Value, key: Option<&str>) -> Option<&'v Value> {
    match (key, v) {
        (Some(k), Value::Object(m)) => m.get(k),
        _ => Some(v),
    }
}

fn index_in(list: &[Value], v: &Value, key: Option<&str>) -> Option<usize> {
    let id = identity(v, key)?;
    list.iter().position(|x| identity(x, key) == Some(id))
}

/// Every non-directive element of the patch list must appear in `$setElementOrder`, in the same
/// relative order.
fn validate_set_order(patch: &[Value], order: &[Value], key: Option<&str>, directive: &str) -> Result<(), PatchError> {
    let mut next = 0;
    for element in patch.iter().filter(|e| e.get(DIRECTIVE).is_none()) {
        let Some(id) = identity(element, key) else {
            return Err(bad(format!("list element {element} has no merge key {key:?}")));
        };
        match order[next.min(order.len())..]
            .iter()
            .position(|o| identity(o, key) == Some(id))
        {
            Some(pos) => next += pos + 1,
            None => {
                return Err(bad(format!("the order of the patch list does not match {directive}")));
            }
        }
    }
    Ok(())
}

/// Order a merged list like the Kubernetes strategic merge patch: items named in `order` follow
/// that order, the others keep the server's order, and the two sequences are interleaved by
/// their positions in the server list where both are known.
fn order_list(merged: Vec<Value>, order: &[Value], server: &[Value], key: Option<&str>) -> Vec<Value> {
    let (mut named, mut server_only): (Vec<Value>, Vec<Value>) =
        merged.into_iter().partition(|v| index_in(order, v, key).is_some());
    named.sort_by_key(|v| index_in(order, v, key).unwrap_or(usize::MAX));
    server_only.sort_by_key(|v| index_in(server, v, key).unwrap_or(usize::MAX));

    let mut out = Vec::with_capacity(named.len() + server_only.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = named.into_iter().peekable();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => match (index_in(server, l, key), index_in(server, r, key)) {
                (Some(li), Some(ri)) => li < ri,
                _ => false,
            },
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Field sets (the FieldsV1 format)
// ---------------------------------------------------------------------------------------------

/// A set of field paths as a tree keyed by encoded path elements (`f:name`, `k:{"name":"x"}`,
/// `v:"x"`, `i:0`). `own` marks the node itself as a member (`.` in FieldsV1, or a leaf `{}`).
#[derive(Debug, Clone, Default, PartialEq)]
struct FieldSet {
    own: bool,
    children: BTreeMap<String, FieldSet>,
}

type FieldPath = Vec<String>;

impl FieldSet {
    fn from_fields_v1(v: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        if let Value::Object(m) = v {
            for (k, child) in m {
                if k == "." {
                    set.own = true;
                    continue;
                }
                let mut node = FieldSet::from_fields_v1(child);
                if !matches!(child, Value::Object(o) if !o.is_empty()) {
                    node.own = true;
                }
                set.children.insert(k.clone(), node);
            }
        }
        set
    }

    fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        if self.own && !self.children.is_empty() {
            m.insert(".".to_string(), json!({}));
        }
        for (k, child) in &self.children {
            m.insert(k.clone(), child.to_fields_v1());
        }
        Value::Object(m)
    }

    fn is_empty(&self) -> bool {
        !self.own && self.children.is_empty()
    }

    fn node(&self, path: &[String]) -> Option<&FieldSet> {
        let mut node = self;
        for pe in path {
            node = node.children.get(pe)?;
        }
        Some(node)
    }

    /// Whether the path itself is a member.
    fn contains(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| n.own)
    }

    /// Whether the path or anything below it is a member.
    fn touches(&self, path: &[String]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    fn insert(&mut self, path: &[String]) {
        let mut node = self;
        for pe in path {
            node = node.children.entry(pe.clone()).or_default();
        }
        node.own = true;
    }

    /// Remove the path itself (not what is below it).
    fn remove(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.own = false,
            Some((first, rest)) => {
                if let Some(child) = self.children.get_mut(first) {
                    child.remove(rest);
                    if child.is_empty() {
                        self.children.remove(first);
                    }
                }
            }
        }
    }

    /// Remove the path and everything below it.
    fn remove_tree(&mut self, path: &[String]) {
        match path {
            [] => *self = FieldSet::default(),
            [last] => {
                self.children.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(child) = self.children.get_mut(first) {
                    child.remove_tree(rest);
                    if child.is_empty() {
                        self.children.remove(first);
                    }
                }
            }
        }
    }

    fn union(&mut self, other: &FieldSet) {
        self.own |= other.own;
        for (k, child) in &other.children {
            self.children.entry(k.clone()).or_default().union(child);
        }
    }

    /// Member paths, parents before children, each with whether it is a leaf.
    fn paths(&self) -> Vec<(FieldPath, bool)> {
        fn walk(node: &FieldSet, prefix: &mut FieldPath, out: &mut Vec<(FieldPath, bool)>) {
            if node.own && !prefix.is_empty() {
                out.push((prefix.clone(), node.children.is_empty()));
            }
            for (k, child) in &node.children {
                prefix.push(k.clone());
                walk(child, prefix, out);
                prefix.pop();
            }
        }
        let mut out = Vec::new();
        walk(self, &mut Vec::new(), &mut out);
        out
    }
}

/// Render a path like structured-merge-diff does: `.spec.containers[name="web"].image`.
fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            let fields = serde_json::from_str::<Map<String, Value>>(k)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|_| k.to_string());
            s.push_str(&format!("[{fields}]"));
        } else if let Some(v) = pe.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = pe.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        } else {
            s.push_str(pe);
        }
    }
    s
}

/// Default values of list-map key fields that clients commonly omit.
fn key_default(field: &str) -> Option<Value> {
    (field == "protocol").then(|| json!("TCP"))
}

fn key_of(element: &Value, keys: &[String]) -> Option<Map<String, Value>> {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let mut out = Map::new();
    for k in sorted {
        let v = element
            .get(k)
            .filter(|v| !v.is_null())
            .cloned()
            .or_else(|| key_default(k))?;
        out.insert(k.clone(), v);
    }
    Some(out)
}

fn matches_key(element: &Value, key: &Map<String, Value>) -> bool {
    key.iter().all(|(k, v)| match element.get(k) {
        Some(e) if !e.is_null() => e == v,
        _ => key_default(k).as_ref() == Some(v),
    })
}

fn step<'v>(v: &'v Value, pe: &str) -> Option<&'v Value> {
    if let Some(f) = pe.strip_prefix("f:") {
        v.as_object()?.get(f)
    } else {
        let pos = list_position(v.as_array()?, pe)?;
        v.as_array()?.get(pos)
    }
}

fn list_position(list: &[Value], pe: &str) -> Option<usize> {
    if let Some(k) = pe.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).ok()?;
        list.iter().position(|e| matches_key(e, &key))
    } else if let Some(j) = pe.strip_prefix("v:") {
        let value: Value = serde_json::from_str(j).ok()?;
        list.iter().position(|e| *e == value)
    } else if let Some(i) = pe.strip_prefix("i:") {
        i.parse().ok().filter(|i| *i < list.len())
    } else {
        None
    }
}

fn get_path<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, pe| step(v, pe))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = v;
    for pe in parents {
        let next = if let Some(f) = pe.strip_prefix("f:") {
            v.as_object_mut().and_then(|m| m.get_mut(f))
        } else {
            match v {
                Value::Array(list) => list_position(list, pe).map(move |i| &mut list[i]),
                _ => None,
            }
        };
        match next {
            Some(n) => v = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Value::Object(m) = v {
            m.shift_remove(f);
        }
    } else if let Value::Array(list) = v
        && let Some(i) = list_position(list, last)
    {
        list.remove(i);
    }
}

/// A key field of a list-map element (`…k:{"name":"x"}.f:name`): never pruned on its own.
fn is_key_field(path: &[String]) -> bool {
    let [.., parent, last] = path else {
        return false;
    };
    let (Some(key), Some(field)) = (parent.strip_prefix("k:"), last.strip_prefix("f:")) else {
        return false;
    };
    serde_json::from_str::<Map<String, Value>>(key).is_ok_and(|m| m.contains_key(field))
}

// ---------------------------------------------------------------------------------------------
// Server-side apply
// ---------------------------------------------------------------------------------------------

enum Shape {
    /// A struct or a granular map: one `f:` child per key.
    Object,
    /// A leaf: scalar, atomic list or atomic map.
    Leaf,
    /// `x-kubernetes-list-type: map`: one `k:` child per element.
    ListMap(Vec<String>),
    /// `x-kubernetes-list-type: set`: one `v:` child per element.
    ListSet,
}

/// Paths never tracked in managedFields (they belong to the server).
const STRIPPED: &[&[&str]] = &[
    &["f:apiVersion"],
    &["f:kind"],
    &["f:status"],
    &["f:metadata", "f:name"],
    &["f:metadata", "f:namespace"],
    &["f:metadata", "f:uid"],
    &["f:metadata", "f:resourceVersion"],
    &["f:metadata", "f:generation"],
    &["f:metadata", "f:creationTimestamp"],
    &["f:metadata", "f:deletionTimestamp"],
    &["f:metadata", "f:deletionGracePeriodSeconds"],
    &["f:metadata", "f:selfLink"],
    &["f:metadata", "f:managedFields"],
];

impl<'a> Nav<'a> {
    fn shape(&self, node: Node<'a>, v: &Value) -> Shape {
        match v {
            Value::Object(_) => {
                if node.ext("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic") {
                    Shape::Leaf
                } else {
                    Shape::Object
                }
            }
            Value::Array(_) => {
                let merge_key = node.merge_key();
                match node.raw_str("x-kubernetes-list-type") {
                    Some("map") => {
                        let keys: Vec<String> = node
                            .raw
                            .and_then(|r| r.get("x-kubernetes-list-map-keys"))
                            .and_then(Value::as_array)
                            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                            .filter(|k: &Vec<String>| !k.is_empty())
                            .or_else(|| merge_key.map(|k| vec![k.to_string()]))
                            .unwrap_or_default();
                        if keys.is_empty() {
                            Shape::Leaf
                        } else {
                            Shape::ListMap(keys)
                        }
                    }
                    Some("set") => Shape::ListSet,
                    Some(_) => Shape::Leaf,
                    None if node.has_strategy("merge") => match merge_key {
                        Some(k) => Shape::ListMap(vec![k.to_string()]),
                        None => Shape::ListSet,
                    },
                    None => Shape::Leaf,
                }
            }
            _ => Shape::Leaf,
        }
    }

    /// The fields set in `v` (an object of the root schema), minus server-owned metadata.
    fn managed_set(&self, root: Node<'a>, v: &Value, strict: bool) -> Result<FieldSet, PatchError> {
        let mut set = FieldSet::default();
        if let Value::Object(m) = v {
            self.collect_fields(root, m, &mut set, strict)?;
        }
        for path in STRIPPED {
            let path: FieldPath = path.iter().map(|s| s.to_string()).collect();
            set.remove_tree(&path);
        }
        set.remove(&["f:metadata".to_string()]);
        Ok(set)
    }

    fn collect_fields(
        &self,
        node: Node<'a>,
        m: &Map<String, Value>,
        out: &mut FieldSet,
        strict: bool,
    ) -> Result<(), PatchError> {
        for (k, v) in m {
            if v.is_null() {
                continue;
            }
            let mut child = FieldSet::default();
            self.collect(self.field(node, k), v, &mut child, strict)?;
            out.children.insert(format!("f:{k}"), child);
        }
        Ok(())
    }

    fn collect(&self, node: Node<'a>, v: &Value, out: &mut FieldSet, strict: bool) -> Result<(), PatchError> {
        match (self.shape(node, v), v) {
            (Shape::Object, Value::Object(m)) => {
                self.collect_fields(node, m, out, strict)?;
                if out.children.is_empty() {
                    out.own = true;
                }
            }
            (Shape::ListMap(keys), Value::Array(list)) => {
                let item = self.item(node);
                for element in list {
                    let Some(key) = key_of(element, &keys) else {
                        if strict {
                            return Err(bad(format!("list element {element} is missing key fields {keys:?}")));
                        }
                        continue;
                    };
                    let pe = format!("k:{}", Value::Object(key));
                    if strict && out.children.contains_key(&pe) {
                        return Err(bad(format!("duplicate entries for key {}", &pe[2..])));
                    }
                    let child = out.children.entry(pe).or_default();
                    child.own = true;
                    if let Value::Object(m) = element {
                        self.collect_fields(item, m, child, strict)?;
                    }
                }
                if out.children.is_empty() {
                    out.own = true;
                }
            }
            (Shape::ListSet, Value::Array(list)) => {
                for element in list.iter().filter(|e| !e.is_null()) {
                    out.children.entry(format!("v:{element}")).or_default().own = true;
                }
                if out.children.is_empty() {
                    out.own = true;
                }
            }
            _ => out.own = true,
        }
        Ok(())
    }

    /// The live value with the applied configuration merged in.
    fn merge_applied(&self, node: Node<'a>, live: Option<Value>, applied: &Value) -> Value {
        match (self.shape(node, applied), live, applied) {
            (Shape::Object, Some(Value::Object(mut live)), Value::Object(applied)) => {
                for (k, av) in applied {
                    if av.is_null() {
                        continue;
                    }
                    let lv = live.get_mut(k).map(Value::take);
                    let merged = self.merge_applied(self.field(node, k), lv, av);
                    set_field(&mut live, k, merged);
                }
                Value::Object(live)
            }
            (Shape::ListMap(keys), Some(Value::Array(live)), Value::Array(applied)) => {
                let item = self.item(node);
                let id = |v: &Value| key_of(v, &keys).map(|k| Value::Object(k).to_string());
                Value::Array(merge_list_items(live, applied, id, |lv, av| match lv {
                    Some(lv) => self.merge_applied(item, Some(lv), av),
                    None => without_nulls(av),
                }))
            }
            (Shape::ListSet, Some(Value::Array(live)), Value::Array(applied)) => {
                let id = |v: &Value| (!v.is_null()).then(|| v.to_string());
                Value::Array(merge_list_items(live, applied, id, |_, av| av.clone()))
            }
            (_, _, applied) => without_nulls(applied),
        }
    }
}

/// Merge the items of an associative list (list map or set) like structured-merge-diff: applied
/// items in applied order, live-only items kept where they were relative to the shared ones.
/// Live items without an identity are kept; duplicates (by identity) are dropped.
fn merge_list_items(
    live: Vec<Value>,
    applied: &[Value],
    id: impl Fn(&Value) -> Option<String>,
    mut merge: impl FnMut(Option<Value>, &Value) -> Value,
) -> Vec<Value> {
    let mut rhs: Vec<(String, &Value)> = Vec::with_capacity(applied.len());
    for v in applied {
        if let Some(i) = id(v)
            && !rhs.iter().any(|(r, _)| *r == i)
        {
            rhs.push((i, v));
        }
    }
    let mut lhs: Vec<(Option<String>, Option<Value>)> = Vec::with_capacity(live.len());
    for v in live {
        let i = id(&v);
        if i.is_some() && lhs.iter().any(|(l, _)| *l == i) {
            continue;
        }
        lhs.push((i, Some(v)));
    }
    let in_rhs = |i: &Option<String>| i.as_ref().is_some_and(|i| rhs.iter().any(|(r, _)| r == i));
    let shared: Vec<&String> = rhs
        .iter()
        .map(|(r, _)| r)
        .filter(|r| lhs.iter().any(|(l, _)| l.as_ref() == Some(*r)))
        .collect();
    let mut shared = shared.into_iter();
    let mut next_shared = shared.next();

    let mut out = Vec::with_capacity(lhs.len().max(rhs.len()));
    let (mut li, mut ri) = (0, 0);
    while li < lhs.len() || ri < rhs.len() {
        if li < lhs.len() && ri < rhs.len() {
            if lhs[li].0.as_ref() == Some(&rhs[ri].0) {
                let lv = lhs[li].1.take();
                out.push(merge(lv, rhs[ri].1));
                li += 1;
                ri += 1;
                next_shared = shared.next();
                continue;
            }
            if in_rhs(&lhs[li].0) && next_shared.is_some_and(|n| Some(n) != lhs[li].0.as_ref()) {
                li += 1;
                continue;
            }
        }
        if li < lhs.len() && !in_rhs(&lhs[li].0) {
            out.extend(lhs[li].1.take());
            li += 1;
            continue;
        }
        if ri < rhs.len() {
            let (r, av) = (&rhs[ri].0, rhs[ri].1);
            let lv = lhs
                .iter_mut()
                .find(|(l, _)| l.as_ref() == Some(r))
                .and_then(|(_, v)| v.take());
            out.push(merge(lv, av));
            if next_shared == Some(r) {
                next_shared = shared.next();
            }
            ri += 1;
        } else {
            li += 1;
        }
    }
    out
}

fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: Option<String>,
    time: Option<String>,
    subresource: Option<String>,
    set: FieldSet,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.is_none()
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        if let Some(v) = &self.api_version {
            m.insert("apiVersion".into(), json!(v));
        }
        if let Some(t) = &self.time {
            m.insert("time".into(), json!(t));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), self.set.to_fields_v1());
        if let Some(s) = &self.subresource {
            m.insert("subresource".into(), json!(s));
        }
        Value::Object(m)
    }
}

fn parse_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else {
        return Vec::new();
    };
    let text = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
    list.iter()
        .map(|e| Entry {
            manager: text(e, "manager").unwrap_or_default(),
            operation: text(e, "operation").unwrap_or_default(),
            api_version: text(e, "apiVersion"),
            time: text(e, "time"),
            subresource: text(e, "subresource"),
            set: e.get("fieldsV1").map(FieldSet::from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

/// Store the entries (sorted like Kubernetes: Apply before Update, then by time and manager).
fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (
            a.operation.as_str(),
            a.time.as_deref().unwrap_or(""),
            a.manager.as_str(),
        )
            .cmp(&(
                b.operation.as_str(),
                b.time.as_deref().unwrap_or(""),
                b.manager.as_str(),
            ))
    });
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(root) = obj else { return };
    let metadata = root.entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    let Value::Object(metadata) = metadata else {
        return;
    };
    if entries.is_empty() {
        metadata.shift_remove("managedFields");
    } else {
        set_field(
            metadata,
            "managedFields",
            Value::Array(entries.iter().map(Entry::to_json).collect()),
        );
    }
}

/// The object without `metadata.managedFields`.
fn body(v: &Value) -> Value {
    let mut out = match v {
        Value::Object(_) => v.clone(),
        _ => Value::Object(Map::new()),
    };
    if let Some(Value::Object(metadata)) = out.get_mut("metadata") {
        metadata.shift_remove("managedFields");
    }
    out
}

fn api_version_of(v: &Value) -> Option<String> {
    v.get("apiVersion").and_then(Value::as_str).map(str::to_string)
}

fn describe_manager(manager: &str, api_version: Option<&str>) -> String {
    match api_version {
        Some(v) => format!("{manager:?} using {v}"),
        None => format!("{manager:?}"),
    }
}

fn conflict_error(conflicts: Vec<FieldConflict>) -> PatchError {
    let n = conflicts.len();
    let message = if let [only] = conflicts.as_slice() {
        format!("Apply failed with 1 conflict: {}: {}", only.cause_message(), only.field)
    } else {
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for c in &conflicts {
            let who = describe_manager(&c.manager, c.api_version.as_deref());
            match groups.iter_mut().find(|(w, _)| *w == who) {
                Some((_, fields)) => fields.push(&c.field),
                None => groups.push((who, vec![&c.field])),
            }
        }
        let body: Vec<String> = groups
            .iter()
            .map(|(who, fields)| {
                let lines: Vec<String> = fields.iter().map(|f| format!("- {f}")).collect();
                format!("conflicts with {who}:\n{}", lines.join("\n"))
            })
            .collect();
        format!("Apply failed with {n} conflicts: {}", body.join("\n"))
    };
    PatchError::Conflict { message, conflicts }
}

/// Server-side apply (`application/apply-patch+yaml`, already decoded): merge the `applied`
/// configuration of `manager` into `live` and return the new object with
/// `metadata.managedFields` updated. When apply creates the object, `live` is `Value::Null`, `{}`
/// or a skeleton without `metadata.resourceVersion`; a stored object (one with a
/// resourceVersion) that has no managedFields yet gets its current fields attributed to a
/// `before-first-apply` Update manager first, as in Kubernetes.
///
/// Fields the manager applied before but omits now are removed unless another manager owns them.
/// Changing a field owned by another manager fails with [`PatchError::Conflict`] unless `force`,
/// in which case the ownership moves to `manager`.
pub fn apply_patch(
    schemas: &Schemas,
    definition: &str,
    live: &Value,
    applied: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, PatchError> {
    if !applied.is_object() {
        return Err(bad("an apply configuration must be an object"));
    }
    if let Some(mf) = applied.pointer("/metadata/managedFields")
        && !(mf.is_null() || mf.as_array().is_some_and(Vec::is_empty))
    {
        return Err(bad("metadata.managedFields must be nil"));
    }
    let nav = Nav { schemas };
    let root = nav.root(definition);
    let live_body = body(live);
    let api_version = api_version_of(applied).or_else(|| api_version_of(live));

    let mut entries = parse_entries(live);
    let stored = live.pointer("/metadata/resourceVersion").is_some_and(|v| !v.is_null());
    let set = if entries.is_empty() && stored {
        nav.managed_set(root, &live_body, false)?
    } else {
        FieldSet::default()
    };
    if !set.is_empty() {
        // A stored object nobody tracked yet: what it holds belongs to a placeholder manager.
        entries.push(Entry {
            manager: "before-first-apply".into(),
            operation: "Update".into(),
            api_version: api_version_of(live),
            time: Some(super::time::now_rfc3339()),
            subresource: None,
            set,
        });
    }

    let new_set = nav.managed_set(root, applied, true)?;
    let mut merged = nav.merge_applied(root, Some(live_body.clone()), applied);
    let me = entries.iter().position(|e| e.is(manager, "Apply"));
    let old_set = me.map(|i| entries[i].set.clone()).unwrap_or_default();

    let mut conflicts: Vec<(usize, FieldPath)> = Vec::new();
    for (path, leaf) in new_set.paths() {
        if !leaf {
            continue;
        }
        let before = get_path(&live_body, &path);
        if before.is_none() || before == get_path(&merged, &path) {
            continue;
        }
        for (j, e) in entries.iter().enumerate() {
            if Some(j) != me && e.set.contains(&path) {
                conflicts.push((j, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        if !force {
            let list = conflicts
                .iter()
                .map(|(j, path)| FieldConflict {
                    manager: entries[*j].manager.clone(),
                    operation: entries[*j].operation.clone(),
                    api_version: entries[*j].api_version.clone(),
                    field: path_string(path),
                })
                .collect();
            return Err(conflict_error(list));
        }
        for (j, path) in &conflicts {
            entries[*j].set.remove(path);
        }
    }

    // Fields this manager stopped applying go away unless someone else still owns them.
    let mut others = FieldSet::default();
    for (j, e) in entries.iter().enumerate() {
        if Some(j) != me {
            others.union(&e.set);
        }
    }
    for (path, _) in old_set.paths() {
        if new_set.touches(&path) || others.touches(&path) || is_key_field(&path) {
            continue;
        }
        remove_path(&mut merged, &path);
    }

    let changed = merged != live_body;
    match me {
        Some(i) => {
            let entry = &mut entries[i];
            if changed || entry.set != new_set || entry.time.is_none() {
                entry.time = Some(super::time::now_rfc3339());
            }
            entry.set = new_set;
            entry.api_version = api_version;
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version,
            time: Some(super::time::now_rfc3339()),
            subresource: None,
            set: new_set,
        }),
    }
    write_entries(&mut merged, entries);
    Ok(merged)
}

/// Record a non-apply write (create, update, any patch) by `manager`: returns `new` with
/// `metadata.managedFields` updated. Fields the write added or changed become owned by
/// `manager` (as an `operation: Update` entry) and are taken from other managers; fields it
/// removed are dropped from every manager. `old` is `Value::Null` for a create.
///
/// `metadata.managedFields` in `new` follows Kubernetes: absent, `null` or `[]` keeps the old
/// entries; `[{}]` (a single empty entry) strips them, leaving the object untracked; any other
/// value that differs from the old entries replaces them before this write is recorded.
pub fn record_update(schemas: &Schemas, definition: &str, old: &Value, new: &Value, manager: &str) -> Value {
    let nav = Nav { schemas };
    let root = nav.root(definition);
    let old_mf = old.pointer("/metadata/managedFields");
    let new_mf = new.pointer("/metadata/managedFields");
    let old_body = body(old);
    let new_body = body(new);
    let mut entries = match new_mf {
        Some(Value::Array(list)) if list.len() == 1 && list[0].as_object().is_some_and(Map::is_empty) => {
            return new_body;
        }
        Some(Value::Array(list)) if !list.is_empty() && new_mf != old_mf => parse_entries(new),
        _ => parse_entries(old),
    };
    let old_set = nav.managed_set(root, &old_body, false).unwrap_or_default();
    let new_set = nav.managed_set(root, &new_body, false).unwrap_or_default();

    let mut changed = FieldSet::default();
    for (path, leaf) in new_set.paths() {
        if !old_set.contains(&path) || (leaf && get_path(&old_body, &path) != get_path(&new_body, &path)) {
            changed.insert(&path);
        }
    }
    let removed: Vec<FieldPath> = old_set
        .paths()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !new_set.contains(p))
        .collect();
    let changed_paths: Vec<FieldPath> = changed.paths().into_iter().map(|(p, _)| p).collect();

    let me = entries.iter().position(|e| e.is(manager, "Update"));
    for (j, e) in entries.iter_mut().enumerate() {
        if Some(j) != me {
            for p in &changed_paths {
                e.set.remove(p);
            }
        }
        for p in &removed {
            e.set.remove(p);
        }
    }
    if !changed.is_empty() || !removed.is_empty() {
        let now = super::time::now_rfc3339();
        let api_version = api_version_of(new);
        match me {
            Some(i) => {
                let entry = &mut entries[i];
                entry.set.union(&changed);
                entry.time = Some(now);
                entry.api_version = api_version;
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version,
                time: Some(now),
                subresource: None,
                set: changed,
            }),
        }
    }
    let mut out = new_body;
    write_entries(&mut out, entries);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "io.k8s.api.core.v1.Pod";
    const DEPLOYMENT: &str = "io.k8s.api.apps.v1.Deployment";

    fn schemas() -> &'static Schemas {
        Schemas::builtin()
    }

    fn smp(definition: &str, original: Value, patch: Value) -> Value {
        let out = strategic_merge_patch(schemas(), definition, &original, &patch).expect("patch applies");
        assert_no_directives(&out);
        out
    }

    fn assert_no_directives(v: &Value) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    assert!(!k.starts_with('$'), "directive {k} left in result");
                    assert_no_directives(v);
                }
            }
            Value::Array(a) => a.iter().for_each(assert_no_directives),
            _ => {}
        }
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "web"}, "finalizers": ["a.example/x", "b.example/y"]},
            "spec": {"containers": [
                {"name": "web", "image": "nginx:1.24", "args": ["--one", "--two"], "ports": [{"containerPort": 80}]},
                {"name": "sidecar", "image": "envoy:1", "env": [{"name": "A", "value": "1"}]},
            ]}
        })
    }

    // ----- JSON patch / merge patch -----

    #[test]
    fn json_patch_applies_operations() {
        let out = json_patch(
            &json!({"a": 1, "b": [1, 2]}),
            &json!([
                {"op": "replace", "path": "/a", "value": 2},
                {"op": "add", "path": "/b/-", "value": 3},
            ]),
        )
        .unwrap();
        assert_eq!(out, json!({"a": 2, "b": [1, 2, 3]}));
    }

    #[test]
    fn json_patch_failing_test_is_invalid_and_garbage_is_bad_request() {
        let err = json_patch(&json!({"a": 1}), &json!([{"op": "test", "path": "/a", "value": 2}])).unwrap_err();
        assert!(matches!(err, PatchError::Invalid(_)), "{err:?}");
        let err = json_patch(&json!({"a": 1}), &json!({"op": "nonsense"})).unwrap_err();
        assert_eq!(err.status_code(), 400);
    }

    #[test]
    fn merge_patch_null_deletes_and_objects_merge() {
        let out = merge_patch(
            &json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}}),
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
    }

    // ----- strategic merge patch -----

    #[test]
    fn smp_merges_containers_by_name_keeping_others() {
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}}),
        );
        let containers = &out["spec"]["containers"];
        assert_eq!(names(containers), ["web", "sidecar"]);
        assert_eq!(containers[0]["image"], "nginx:1.25");
        assert_eq!(
            containers[0]["args"],
            json!(["--one", "--two"]),
            "unpatched fields of the element stay"
        );
        assert_eq!(containers[1]["image"], "envoy:1");
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
    }

    #[test]
    fn smp_null_deletes_a_field() {
        let out = smp(
            POD,
            pod(),
            json!({"metadata": {"labels": {"app": null, "tier": "front"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"tier": "front"}));
    }

    #[test]
    fn smp_patch_delete_removes_a_container() {
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}),
        );
        assert_eq!(names(&out["spec"]["containers"]), ["web"]);
    }

    #[test]
    fn smp_patch_replace_in_list_replaces_the_whole_list() {
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "busybox"}]}}),
        );
        assert_eq!(out["spec"]["containers"], json!([{"name": "only", "image": "busybox"}]));
    }

    #[test]
    fn smp_patch_replace_and_delete_in_a_map() {
        let out = smp(
            POD,
            pod(),
            json!({"metadata": {"labels": {"$patch": "replace", "new": "yes"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"new": "yes"}));
        let out = smp(POD, pod(), json!({"metadata": {"labels": {"$patch": "delete"}}}));
        assert_eq!(out["metadata"]["labels"], json!({}));
        let out = smp(
            POD,
            pod(),
            json!({"metadata": {"labels": {"$patch": "merge", "x": "1"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "x": "1"}));
    }

    #[test]
    fn smp_set_element_order_orders_the_merged_list() {
        let out = smp(
            POD,
            pod(),
            json!({"spec": {
                "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "new"}, {"name": "web"}],
                "containers": [{"name": "new", "image": "busybox"}],
            }}),
        );
        assert_eq!(names(&out["spec"]["containers"]), ["sidecar", "new", "web"]);
    }

    #[test]
    fn smp_new_elements_without_order_directive_follow_kubernetes_ordering() {
        // Kubernetes interleaves by server order only where both items are known: a new item
        // named first in the patch goes before the server-only items.
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"name": "new", "image": "busybox"}]}}),
        );
        assert_eq!(names(&out["spec"]["containers"]), ["new", "web", "sidecar"]);
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"name": "sidecar", "image": "envoy:2"}, {"name": "new", "image": "busybox"}]}}),
        );
        assert_eq!(names(&out["spec"]["containers"]), ["web", "sidecar", "new"]);
    }

    #[test]
    fn smp_set_element_order_rejects_inconsistent_patch_order() {
        let err = strategic_merge_patch(
            schemas(),
            POD,
            &pod(),
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "web"}, {"name": "sidecar"}],
                "containers": [{"name": "sidecar", "image": "x"}, {"name": "web", "image": "y"}],
            }}),
        )
        .unwrap_err();
        assert_eq!(err.status_code(), 400);
    }

    #[test]
    fn smp_replaces_atomic_lists() {
        let out = smp(
            POD,
            pod(),
            json!({"spec": {"containers": [{"name": "web", "args": ["--three"]}]}}),
        );
        assert_eq!(out["spec"]["containers"][0]["args"], json!(["--three"]));
    }

    #[test]
    fn smp_unions_finalizers_and_deletes_from_primitive_list() {
        let out = smp(
            POD,
            pod(),
            json!({"metadata": {"finalizers": ["b.example/y", "c.example/z"]}}),
        );
        let mut f: Vec<&str> = out["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        f.sort();
        assert_eq!(f, ["a.example/x", "b.example/y", "c.example/z"]);

        let out = smp(
            POD,
            pod(),
            json!({"metadata": {
                "$setElementOrder/finalizers": ["b.example/y"],
                "$deleteFromPrimitiveList/finalizers": ["a.example/x"],
            }}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b.example/y"]));
    }

    #[test]
    fn smp_retain_keys_clears_unlisted_fields() {
        let original =
            json!({"spec": {"replicas": 2, "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let out = smp(
            DEPLOYMENT,
            original.clone(),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(out["spec"]["replicas"], 2);

        let err = strategic_merge_patch(
            schemas(),
            DEPLOYMENT,
            &original,
            &json!({"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": {"maxSurge": 2}}}}),
        )
        .unwrap_err();
        assert_eq!(
            err.status_code(),
            400,
            "a patched key missing from $retainKeys is rejected"
        );
    }

    #[test]
    fn smp_like_kubectl_apply_changing_image_and_removing_env() {
        let live = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "annotations": {"deployment.kubernetes.io/revision": "1"}},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{
                        "name": "web", "image": "nginx:1.24", "imagePullPolicy": "IfNotPresent",
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        "ports": [{"containerPort": 80, "protocol": "TCP"}],
                    }]}
                }
            }
        });
        // What `kubectl apply` computes (three-way) when the manifest changes the image and drops env B.
        let patch = json!({
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…}"}},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "web"}],
                "containers": [{
                    "$setElementOrder/env": [{"name": "A"}],
                    "env": [{"$patch": "delete", "name": "B"}],
                    "image": "nginx:1.25",
                    "name": "web",
                }],
            }}}
        });
        let out = smp(DEPLOYMENT, live, patch);
        let c = &out["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "nginx:1.25");
        assert_eq!(c["env"], json!([{"name": "A", "value": "1"}]));
        assert_eq!(c["ports"], json!([{"containerPort": 80, "protocol": "TCP"}]));
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(out["spec"]["replicas"], 3);
        assert_eq!(out["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");
        assert_eq!(
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            "{…}"
        );
    }

    #[test]
    fn smp_new_fields_are_cleaned_of_directives_and_nulls() {
        let out = smp(
            POD,
            json!({"metadata": {"name": "p"}}),
            json!({"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "B", "$patch": "delete"}], "tty": null}]}}),
        );
        assert_eq!(
            out["spec"],
            json!({"containers": [{"name": "a", "image": "x", "env": []}]})
        );
    }

    #[test]
    fn smp_unknown_fields_merge_as_maps() {
        let out = smp(
            POD,
            json!({"extra": {"a": 1, "b": [1]}}),
            json!({"extra": {"c": 2, "b": [2]}}),
        );
        assert_eq!(out["extra"], json!({"a": 1, "b": [2], "c": 2}));
    }

    #[test]
    fn smp_missing_merge_key_is_bad_request() {
        let err = strategic_merge_patch(
            schemas(),
            POD,
            &pod(),
            &json!({"spec": {"containers": [{"image": "x"}]}}),
        )
        .unwrap_err();
        assert_eq!(err.status_code(), 400);
    }

    // ----- server-side apply -----

    fn deployment(image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": image}]}
                }
            }
        })
    }

    fn apply(live: &Value, applied: &Value, manager: &str, force: bool) -> Result<Value, PatchError> {
        apply_patch(schemas(), DEPLOYMENT, live, applied, manager, force)
    }

    fn entry<'v>(obj: &'v Value, manager: &str, operation: &str) -> Option<&'v Value> {
        obj["metadata"]["managedFields"]
            .as_array()?
            .iter()
            .find(|e| e["manager"] == manager && e["operation"] == operation)
    }

    #[test]
    fn apply_creates_managed_fields() {
        let out = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        assert_eq!(out["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.24");
        let e = entry(&out, "kubectl", "Apply").expect("an Apply entry");
        assert_eq!(e["apiVersion"], "apps/v1");
        assert_eq!(e["fieldsType"], "FieldsV1");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            e["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}
                    }
                }
            })
        );
    }

    #[test]
    fn apply_rejects_managed_fields_in_the_configuration() {
        let mut cfg = deployment("x");
        cfg["metadata"]["managedFields"] = json!([{"manager": "me"}]);
        assert_eq!(
            apply(&Value::Null, &cfg, "kubectl", false).unwrap_err().status_code(),
            400
        );
    }

    #[test]
    fn reapply_omitting_a_field_removes_it() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let mut cfg = deployment("nginx:1.24");
        cfg["spec"].as_object_mut().unwrap().remove("replicas");
        cfg["metadata"]["labels"] = json!({});
        let out = apply(&live, &cfg, "kubectl", false).unwrap();
        assert!(out["spec"].get("replicas").is_none(), "{out}");
        assert_eq!(out["metadata"]["labels"], json!({}));
        let fields = &entry(&out, "kubectl", "Apply").unwrap()["fieldsV1"];
        assert!(fields["f:spec"].get("f:replicas").is_none());
    }

    #[test]
    fn reapply_keeps_an_omitted_field_another_manager_also_owns() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        // Another applier sets the same replicas value: shared ownership, no conflict.
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
        let live = apply(&live, &other, "autoscaler", false).unwrap();
        let mut cfg = deployment("nginx:1.24");
        cfg["spec"].as_object_mut().unwrap().remove("replicas");
        let out = apply(&live, &cfg, "kubectl", false).unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
    }

    #[test]
    fn apply_conflicts_with_another_managers_field() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
        let err = apply(&live, &other, "autoscaler", false).unwrap_err();
        let PatchError::Conflict { message, conflicts } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(err.status_code(), 409);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].manager, "kubectl");
        assert_eq!(conflicts[0].field, ".spec.replicas");
        assert_eq!(
            message,
            "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas"
        );
    }

    #[test]
    fn apply_conflicts_with_an_update_manager() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(7);
        let live = record_update(schemas(), DEPLOYMENT, &live, &scaled, "kubectl-scale");
        let err = apply(&live, &deployment("nginx:1.24"), "kubectl", false).unwrap_err();
        let PatchError::Conflict { conflicts, .. } = err else {
            panic!()
        };
        assert_eq!(
            (conflicts[0].manager.as_str(), conflicts[0].field.as_str()),
            ("kubectl-scale", ".spec.replicas")
        );
    }

    #[test]
    fn force_apply_takes_ownership() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
        let out = apply(&live, &other, "autoscaler", true).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        let kubectl = &entry(&out, "kubectl", "Apply").unwrap()["fieldsV1"];
        assert!(
            kubectl["f:spec"].get("f:replicas").is_none(),
            "ownership moved away: {kubectl}"
        );
        assert!(kubectl["f:spec"].get("f:template").is_some());
        let autoscaler = &entry(&out, "autoscaler", "Apply").unwrap()["fieldsV1"];
        assert_eq!(autoscaler, &json!({"f:spec": {"f:replicas": {}}}));

        // kubectl no longer owns replicas, so re-applying without it leaves the value alone.
        let mut cfg = deployment("nginx:1.24");
        cfg["spec"].as_object_mut().unwrap().remove("replicas");
        let out = apply(&out, &cfg, "kubectl", false).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
    }

    #[test]
    fn two_managers_own_different_containers_in_one_list_map() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let sidecar = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "proxy", "image": "envoy:1"}]}}}
        });
        let live = apply(&live, &sidecar, "injector", false).unwrap();
        assert_eq!(names(&live["spec"]["template"]["spec"]["containers"]), ["web", "proxy"]);
        let injector = &entry(&live, "injector", "Apply").unwrap()["fieldsV1"];
        assert_eq!(
            injector["f:spec"]["f:template"]["f:spec"]["f:containers"],
            json!({"k:{\"name\":\"proxy\"}": {".": {}, "f:image": {}, "f:name": {}}})
        );

        // Each manager can change its own container without conflicts…
        let live = apply(&live, &deployment("nginx:1.25"), "kubectl", false).unwrap();
        let containers = &live["spec"]["template"]["spec"]["containers"];
        assert_eq!(names(containers), ["web", "proxy"]);
        assert_eq!(containers[0]["image"], "nginx:1.25");
        assert_eq!(containers[1]["image"], "envoy:1");

        // …but not the other's.
        let mut hijack = deployment("nginx:1.25");
        hijack["spec"]["template"]["spec"]["containers"] =
            json!([{"name": "web", "image": "nginx:1.25"}, {"name": "proxy", "image": "evil"}]);
        let err = apply(&live, &hijack, "kubectl", false).unwrap_err();
        let PatchError::Conflict { conflicts, .. } = err else {
            panic!()
        };
        assert_eq!(
            conflicts[0].field,
            ".spec.template.spec.containers[name=\"proxy\"].image"
        );
        assert_eq!(conflicts[0].manager, "injector");

        // Dropping its container removes only that one.
        let gone = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}});
        let out = apply(&live, &gone, "injector", false).unwrap();
        assert_eq!(names(&out["spec"]["template"]["spec"]["containers"]), ["web"]);
        assert!(
            entry(&out, "injector", "Apply").is_none(),
            "an entry that owns nothing is dropped"
        );
    }

    #[test]
    fn apply_orders_list_items_like_structured_merge_diff() {
        let ids = |l: Vec<Value>| {
            l.iter()
                .map(|v| v["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let item = |n: &str| json!({"name": n});
        let id = |v: &Value| v.get("name").map(Value::to_string);
        let merge = |l: Option<Value>, r: &Value| l.unwrap_or_else(|| r.clone());
        let live = vec![item("a"), item("b"), item("c")];
        assert_eq!(
            ids(merge_list_items(live.clone(), &[item("c"), item("a")], id, merge)),
            ["b", "c", "a"]
        );
        assert_eq!(
            ids(merge_list_items(live.clone(), &[item("x")], id, merge)),
            ["a", "b", "c", "x"]
        );
        assert_eq!(
            ids(merge_list_items(live, &[item("b"), item("x")], id, merge)),
            ["a", "b", "c", "x"]
        );
    }

    #[test]
    fn apply_sets_union_and_record_their_values() {
        let cfg = |f: Value| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "finalizers": f}});
        let live = apply_patch(schemas(), POD, &Value::Null, &cfg(json!(["a/x"])), "one", false).unwrap();
        let live = apply_patch(schemas(), POD, &live, &cfg(json!(["b/y"])), "two", false).unwrap();
        assert_eq!(live["metadata"]["finalizers"], json!(["a/x", "b/y"]));
        assert_eq!(
            entry(&live, "two", "Apply").unwrap()["fieldsV1"],
            json!({"f:metadata": {"f:finalizers": {"v:\"b/y\"": {}}}})
        );
        let live = apply_patch(schemas(), POD, &live, &cfg(json!([])), "one", false).unwrap();
        assert_eq!(live["metadata"]["finalizers"], json!(["b/y"]));
    }

    #[test]
    fn apply_to_an_untracked_object_attributes_existing_fields_to_before_first_apply() {
        let mut live = deployment("nginx:1.24");
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 9}});
        // Not stored yet (no resourceVersion), as when apply creates the object: nothing to attribute.
        let created = apply(&live, &other, "kubectl", false).unwrap();
        assert_eq!(created["metadata"]["managedFields"].as_array().unwrap().len(), 1);
        live["metadata"]["resourceVersion"] = json!("7");
        let err = apply(&live, &other, "kubectl", false).unwrap_err();
        let PatchError::Conflict { conflicts, .. } = err else {
            panic!()
        };
        assert_eq!(conflicts[0].manager, "before-first-apply");
    }

    #[test]
    fn apply_keys_ports_by_container_port_and_defaulted_protocol() {
        let mut cfg = deployment("nginx");
        cfg["spec"]["template"]["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80}]);
        let out = apply(&Value::Null, &cfg, "kubectl", false).unwrap();
        let e = &entry(&out, "kubectl", "Apply").unwrap()["fieldsV1"];
        let ports = &e["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:ports"];
        assert!(
            ports.get("k:{\"containerPort\":80,\"protocol\":\"TCP\"}").is_some(),
            "{ports}"
        );
    }

    #[test]
    fn record_update_takes_changed_fields_from_other_managers() {
        let live = apply(&Value::Null, &deployment("nginx:1.24"), "kubectl", false).unwrap();
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.26");
        edited["metadata"]["labels"]["team"] = json!("a");
        let out = record_update(schemas(), DEPLOYMENT, &live, &edited, "kubectl-edit");
        let edit = &entry(&out, "kubectl-edit", "Update").unwrap()["fieldsV1"];
        assert_eq!(
            edit,
            &json!({
                "f:metadata": {"f:labels": {"f:team": {}}},
                "f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {"f:image": {}}}}}}
            })
        );
        let kubectl = &entry(&out, "kubectl", "Apply").unwrap()["fieldsV1"];
        let web = &kubectl["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert!(web.get("f:image").is_none() && web.get("f:name").is_some(), "{web}");
        // Apply entries sort before Update entries.
        assert_eq!(out["metadata"]["managedFields"][0]["operation"], "Apply");
    }

    #[test]
    fn record_update_on_create_owns_everything_but_server_fields() {
        let mut obj = deployment("nginx");
        obj["metadata"]["uid"] = json!("123");
        obj["status"] = json!({"replicas": 1});
        let out = record_update(schemas(), DEPLOYMENT, &Value::Null, &obj, "kubectl-create");
        let e = &entry(&out, "kubectl-create", "Update").unwrap()["fieldsV1"];
        assert_eq!(e["f:metadata"], json!({"f:labels": {"f:app": {}}}));
        assert!(e.get("f:status").is_none() && e.get("f:apiVersion").is_none());
        assert_eq!(e["f:spec"]["f:replicas"], json!({}));
    }

    #[test]
    fn record_update_without_changes_keeps_managed_fields() {
        let live = apply(&Value::Null, &deployment("nginx"), "kubectl", false).unwrap();
        let out = record_update(schemas(), DEPLOYMENT, &live, &live, "someone");
        assert_eq!(out, live);
    }

    #[test]
    fn record_update_honours_managed_fields_resets() {
        let live = apply(&Value::Null, &deployment("nginx"), "kubectl", false).unwrap();
        let mut cleared = live.clone();
        cleared["metadata"]["managedFields"] = json!([]);
        assert_eq!(
            record_update(schemas(), DEPLOYMENT, &live, &cleared, "x"),
            live,
            "[] keeps the entries"
        );
        cleared["metadata"]["managedFields"] = json!([{}]);
        let out = record_update(schemas(), DEPLOYMENT, &live, &cleared, "x");
        assert!(out["metadata"].get("managedFields").is_none(), "[{{}}] strips them");
    }

    #[test]
    fn fields_v1_round_trips() {
        let v = json!({"f:metadata": {"f:labels": {".": {}, "f:a": {}}}, "f:spec": {"f:x": {}}});
        assert_eq!(FieldSet::from_fields_v1(&v).to_fields_v1(), v);
    }
}
