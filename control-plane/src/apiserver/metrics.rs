//! Prometheus metrics of the API server: request counts and latencies by verb and resource.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode, header};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("apiserver_request_total", "Requests by verb, resource and HTTP code."),
            &["verb", "resource", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "apiserver_request_duration_seconds",
                "Request latency by verb and resource.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
            ]),
            &["verb", "resource"],
        )
        .expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("registered once");
        registry.register(Box::new(latency.clone())).expect("registered once");
        Metrics {
            registry,
            requests,
            latency,
        }
    }

    pub fn observe(&self, verb: &str, resource: &str, code: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[verb, resource, &code.to_string()])
            .inc();
        // Watches last as long as the client wants; their duration says nothing.
        if verb != "watch" {
            self.latency
                .with_label_values(&[verb, resource])
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn render(&self) -> Response {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            out,
        )
            .into_response()
    }
}

/// The Kubernetes verb and resource of a request, for metric labels.
pub fn classify(method: &Method, path: &str, query: &super::handler::Query) -> (String, String) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return (method.as_str().to_lowercase(), String::new()),
    };
    let rest = match rest {
        ["namespaces", _, r @ ..] if !r.is_empty() && !matches!(r, ["status"] | ["finalize"]) => r,
        r => r,
    };
    let (resource, named) = match rest {
        [res] => (res.to_string(), false),
        [res, _] => (res.to_string(), true),
        [res, _, sub, ..] => (format!("{res}/{sub}"), true),
        _ => (String::new(), false),
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (method, named) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::DELETE, true) => "delete",
        (m, _) => return (m.as_str().to_lowercase(), resource),
    };
    (verb.to_string(), resource)
}
