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
    // The router's own parse, so metrics never disagree with routing; paths that name no served
    // resource get an empty resource label (no label per unknown path).
    let Some(Ok(target)) = super::handler::parse_target(path) else {
        return (method.as_str().to_lowercase(), String::new());
    };
    let resource = match target.sub {
        Some(sub) => format!("{}/{}", target.resource.plural, sub.name()),
        None => target.resource.plural.to_string(),
    };
    let named = target.name.is_some();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_by_verb_and_served_resource_only() {
        let q = |watch: bool| {
            let mut q = super::super::handler::Query::new();
            if watch {
                q.insert("watch".into(), "true".into());
            }
            q
        };
        let c = |m: Method, p: &str, w: bool| classify(&m, p, &q(w));
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/demo/pods", false),
            ("list".into(), "pods".into())
        );
        assert_eq!(c(Method::GET, "/api/v1/pods", true), ("watch".into(), "pods".into()));
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/demo", false),
            ("get".into(), "namespaces".into())
        );
        assert_eq!(
            c(Method::PATCH, "/apis/apps/v1/namespaces/d/deployments/w/scale", false),
            ("patch".into(), "deployments/scale".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/d/widgets-123", false),
            ("get".into(), String::new())
        );
    }
}
