//! The generic registry: one handler for every resource in `resources::RESOURCES`, doing
//! routing, decoding, storage, watch and errors the same way for all of them. Per-kind rules
//! come from `strategy`, Service addresses from `allocator`, patch semantics from `patch`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};

use super::allocator::Allocator;
use super::cache::{CacheEvent, Cached, Object, WatchCache, WatchType, set_resource_version};
use super::discovery::{AGGREGATED_CONTENT_TYPE, Discovery};
use super::resources::{self, Resource, Subresource};
use super::schema::Schemas;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, FieldCause, success_status};
use super::table::{IncludeObject, table};
use super::{convert, patch, protobuf, strategy, time};
use crate::store::{KeyValue, Revision, Store, StoreError};

pub const MAX_BODY: usize = 3 * 1024 * 1024;
pub const SERVER_VERSION: &str = "v1.37.0";

pub struct ApiServer {
    pub store: Arc<dyn Store>,
    pub cache: Arc<WatchCache>,
    pub allocator: Allocator,
    pub discovery: Discovery,
    pub schemas: &'static Schemas,
    pub admission: strategy::Admission,
}

pub type Query = HashMap<String, String>;

/// What a request names.
#[derive(Debug)]
pub struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<Subresource>,
}

pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Query,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn accepts(headers: &HeaderMap, needle: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains(needle)))
}

fn wants_table(headers: &HeaderMap) -> bool {
    accepts(headers, "as=Table")
}

fn parse_query(q: Option<&str>) -> Query {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub fn split_path_and_query(uri: &http::Uri) -> (String, Query) {
    (uri.path().to_string(), parse_query(uri.query()))
}

fn flag(query: &Query, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

/// Split `/api/v1/...` or `/apis/<group>/<version>/...` into a target.
pub(crate) fn parse_target(path: &str) -> Option<Result<Target>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return None,
    };
    let lookup = |plural: &str| resources::find(group, version, plural).ok_or_else(|| ApiError::no_route(path));
    let target = (|| {
        Ok(match rest {
            ["namespaces", ns, plural, tail @ ..]
                if group.is_empty() && version == "v1" && !["status", "finalize"].contains(plural)
                    || !group.is_empty() =>
            {
                let r = lookup(plural)?;
                if !r.namespaced {
                    return Err(ApiError::no_route(path));
                }
                let (name, sub) = match tail {
                    [] => (None, None),
                    [name] => (Some(name.to_string()), None),
                    [name, sub] => (Some(name.to_string()), Some(subresource(r, sub, path)?)),
                    _ => return Err(ApiError::no_route(path)),
                };
                Target {
                    resource: r,
                    namespace: Some(ns.to_string()),
                    name,
                    sub,
                }
            }
            [plural, tail @ ..] => {
                let r = lookup(plural)?;
                let (name, sub) = match tail {
                    [] => (None, None),
                    [name] if !r.namespaced => (Some(name.to_string()), None),
                    [name, sub] if !r.namespaced => (Some(name.to_string()), Some(subresource(r, sub, path)?)),
                    _ => return Err(ApiError::no_route(path)),
                };
                Target {
                    resource: r,
                    namespace: None,
                    name,
                    sub,
                }
            }
            _ => return Err(ApiError::no_route(path)),
        })
    })();
    Some(target)
}

fn subresource(r: &Resource, name: &str, path: &str) -> Result<Subresource> {
    r.subresources
        .iter()
        .copied()
        .find(|s| s.name() == name)
        .ok_or_else(|| ApiError::no_route(path))
}

impl ApiServer {
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        let path = req.path.clone();
        let result = match (req.method.clone(), path.as_str()) {
            (Method::GET, "/api") => Ok(self.discovery_response(&req.headers, true)),
            (Method::GET, "/apis") => Ok(self.discovery_response(&req.headers, false)),
            (Method::GET, "/version") => Ok(json_response(StatusCode::OK, &version())),
            (Method::GET, "/openapi/v2") => Ok(self.openapi_v2(&req.headers)),
            (Method::GET, "/openapi/v3") => Ok(json_response(StatusCode::OK, &self.discovery.openapi_v3_index)),
            (Method::GET, p) if p.starts_with("/openapi/v3/") => self.openapi_v3(&p["/openapi/v3/".len()..]),
            (Method::GET, p) if self.discovery.document(p).is_some() => Ok(json_response(
                StatusCode::OK,
                self.discovery.document(p).expect("checked"),
            )),
            _ => match parse_target(&path) {
                Some(Ok(target)) => self.clone().resource_request(target, req).await,
                Some(Err(e)) => Err(e),
                None => Err(ApiError::no_route(&path)),
            },
        };
        result.unwrap_or_else(IntoResponse::into_response)
    }

    fn discovery_response(&self, headers: &HeaderMap, core: bool) -> Response {
        if accepts(headers, "as=APIGroupDiscoveryList") {
            let doc = if core {
                &self.discovery.aggregated_core
            } else {
                &self.discovery.aggregated_groups
            };
            let body = serde_json::to_vec(doc).unwrap_or_default();
            return (StatusCode::OK, [(header::CONTENT_TYPE, AGGREGATED_CONTENT_TYPE)], body).into_response();
        }
        json_response(
            StatusCode::OK,
            if core {
                &self.discovery.api_versions
            } else {
                &self.discovery.api_group_list
            },
        )
    }

    fn openapi_v2(&self, headers: &HeaderMap) -> Response {
        // The protobuf form is not served; client-go falls back to JSON on 406.
        let json_ok = headers.get(header::ACCEPT).is_none() || accepts(headers, "json") || accepts(headers, "*/*");
        if !json_ok {
            return ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "NotAcceptable",
                "only application/json is served for /openapi/v2",
            )
            .into_response();
        }
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            self.discovery.openapi_v2.clone(),
        )
            .into_response()
    }

    fn openapi_v3(&self, rel: &str) -> Result<Response> {
        let (_, hash, bytes) = self
            .discovery
            .openapi_v3
            .iter()
            .find(|(p, _, _)| p == rel)
            .ok_or_else(|| ApiError::no_route(rel))?;
        let mut resp = (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            bytes.clone(),
        )
            .into_response();
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{hash}\"")) {
            resp.headers_mut().insert(header::ETAG, etag);
        }
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, immutable"));
        Ok(resp)
    }

    async fn resource_request(self: Arc<Self>, t: Target, req: Request) -> Result<Response> {
        let r = t.resource;
        match (&req.method, &t.name, t.sub) {
            (&Method::GET, None, _) if flag(&req.query, "watch") => self.watch(t, &req).await,
            (&Method::GET, None, _) => self.list(&t, &req).await,
            (&Method::POST, None, _) => self.create(&t, &req).await,
            (&Method::DELETE, None, _) => self.delete_collection(&t, &req).await,
            (&Method::GET, Some(name), None) => {
                let obj = self.get(&t, name).await?;
                Ok(self.single_response(r, &obj, &req.headers, StatusCode::OK))
            }
            (&Method::GET, Some(name), Some(Subresource::Scale)) => {
                let obj = self.get(&t, name).await?;
                Ok(json_response(StatusCode::OK, &scale_of(&obj)))
            }
            (&Method::GET, Some(name), Some(Subresource::Status)) => {
                let obj = self.get(&t, name).await?;
                Ok(json_response(StatusCode::OK, &obj))
            }
            (&Method::PUT, Some(_), sub) if !matches!(sub, Some(Subresource::Binding | Subresource::Token)) => {
                self.update(&t, &req).await
            }
            (&Method::PATCH, Some(_), sub)
                if !matches!(
                    sub,
                    Some(Subresource::Binding | Subresource::Finalize | Subresource::Token)
                ) =>
            {
                self.patch(&t, &req).await
            }
            (&Method::DELETE, Some(name), None) => self.delete(&t, name, &req).await,
            (&Method::POST, Some(name), Some(Subresource::Binding)) => self.bind(&t, name, &req).await,
            _ => Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({} {})",
                req.method, req.path
            ))),
        }
    }

    fn single_response(&self, r: &Resource, obj: &Value, headers: &HeaderMap, code: StatusCode) -> Response {
        if wants_table(headers) {
            let t = table(
                r,
                &[obj],
                IncludeObject::Metadata,
                json!({"resourceVersion": rv_of(obj)}),
                true,
                time::now_unix(),
            );
            return table_response(code, &t);
        }
        json_response(code, obj)
    }

    /// One object as clients see it (from the watch cache, else the store), or its 404: for
    /// handlers outside the registry (the node proxy).
    pub(crate) async fn object(&self, r: &'static Resource, namespace: Option<&str>, name: &str) -> Result<Value> {
        let (obj, _) = self
            .read(&r.key(namespace, name), true)
            .await?
            .ok_or_else(|| ApiError::not_found(r.group, r.plural, name))?;
        Ok(convert::from_storage(r, obj))
    }

    async fn get(&self, t: &Target, name: &str) -> Result<Value> {
        let key = t.resource.key(t.namespace.as_deref(), name);
        // A consistent read, as a GET from etcd is in Kubernetes: the store, not the cache.
        let (obj, _) = self
            .read(&key, false)
            .await?
            .ok_or_else(|| ApiError::not_found(t.resource.group, t.resource.plural, name))?;
        Ok(convert::from_storage(t.resource, obj))
    }

    // ---------- list & watch ----------

    async fn list(&self, t: &Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let labels = LabelSelector::parse(req.query.get("labelSelector").map(String::as_str).unwrap_or_default())?;
        let fields = FieldSelector::parse(req.query.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
        let limit: usize = req.query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
        let prefix = r.list_prefix(t.namespace.as_deref());

        let (pinned, start_after) = match req.query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let (rv, key) = decode_continue(token)?;
                if !key.starts_with(&prefix) {
                    return Err(ApiError::bad_request("continue token does not belong to this list"));
                }
                (Some(rv), Some(key))
            }
            None => (None, None),
        };
        let rv_param = req.query.get("resourceVersion").map(String::as_str).unwrap_or_default();
        // Consistent read unless the client accepts any cached state (resourceVersion=0).
        if pinned.is_none() && rv_param != "0" {
            let wanted = match rv_param {
                "" => self.store.current_revision().await?,
                rv => rv
                    .parse::<Revision>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
            };
            if !self.cache.wait_for(wanted, Duration::from_secs(5)).await {
                return Err(ApiError::timeout(format!(
                    "Too large resource version: {wanted}, the cache did not catch up"
                )));
            }
        }

        let mut items: Vec<Object> = Vec::new();
        let mut next_key: Option<String> = None;
        let revision;
        let matches = |obj: &Value| labels.matches(obj) && fields.matches(obj);
        let from_cache = match pinned {
            Some(rv) => self.cache.revision() == rv,
            None => true,
        };
        if from_cache {
            let (entries, rev) = self.cache.list(&prefix, start_after.as_deref()).await;
            revision = rev;
            for (key, obj) in entries {
                let obj = present(r, obj);
                if !matches(&obj) {
                    continue;
                }
                if limit > 0 && items.len() == limit {
                    next_key = Some(key);
                    break;
                }
                items.push(obj);
            }
        } else {
            // The cache moved on: read the pinned revision from the store (410 if compacted).
            let rv = pinned.expect("set when not from cache");
            let (kvs, rev) = self.store.list(&prefix, Some(rv)).await.map_err(|e| match e {
                StoreError::Compacted { .. } => ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."),
                other => other.into(),
            })?;
            revision = rev;
            let after = start_after.clone().unwrap_or_default();
            for kv in kvs.into_iter().filter(|kv| kv.key > after) {
                let obj = convert::from_storage(r, decode_kv(&kv)?);
                if !matches(&obj) {
                    continue;
                }
                if limit > 0 && items.len() == limit {
                    next_key = Some(kv.key);
                    break;
                }
                items.push(Arc::new(Cached::new(obj)));
            }
        }
        let revision = pinned.unwrap_or(revision);
        let mut meta = json!({"resourceVersion": revision.to_string()});
        if let Some(key) = next_key {
            // The token resumes after the last returned key.
            let last = items.last().and_then(|o| object_key(r, o)).unwrap_or(key);
            meta["continue"] = json!(encode_continue(revision, &last));
        }
        if wants_table(&req.headers) {
            let include = include_object(&req.query);
            let refs: Vec<&Value> = items.iter().map(|a| &a.value).collect();
            return Ok(table_response(
                StatusCode::OK,
                &table(r, &refs, include, meta, true, time::now_unix()),
            ));
        }
        // Each cached object carries its JSON: the list is spliced from those bytes, so a list of
        // 10,000 pods costs a copy, not 10,000 serializations.
        let head = json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta});
        let head = serde_json::to_vec(&head).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut body = Vec::with_capacity(head.len() + 16 + items.iter().map(|o| o.json.len() + 1).sum::<usize>());
        body.extend_from_slice(&head[..head.len() - 1]);
        body.extend_from_slice(b",\"items\":[");
        for (i, obj) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&obj.json);
        }
        body.extend_from_slice(b"]}");
        Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response())
    }

    async fn watch(self: Arc<Self>, t: Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let labels = LabelSelector::parse(req.query.get("labelSelector").map(String::as_str).unwrap_or_default())?;
        let fields = FieldSelector::parse(req.query.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
        let prefix = r.list_prefix(t.namespace.as_deref());
        let rv = req.query.get("resourceVersion").map(String::as_str).unwrap_or_default();
        let send_initial = flag(&req.query, "sendInitialEvents");
        let after = match rv {
            "" | "0" => None,
            _ if send_initial => None,
            n => Some(
                n.parse::<Revision>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {n:?}")))?,
            ),
        };
        if rv.is_empty() {
            // An unset resourceVersion means "from the latest state": catch up first.
            self.cache.sync().await?;
        }
        let bookmarks = flag(&req.query, "allowWatchBookmarks");
        let timeout = req
            .query
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(1800)
            .max(1);
        let as_table = wants_table(&req.headers);
        let include = include_object(&req.query);
        let sub = match self.cache.subscribe(&prefix, after).await {
            Ok(sub) => sub,
            Err(oldest) => {
                // Kubernetes answers 200 and then an ERROR event with a 410 Status.
                let status = ApiError::gone(format!("too old resource version: {} ({oldest})", rv)).to_status();
                let line = format!("{}\n", json!({"type": "ERROR", "object": status}));
                return Ok(watch_response(Body::from(line), as_table));
            }
        };

        let encode = {
            let mut first = true;
            move |kind: &str, obj: &Cached| -> Bytes {
                if as_table && kind != "BOOKMARK" && kind != "ERROR" {
                    let t = table(
                        r,
                        &[&obj.value],
                        include,
                        json!({"resourceVersion": rv_of(obj)}),
                        first,
                        time::now_unix(),
                    );
                    first = false;
                    let mut line = serde_json::to_vec(&json!({"type": kind, "object": t})).unwrap_or_default();
                    line.push(b'\n');
                    return Bytes::from(line);
                }
                // The object's JSON was made once in the cache; every watcher reuses it.
                let mut line = Vec::with_capacity(obj.json.len() + 32);
                line.extend_from_slice(b"{\"type\":\"");
                line.extend_from_slice(kind.as_bytes());
                line.extend_from_slice(b"\",\"object\":");
                line.extend_from_slice(&obj.json);
                line.extend_from_slice(b"}\n");
                Bytes::from(line)
            }
        };
        let name = fields.name().map(String::from);
        let matches = move |obj: &Value| {
            labels.matches(obj)
                && fields.matches(obj)
                && name
                    .as_deref()
                    .is_none_or(|n| obj.pointer("/metadata/name").and_then(Value::as_str) == Some(n))
        };

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(256);
        let kind_name = r.kind;
        let api_version = r.api_version();
        tokio::spawn(async move {
            let mut encode = encode;
            // Replayed events are newer than the requested revision; live ones newer than the snapshot.
            let mut last_rv = after.unwrap_or(sub.revision);
            for obj in &sub.initial {
                let obj = present(r, obj.clone());
                if matches(&obj) && tx.send(Ok(encode("ADDED", &obj))).await.is_err() {
                    return;
                }
            }
            if send_initial && bookmarks {
                let bm = json!({"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                if tx.send(Ok(encode("BOOKMARK", &Cached::new(bm)))).await.is_err() {
                    return;
                }
            }
            let mut live = sub.live;
            let mut replay = sub.replay.into_iter();
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                let event: Arc<CacheEvent> = if let Some(e) = replay.next() {
                    e
                } else {
                    tokio::select! {
                        _ = &mut deadline => return,
                        _ = tx.closed() => return,
                        _ = ticker.tick() => {
                            if bookmarks {
                                let bm = json!({"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                                if tx.send(Ok(encode("BOOKMARK", &Cached::new(bm)))).await.is_err() { return; }
                            }
                            continue;
                        }
                        e = live.recv() => match e {
                            Ok(e) => e,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                // Too slow to keep up: end the watch so the client re-lists.
                                let status = ApiError::gone("watch fell behind; relist").to_status();
                                let _ = tx.send(Ok(encode("ERROR", &Cached::new(status)))).await;
                                return;
                            }
                        },
                    }
                };
                if event.revision <= last_rv || !event.key.starts_with(&prefix) {
                    continue;
                }
                last_rv = event.revision;
                // An object entering or leaving the selection is ADDED or DELETED for this
                // watcher, as Kubernetes does.
                let object = present(r, event.object.clone());
                let now = matches(&object);
                let before = event.prev.clone().is_some_and(|p| matches(&present(r, p)));
                let kind = match (event.kind, before, now) {
                    (WatchType::Modified, false, true) => "ADDED",
                    (WatchType::Modified, true, false) => "DELETED",
                    (WatchType::Modified, false, false) => continue,
                    (_, _, false) => continue,
                    (kind, _, true) => kind.as_str(),
                };
                if tx.send(Ok(encode(kind, &object))).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(watch_response(Body::from_stream(stream), as_table))
    }

    // ---------- writes ----------

    fn decode_body(&self, req: &Request) -> Result<Value> {
        let ct = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        decode(ct, &req.body)
    }

    /// Check and prune `obj` against its schema, per `fieldValidation` (Strict, Warn, Ignore).
    fn field_validation(&self, r: &Resource, obj: &mut Value, query: &Query, warnings: &mut Vec<String>) -> Result<()> {
        let Some(def) = self.schemas.kind_definition(r.group, r.version, r.kind) else {
            return Ok(());
        };
        let report = self.schemas.prune_and_check(def, obj);
        if !report.mistyped.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{} in body is invalid: {}",
                r.kind,
                report.mistyped.join("; ")
            )));
        }
        if report.unknown.is_empty() {
            return Ok(());
        }
        match query.get("fieldValidation").map(String::as_str).unwrap_or("Warn") {
            "Strict" => {
                let list: Vec<String> = report
                    .unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    list.join(", ")
                )))
            }
            "Ignore" => Ok(()),
            _ => {
                warnings.extend(report.unknown.iter().map(|f| format!("unknown field \"{f}\"")));
                Ok(())
            }
        }
    }

    /// An object in storage form with its mod revision, from the watch cache or the store.
    async fn read(&self, key: &str, from_cache: bool) -> Result<Option<(Value, Revision)>> {
        if from_cache && let Some(obj) = self.cache.get(key).await {
            let rev = rv_of(&obj).parse().unwrap_or(0);
            return Ok(Some((obj.value.clone(), rev)));
        }
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((decode_kv(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    async fn check_namespace(&self, t: &Target) -> Result<()> {
        let Some(ns) = t.namespace.as_deref() else {
            return Ok(());
        };
        let key = resources::find("", "v1", "namespaces")
            .expect("namespaces exist")
            .key(None, ns);
        // The watch cache answers (as Kubernetes' informer does); a miss asks the store, so a
        // namespace created a moment ago is never reported missing.
        match self.read(&key, true).await? {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some((obj, _)) => {
                if obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null()) {
                    let mut e = ApiError::new(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        format!(
                            "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            t.resource.plural
                        ),
                    );
                    e.details = Some(
                        json!({"causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
                    );
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    fn prepare_new(&self, t: &Target, obj: &mut Value) -> Result<()> {
        let r = t.resource;
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_type_meta(r, obj)?;
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let meta = obj["metadata"].as_object_mut().expect("just made an object");
        match (&t.namespace, meta.get("namespace").and_then(Value::as_str)) {
            (Some(path_ns), Some(body_ns)) if !body_ns.is_empty() && body_ns != path_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(path_ns), _) => {
                meta.insert("namespace".into(), json!(path_ns));
            }
            (None, _) => {
                meta.remove("namespace");
            }
        }
        Ok(())
    }

    async fn create(&self, t: &Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let mut obj = self.decode_body(req)?;
        let mut warnings = Vec::new();
        self.field_validation(r, &mut obj, &req.query, &mut warnings)?;
        self.prepare_new(t, &mut obj)?;
        self.check_namespace(t).await?;
        let name = {
            let meta = obj["metadata"].as_object_mut().expect("prepared");
            let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            if name.is_empty() {
                if let Some(prefix) = meta
                    .get("generateName")
                    .and_then(Value::as_str)
                    .filter(|g| !g.is_empty())
                {
                    let name = format!("{prefix}{}", random_suffix());
                    meta.insert("name".into(), json!(name));
                    name
                } else {
                    String::new()
                }
            } else {
                name
            }
        };
        let obj = self.finish_create(t, obj, &name, req).await?;
        let mut resp = json_response(StatusCode::CREATED, &obj);
        add_warnings(&mut resp, &warnings);
        Ok(resp)
    }

    /// Defaults, validation, metadata, allocation and the store write of a new object.
    async fn finish_create(&self, t: &Target, mut obj: Value, name: &str, req: &Request) -> Result<Value> {
        let r = t.resource;
        {
            let meta = obj["metadata"].as_object_mut().expect("prepared");
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(time::now_rfc3339()));
            meta.remove("resourceVersion");
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
            meta.remove("selfLink");
            if self
                .schemas
                .kind_definition(r.group, r.version, r.kind)
                .and_then(|d| self.schemas.definition(d))
                .is_some_and(|d| d.pointer("/properties/spec").is_some())
            {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        strategy::apply_defaults(r, &mut obj);
        strategy::admit_create(r, &mut obj, &self.admission);
        strategy::admit_new(r, &mut obj);
        if r.group.is_empty() && r.kind == "PersistentVolumeClaim" && strategy::wants_default_class(&obj) {
            let classes = resources::find("storage.k8s.io", "v1", "storageclasses").expect("storageclasses exist");
            let (items, _) = self.cache.list(&classes.key_prefix(), None).await;
            if let Some(class) = strategy::default_storage_class(items.iter().map(|(_, o)| &o.value))
                && let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut)
            {
                spec.insert("storageClassName".into(), json!(class));
            }
        }
        let causes = strategy::validate(r, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(r.group, r.kind, name, causes));
        }
        let manager = field_manager(req);
        // An apply already recorded its manager's fields; other writes record an Update.
        if let Some(def) = self.schemas.kind_definition(r.group, r.version, r.kind)
            && !is_apply(req)
        {
            obj = patch::record_update(self.schemas, def, &Value::Null, &obj, &manager);
        }
        let key = r.key(t.namespace.as_deref(), name);
        let dry_run = req.query.get("dryRun").is_some_and(|d| d == "All");
        let claims = if r.kind == "Service" && r.group.is_empty() && !dry_run {
            Some(self.allocator.allocate(&mut obj, None, &key).await?)
        } else {
            None
        };
        if dry_run {
            if self.store.get(&key).await?.is_some() {
                return Err(ApiError::already_exists(r.group, r.plural, name));
            }
            return Ok(obj);
        }
        match self
            .store
            .create(
                &key,
                serde_json::to_vec(&convert::to_storage(r, obj.clone())).unwrap_or_default(),
            )
            .await
        {
            Ok(rev) => {
                set_resource_version(&mut obj, rev);
                Ok(obj)
            }
            Err(e) => {
                if let Some(c) = claims {
                    self.allocator.release(c).await;
                }
                Err(match e {
                    StoreError::AlreadyExists(_) => ApiError::already_exists(r.group, r.plural, name),
                    other => other.into(),
                })
            }
        }
    }

    async fn update(&self, t: &Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let name = t.name.clone().expect("routed with a name");
        let mut body = self.decode_body(req)?;
        let mut warnings = Vec::new();
        if t.sub == Some(Subresource::Scale) {
            let replicas = body.pointer("/spec/replicas").cloned();
            let precondition = body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(String::from);
            let obj = self
                .write(t, &name, req, precondition.as_deref(), |cur| {
                    let mut new = cur.clone();
                    new["spec"]["replicas"] = replicas.clone().unwrap_or(json!(0));
                    Ok(new)
                })
                .await?;
            return Ok(json_response(StatusCode::OK, &scale_of(&obj)));
        }
        self.field_validation(r, &mut body, &req.query, &mut warnings)?;
        self.prepare_new(t, &mut body)?;
        let body_name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let precondition = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
        // A status write is narrowed to the status inside `write`.
        let finalize = t.sub == Some(Subresource::Finalize);
        let obj = self
            .write(t, &name, req, precondition.as_deref(), |cur| {
                if finalize {
                    let mut new = cur.clone();
                    new["spec"]["finalizers"] = body
                        .pointer("/spec/finalizers")
                        .filter(|f| !f.is_null())
                        .cloned()
                        .unwrap_or(json!([]));
                    Ok(new)
                } else {
                    Ok(body.clone())
                }
            })
            .await?;
        let mut resp = json_response(StatusCode::OK, &obj);
        add_warnings(&mut resp, &warnings);
        Ok(resp)
    }

    async fn patch(&self, t: &Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let name = t.name.clone().expect("routed with a name");
        let ct = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let ct = ct.split(';').next().unwrap_or_default().trim().to_string();
        let patch_doc = match ct.as_str() {
            "application/json-patch+json"
            | "application/merge-patch+json"
            | "application/strategic-merge-patch+json" => serde_json::from_slice::<Value>(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                let v: Value = serde_yaml::from_slice(&req.body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
                v
            }
            other => return Err(ApiError::unsupported_media_type(other)),
        };
        let def = self
            .schemas
            .kind_definition(r.group, r.version, r.kind)
            .map(String::from);
        let manager = field_manager(req);
        let force = flag(&req.query, "force");
        let sub = t.sub;
        let mut warnings = Vec::new();

        if ct == "application/apply-patch+yaml" {
            let mut applied = patch_doc.clone();
            if sub.is_none() {
                self.field_validation(r, &mut applied, &req.query, &mut warnings)?;
                check_type_meta(r, &applied)?;
            }
            if !req.query.contains_key("fieldManager") {
                return Err(ApiError::bad_request(
                    "PATCH with apply requires the fieldManager parameter",
                ));
            }
            // Apply to a missing object creates it.
            let key = r.key(t.namespace.as_deref(), &name);
            if sub.is_none() && self.store.get(&key).await?.is_none() {
                let mut obj = applied.clone();
                self.prepare_new(t, &mut obj)?;
                obj["metadata"]["name"] = json!(name);
                self.check_namespace(t).await?;
                let base = json!({"apiVersion": r.api_version(), "kind": r.kind, "metadata": obj["metadata"].clone()});
                let merged = match &def {
                    Some(d) => {
                        patch::apply_patch(self.schemas, d, &base, &obj, &manager, force).map_err(patch_error)?
                    }
                    None => obj,
                };
                let created = self.finish_create(t, merged, &name, req).await?;
                let mut resp = json_response(StatusCode::CREATED, &created);
                add_warnings(&mut resp, &warnings);
                return Ok(resp);
            }
            let obj = self
                .write(t, &name, req, None, |cur| {
                    let d = def
                        .as_deref()
                        .ok_or_else(|| ApiError::internal("no schema for this kind"))?;
                    let base = if sub == Some(Subresource::Scale) {
                        scale_of(cur)
                    } else {
                        cur.clone()
                    };
                    let out =
                        patch::apply_patch(self.schemas, d, &base, &applied, &manager, force).map_err(patch_error)?;
                    Ok(out)
                })
                .await?;
            let mut resp = json_response(StatusCode::OK, &obj);
            add_warnings(&mut resp, &warnings);
            return Ok(resp);
        }

        let obj = self
            .write(t, &name, req, None, |cur| {
                let base = if sub == Some(Subresource::Scale) {
                    scale_of(cur)
                } else {
                    cur.clone()
                };
                let mut patched = match ct.as_str() {
                    "application/json-patch+json" => patch::json_patch(&base, &patch_doc),
                    "application/merge-patch+json" => patch::merge_patch(&base, &patch_doc),
                    _ => match &def {
                        Some(d) if sub != Some(Subresource::Scale) => {
                            patch::strategic_merge_patch(self.schemas, d, &base, &patch_doc)
                        }
                        _ => patch::merge_patch(&base, &patch_doc),
                    },
                }
                .map_err(patch_error)?;
                if sub == Some(Subresource::Scale) {
                    let mut new = cur.clone();
                    new["spec"]["replicas"] = patched.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                    return Ok(new);
                }
                if sub.is_none() {
                    let mut w = Vec::new();
                    self.field_validation(r, &mut patched, &req.query, &mut w)?;
                }
                Ok(patched)
            })
            .await?;
        let body = if sub == Some(Subresource::Scale) {
            scale_of(&obj)
        } else {
            obj
        };
        let mut resp = json_response(StatusCode::OK, &body);
        add_warnings(&mut resp, &warnings);
        Ok(resp)
    }

    /// Read-modify-write with compare-and-swap, retried on conflicts unless the client pinned a
    /// resourceVersion. A write that changes nothing is not stored (resourceVersion unchanged).
    async fn write(
        &self,
        t: &Target,
        name: &str,
        req: &Request,
        precondition: Option<&str>,
        mut mutate: impl FnMut(&Value) -> Result<Value>,
    ) -> Result<Value> {
        let r = t.resource;
        let key = r.key(t.namespace.as_deref(), name);
        let dry_run = req.query.get("dryRun").is_some_and(|d| d == "All");
        let manager = field_manager(req);
        // The first attempt reads the watch cache; the compare-and-swap catches a stale read, and
        // every retry (or a precondition that the cache cannot confirm) reads the store.
        let mut from_cache = true;
        for _ in 0..64 {
            let (stored, mod_revision) = self
                .read(&key, from_cache)
                .await?
                .ok_or_else(|| ApiError::not_found(r.group, r.plural, name))?;
            if let Some(p) = precondition.filter(|p| !p.is_empty())
                && p != mod_revision.to_string()
            {
                if from_cache {
                    from_cache = false;
                    continue;
                }
                return Err(ApiError::conflict(r.group, r.plural, name));
            }
            let used_cache = std::mem::replace(&mut from_cache, false);
            let kv_revision = mod_revision;
            let current = convert::from_storage(r, stored);
            let mut new = mutate(&current)?;
            if !new.is_object() {
                return Err(ApiError::bad_request("the patched object is not a JSON object"));
            }
            if t.sub == Some(Subresource::Status) {
                // The status subresource writes status only, whatever else the body or patch says.
                let status = new.get("status").cloned().unwrap_or(Value::Null);
                new = current.clone();
                new["status"] = status;
            }
            self.carry_metadata(t, &current, &mut new)?;
            if t.sub.is_none() {
                strategy::keep_on_update(r, &current, &mut new);
            }
            strategy::apply_defaults(r, &mut new);
            let mut causes = strategy::validate_update(r, &current, &new);
            causes.extend(strategy::validate(r, &new));
            if !causes.is_empty() {
                return Err(ApiError::invalid(r.group, r.kind, name, causes));
            }
            if strategy::spec_changed(&current, &new)
                && let Some(g) = current.pointer("/metadata/generation").and_then(Value::as_i64)
            {
                new["metadata"]["generation"] = json!(g + 1);
            }
            if let Some(def) = self.schemas.kind_definition(r.group, r.version, r.kind)
                && !is_apply(req)
            {
                new = patch::record_update(self.schemas, def, &current, &new, &manager);
            }
            // Finalizers gone on an object being deleted: the delete completes now. A Namespace
            // also waits for its spec.finalizers (the namespace controller's).
            let finalizers_done = new.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
                && string_list(new.pointer("/metadata/finalizers")).is_empty()
                && (r.kind != "Namespace"
                    || !r.group.is_empty()
                    || string_list(new.pointer("/spec/finalizers")).is_empty());
            let mut cur_cmp = current.clone();
            strip_rv(&mut cur_cmp);
            strip_rv(&mut new);
            if new == cur_cmp && !finalizers_done {
                if used_cache {
                    // "Nothing to change" must hold against the store, not a cache that may lag.
                    continue;
                }
                return Ok(current);
            }
            if dry_run {
                set_resource_version(&mut new, kv_revision);
                return Ok(new);
            }
            let claims = if r.kind == "Service" && r.group.is_empty() {
                Some(self.allocator.allocate(&mut new, Some(&current), &key).await?)
            } else {
                None
            };
            if finalizers_done {
                return match self.store.delete(&key, Some(kv_revision)).await {
                    Ok((rev, _)) => {
                        if r.kind == "Service" {
                            self.allocator.release_unused(&current, None, &key).await;
                        }
                        set_resource_version(&mut new, rev);
                        Ok(new)
                    }
                    Err(StoreError::Conflict { .. }) if precondition.is_none() => continue,
                    Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(r.group, r.plural, name)),
                    Err(e) => Err(e.into()),
                };
            }
            match self
                .store
                .update(
                    &key,
                    serde_json::to_vec(&convert::to_storage(r, new.clone())).unwrap_or_default(),
                    kv_revision,
                )
                .await
            {
                Ok(rev) => {
                    if r.kind == "Service" && r.group.is_empty() {
                        self.allocator.release_unused(&current, Some(&new), &key).await;
                    }
                    set_resource_version(&mut new, rev);
                    return Ok(new);
                }
                Err(e) => {
                    if let Some(c) = claims {
                        self.allocator.release(c).await;
                    }
                    match e {
                        StoreError::Conflict { .. } if precondition.is_none() => continue,
                        StoreError::Conflict { .. } => return Err(ApiError::conflict(r.group, r.plural, name)),
                        StoreError::NotFound(_) => return Err(ApiError::not_found(r.group, r.plural, name)),
                        other => return Err(other.into()),
                    }
                }
            }
        }
        Err(ApiError::conflict(r.group, r.plural, name))
    }

    /// System-owned metadata an update cannot change.
    fn carry_metadata(&self, t: &Target, current: &Value, new: &mut Value) -> Result<()> {
        let r = t.resource;
        check_type_meta(r, new)?;
        new["apiVersion"] = json!(r.api_version());
        new["kind"] = json!(r.kind);
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        let cur_meta = current.get("metadata").cloned().unwrap_or(json!({}));
        let meta = new["metadata"].as_object_mut().expect("made an object");
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match cur_meta.get(k) {
                Some(v) => meta.insert(k.into(), v.clone()),
                None => meta.remove(k),
            };
        }
        meta.remove("selfLink");
        // Finalizers may be removed but not added once deletion started.
        if cur_meta.get("deletionTimestamp").is_some_and(|v| !v.is_null()) {
            let old: Vec<Value> = cur_meta
                .get("finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let added = meta
                .get("finalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|f| !old.contains(f));
            if added {
                return Err(ApiError::invalid(
                    r.group,
                    r.kind,
                    cur_meta["name"].as_str().unwrap_or_default(),
                    vec![FieldCause::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        Ok(())
    }

    async fn delete(&self, t: &Target, name: &str, req: &Request) -> Result<Response> {
        let r = t.resource;
        let opts: Value = if req.body.is_empty() {
            json!({})
        } else {
            self.decode_body(req)?
        };
        let dry_run = req.query.get("dryRun").is_some_and(|d| d == "All")
            || opts
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|x| x == "All"));
        let policy = propagation_policy(&req.query, &opts)?;
        let key = r.key(t.namespace.as_deref(), name);
        for _ in 0..64 {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::not_found(r.group, r.plural, name))?;
            let current = decode_kv(&kv)?;
            if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
                && current.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid)
            {
                return Err(ApiError::conflict(r.group, r.plural, name));
            }
            if let Some(rv) = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str)
                && rv != kv.mod_revision.to_string()
            {
                return Err(ApiError::conflict(r.group, r.plural, name));
            }
            if dry_run {
                return Ok(json_response(StatusCode::OK, &convert::from_storage(r, current)));
            }
            if r.kind == "Namespace" && r.group.is_empty() {
                match self.delete_namespace(t, name, current, kv).await? {
                    Some(resp) => return Ok(resp),
                    None => continue,
                }
            }
            if r.kind == "Pod" && r.group.is_empty() {
                match self.delete_pod_gracefully(t, name, &current, &kv, req, &opts).await? {
                    GracefulDelete::Marked(resp) => return Ok(resp),
                    GracefulDelete::Conflict => continue,
                    GracefulDelete::Now => {}
                }
            }
            let deleting = current
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null());
            let existing = string_list(current.pointer("/metadata/finalizers"));
            let finalizers = deletion_finalizers(&existing, policy);
            if !finalizers.is_empty() {
                if deleting && finalizers == existing {
                    return Ok(json_response(StatusCode::ACCEPTED, &convert::from_storage(r, current)));
                }
                // Finalizers left (the caller's, or the collector's for foreground and orphan
                // propagation): mark the object and let their owners finish the deletion.
                let mut marked = current.clone();
                strip_rv(&mut marked);
                if !deleting {
                    marked["metadata"]["deletionTimestamp"] = json!(time::now_rfc3339());
                    marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                }
                marked["metadata"]["finalizers"] = json!(finalizers);
                match self
                    .store
                    .update(&key, serde_json::to_vec(&marked).unwrap_or_default(), kv.mod_revision)
                    .await
                {
                    Ok(rev) => {
                        set_resource_version(&mut marked, rev);
                        return Ok(json_response(StatusCode::ACCEPTED, &convert::from_storage(r, marked)));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            match self.store.delete(&key, Some(kv.mod_revision)).await {
                Ok((rev, _)) => {
                    if r.kind == "Service" && r.group.is_empty() {
                        self.allocator.release_unused(&current, None, &key).await;
                    }
                    let mut gone = convert::from_storage(r, current);
                    set_resource_version(&mut gone, rev);
                    return Ok(json_response(StatusCode::OK, &gone));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound(_)) => return Err(ApiError::not_found(r.group, r.plural, name)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict(r.group, r.plural, name))
    }

    /// Graceful pod deletion, as Kubernetes' pod strategy (`CheckGracefulDelete`): a pod bound
    /// to a node that has not finished gets `deletionTimestamp` = now + the grace period
    /// (`gracePeriodSeconds` of the request, else `spec.terminationGracePeriodSeconds`, 30)
    /// and `deletionGracePeriodSeconds`, and stays (Terminating) until its node's agent has
    /// stopped it and deletes it with grace 0. A shorter grace period shortens a pending one.
    /// Unbound and finished pods, and grace 0, go at once.
    async fn delete_pod_gracefully(
        &self,
        t: &Target,
        name: &str,
        current: &Value,
        kv: &KeyValue,
        req: &Request,
        opts: &Value,
    ) -> Result<GracefulDelete> {
        let requested = opts
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| req.query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
        let grace = requested
            .or_else(|| {
                current
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0);
        let bound = current
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            current.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if grace == 0 || !bound || finished {
            return Ok(GracefulDelete::Now);
        }
        let pending = current
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        let deleting = current
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null());
        if deleting && pending.is_some_and(|p| p <= grace) {
            return Ok(GracefulDelete::Marked(json_response(
                StatusCode::OK,
                &convert::from_storage(t.resource, current.clone()),
            )));
        }
        let mut marked = current.clone();
        strip_rv(&mut marked);
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(grace))
            .unwrap_or_else(|_| jiff::Timestamp::now());
        marked["metadata"]["deletionTimestamp"] = json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        let key = t.resource.key(t.namespace.as_deref(), name);
        match self
            .store
            .update(&key, serde_json::to_vec(&marked).unwrap_or_default(), kv.mod_revision)
            .await
        {
            Ok(rev) => {
                set_resource_version(&mut marked, rev);
                Ok(GracefulDelete::Marked(json_response(
                    StatusCode::OK,
                    &convert::from_storage(t.resource, marked),
                )))
            }
            Err(StoreError::Conflict { .. }) => Ok(GracefulDelete::Conflict),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found("", "pods", name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Namespace deletion, the Kubernetes way: mark it Terminating and leave the emptying to the
    /// namespace controller, which clears `spec.finalizers` through `finalize` when done; a
    /// namespace without finalizers goes at once. `None`: the store moved on, try again.
    async fn delete_namespace(&self, t: &Target, name: &str, current: Value, kv: KeyValue) -> Result<Option<Response>> {
        if current
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return Ok(Some(json_response(StatusCode::OK, &current)));
        }
        let key = t.resource.key(None, name);
        let mut marked = current.clone();
        strip_rv(&mut marked);
        marked["metadata"]["deletionTimestamp"] = json!(time::now_rfc3339());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        marked["status"]["phase"] = json!("Terminating");
        let unfinalized = string_list(current.pointer("/spec/finalizers")).is_empty()
            && string_list(current.pointer("/metadata/finalizers")).is_empty();
        let result = if unfinalized {
            self.store.delete(&key, Some(kv.mod_revision)).await.map(|(rev, _)| rev)
        } else {
            self.store
                .update(&key, serde_json::to_vec(&marked).unwrap_or_default(), kv.mod_revision)
                .await
        };
        match result {
            Ok(rev) => {
                set_resource_version(&mut marked, rev);
                Ok(Some(json_response(StatusCode::OK, &marked)))
            }
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(StoreError::NotFound(_)) => Err(ApiError::not_found("", "namespaces", name)),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_collection(&self, t: &Target, req: &Request) -> Result<Response> {
        let r = t.resource;
        let labels = LabelSelector::parse(req.query.get("labelSelector").map(String::as_str).unwrap_or_default())?;
        let fields = FieldSelector::parse(req.query.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
        let (entries, rev) = self.cache.list(&r.list_prefix(t.namespace.as_deref()), None).await;
        let mut deleted = Vec::new();
        for (_, obj) in entries.iter().filter(|(_, o)| labels.matches(o) && fields.matches(o)) {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let target = Target {
                resource: r,
                namespace: obj
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(String::from),
                name: Some(name.into()),
                sub: None,
            };
            match self.delete(&target, name, req).await {
                Ok(_) => deleted.push(obj.value.clone()),
                Err(e) if e.code == StatusCode::NOT_FOUND => {}
                Err(e) => return Err(e),
            }
        }
        let list = json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {"resourceVersion": rev.to_string()}, "items": deleted});
        Ok(json_response(StatusCode::OK, &list))
    }

    async fn bind(&self, t: &Target, name: &str, req: &Request) -> Result<Response> {
        let binding = self.decode_body(req)?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "",
                "Binding",
                name,
                vec![FieldCause::required("target.name")],
            ));
        }
        let pod_target = Target {
            resource: t.resource,
            namespace: t.namespace.clone(),
            name: Some(name.into()),
            sub: Some(Subresource::Binding),
        };
        // A Binding naming a uid binds only that pod, not one recreated under the same name.
        let uid = binding
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        self.write(&pod_target, name, req, None, |cur| {
            let current_uid = cur.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
            if !uid.is_empty() && uid != current_uid {
                return Err(ApiError::conflict("", "pods", name).with_message(format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {current_uid}"
                )));
            }
            if let Some(existing) = cur.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                return Err(ApiError::conflict("", "pods", name).with_message(format!("pod {name} is already assigned to node \"{existing}\"")));
            }
            let mut new = cur.clone();
            new["spec"]["nodeName"] = json!(node);
            let conditions = new["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
            conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": time::now_rfc3339()}));
            new["status"]["conditions"] = json!(conditions);
            Ok(new)
        })
        .await?;
        Ok(json_response(
            StatusCode::CREATED,
            &success_status(json!({"name": name, "kind": "pods"})),
        ))
    }
}

fn patch_error(e: patch::PatchError) -> ApiError {
    let code = StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
    let reason = match code {
        StatusCode::CONFLICT => "Conflict",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "Invalid",
    };
    ApiError::new(code, reason, e.to_string())
}

fn is_apply(req: &Request) -> bool {
    req.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/apply-patch"))
}

fn field_manager(req: &Request) -> String {
    req.query.get("fieldManager").cloned().unwrap_or_else(|| {
        let ua = req
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown");
        ua.split('/').next().unwrap_or("unknown").to_string()
    })
}

fn check_type_meta(r: &Resource, obj: &Value) -> Result<()> {
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && !kind.is_empty()
        && kind != r.kind
    {
        return Err(ApiError::bad_request(format!(
            "the object kind {kind:?} does not match the resource {} (kind {:?})",
            r.plural, r.kind
        )));
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
        && av != r.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            r.api_version()
        )));
    }
    Ok(())
}

/// DeleteOptions.propagationPolicy, from the body or the query (`orphanDependents` is the
/// deprecated spelling of Orphan/Background).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    Background,
    Foreground,
    Orphan,
}

fn propagation_policy(query: &Query, opts: &Value) -> Result<Option<Propagation>> {
    let named = opts
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| query.get("propagationPolicy").cloned());
    if let Some(p) = named.filter(|p| !p.is_empty()) {
        return match p.as_str() {
            "Background" => Ok(Some(Propagation::Background)),
            "Foreground" => Ok(Some(Propagation::Foreground)),
            "Orphan" => Ok(Some(Propagation::Orphan)),
            other => Err(ApiError::invalid(
                "meta.k8s.io",
                "DeleteOptions",
                "",
                vec![FieldCause::not_supported(
                    "propagationPolicy",
                    other,
                    &["Foreground", "Background", "Orphan"],
                )],
            )),
        };
    }
    let orphan = opts
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or_else(|| query.get("orphanDependents").map(|v| v == "true"));
    Ok(orphan.map(|o| {
        if o {
            Propagation::Orphan
        } else {
            Propagation::Background
        }
    }))
}

/// The finalizers an object keeps when deleted with `policy`: the garbage collector's
/// `foregroundDeletion` or `orphan` replace each other; Background drops both.
fn deletion_finalizers(existing: &[String], policy: Option<Propagation>) -> Vec<String> {
    let (drop, add) = match policy {
        None => return existing.to_vec(),
        Some(Propagation::Background) => (&[FOREGROUND_FINALIZER, ORPHAN_FINALIZER][..], None),
        Some(Propagation::Foreground) => (&[ORPHAN_FINALIZER][..], Some(FOREGROUND_FINALIZER)),
        Some(Propagation::Orphan) => (&[FOREGROUND_FINALIZER][..], Some(ORPHAN_FINALIZER)),
    };
    let mut out: Vec<String> = existing
        .iter()
        .filter(|f| !drop.contains(&f.as_str()))
        .cloned()
        .collect();
    if let Some(add) = add
        && !out.iter().any(|f| f == add)
    {
        out.push(add.to_string());
    }
    out
}

pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
        .unwrap_or_default()
}

/// What [`ApiServer::delete_pod_gracefully`] decided.
enum GracefulDelete {
    /// Marked Terminating (or already was): this is the response.
    Marked(Response),
    /// The store moved on: try again.
    Conflict,
    /// Delete it now (the usual path, finalizers included).
    Now,
}

fn strip_rv(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
}

/// A cached (storage-form) object as `r` presents it; no copy unless `r` converts.
fn present(r: &Resource, obj: Object) -> Object {
    if convert::needs_conversion(r) {
        Arc::new(Cached::new(convert::from_storage(r, obj.value.clone())))
    } else {
        obj
    }
}

fn decode_kv(kv: &KeyValue) -> Result<Value> {
    let mut obj: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("undecodable object {}: {e}", kv.key)))?;
    set_resource_version(&mut obj, kv.mod_revision);
    Ok(obj)
}

/// Decode a request body by content type (JSON, YAML, or Kubernetes protobuf).
pub fn decode(content_type: &str, body: &[u8]) -> Result<Value> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    match media {
        "application/json" | "" | "*/*" => {
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}")))
        }
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}")))
        }
        "application/vnd.kubernetes.protobuf" => protobuf::decode(body),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

fn rv_of(obj: &Value) -> String {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn object_key(r: &Resource, obj: &Value) -> Option<String> {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str)?;
    Some(r.key(obj.pointer("/metadata/namespace").and_then(Value::as_str), name))
}

fn include_object(query: &Query) -> IncludeObject {
    match query.get("includeObject").map(String::as_str) {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    }
}

fn table_response(code: StatusCode, t: &Value) -> Response {
    let body = serde_json::to_vec(t).unwrap_or_default();
    (
        code,
        [(header::CONTENT_TYPE, "application/json;as=Table;v=v1;g=meta.k8s.io")],
        body,
    )
        .into_response()
}

fn watch_response(body: Body, as_table: bool) -> Response {
    let ct = if as_table {
        "application/json;as=Table;v=v1;g=meta.k8s.io"
    } else {
        "application/json"
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    resp
}

fn add_warnings(resp: &mut Response, warnings: &[String]) {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("Warning", v);
        }
    }
}

fn encode_continue(rv: Revision, key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": key}).to_string())
}

fn decode_continue(token: &str) -> Result<(Revision, String)> {
    let bad = || ApiError::bad_request("continue key is not valid");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["rv"].as_i64().ok_or_else(bad)?,
        v["start"].as_str().ok_or_else(bad)?.to_string(),
    ))
}

fn random_suffix() -> String {
    // Kubernetes' alphabet for generated names: no vowels, no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": format!("{SERVER_VERSION}+weir-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_paths_parse_into_targets() {
        let t = parse_target("/api/v1/namespaces/demo/pods/web-1/status")
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.resource.plural, t.namespace.as_deref(), t.name.as_deref(), t.sub),
            ("pods", Some("demo"), Some("web-1"), Some(Subresource::Status))
        );
        let t = parse_target("/api/v1/namespaces/demo").unwrap().unwrap();
        assert_eq!((t.resource.plural, t.name.as_deref()), ("namespaces", Some("demo")));
        let t = parse_target("/api/v1/namespaces/demo/status").unwrap().unwrap();
        assert_eq!((t.resource.plural, t.sub), ("namespaces", Some(Subresource::Status)));
        let t = parse_target("/apis/apps/v1/deployments").unwrap().unwrap();
        assert_eq!((t.resource.plural, t.namespace), ("deployments", None));
        assert!(parse_target("/api/v1/widgets").unwrap().is_err());
        assert!(parse_target("/api/v1/namespaces/demo/nodes/n1").unwrap().is_err());
    }

    #[test]
    fn propagation_policy_comes_from_the_body_or_the_query() {
        let none = Query::new();
        assert_eq!(propagation_policy(&none, &json!({})).unwrap(), None);
        assert_eq!(
            propagation_policy(&none, &json!({"propagationPolicy": "Foreground"})).unwrap(),
            Some(Propagation::Foreground)
        );
        let query: Query = [("propagationPolicy".to_string(), "Orphan".to_string())].into();
        assert_eq!(
            propagation_policy(&query, &json!({})).unwrap(),
            Some(Propagation::Orphan)
        );
        assert_eq!(
            propagation_policy(&none, &json!({"orphanDependents": false})).unwrap(),
            Some(Propagation::Background)
        );
        assert!(propagation_policy(&none, &json!({"propagationPolicy": "Sideways"})).is_err());
    }

    #[test]
    fn deletion_finalizers_follow_the_propagation_policy() {
        let own = vec!["example.com/hold".to_string()];
        assert_eq!(deletion_finalizers(&own, None), own);
        assert_eq!(
            deletion_finalizers(&own, Some(Propagation::Foreground)),
            ["example.com/hold", FOREGROUND_FINALIZER]
        );
        let orphaning = vec![ORPHAN_FINALIZER.to_string()];
        assert_eq!(
            deletion_finalizers(&orphaning, Some(Propagation::Foreground)),
            [FOREGROUND_FINALIZER]
        );
        assert!(deletion_finalizers(&orphaning, Some(Propagation::Background)).is_empty());
        assert_eq!(deletion_finalizers(&[], Some(Propagation::Orphan)), [ORPHAN_FINALIZER]);
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "/registry/configmaps/default/a");
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, "/registry/configmaps/default/a".to_string())
        );
        assert!(decode_continue("garbage!").is_err());
    }
}
