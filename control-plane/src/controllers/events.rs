//! Events for what the controllers do, aggregated as Kubernetes' core event correlator does:
//! the same (object, type, reason, message) seen again within ten minutes bumps `count` and
//! `lastTimestamp` of the existing Event instead of creating another, so `kubectl describe`
//! shows "(x5 over 2m)" rather than five lines.
//!
//! Written here rather than with `kube::runtime::events::Recorder` because that recorder keys its
//! series on (action, reason) only, without the message: "Scaled up replica set web-1 to 3" and
//! "... to 5" would be folded into one event that keeps the first message.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

/// How long a recorded event keeps absorbing repeats.
const SERIES_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);
/// Series remembered at most; the oldest are forgotten beyond this.
const MAX_SERIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    kind: String,
    name: String,
    uid: String,
    type_: EventType,
    reason: String,
    message: String,
}

#[derive(Clone, Debug)]
struct Series {
    name: String,
    count: i32,
    last: jiff::Timestamp,
}

/// Records Events on behalf of one controller (`component`, e.g. `deployment-controller`).
/// Cheap to clone; clones share the aggregation state.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: &'static str,
    series: Arc<Mutex<HashMap<Key, Series>>>,
}

/// A reference to `obj` for an Event's `involvedObject`.
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        ..Default::default()
    }
}

/// The core/v1 Event Kubernetes' recorder would write for a first occurrence.
pub fn new_event(
    component: &str,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    message: &str,
    now: jiff::Timestamp,
) -> Event {
    let base = regarding.name.as_deref().unwrap_or(component);
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{base}.{:x}", rand::random::<u64>())),
            namespace: Some(regarding.namespace.clone().unwrap_or_else(|| "default".into())),
            ..Default::default()
        },
        involved_object: regarding.clone(),
        type_: Some(type_.as_str().into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some(component.into()),
        reporting_instance: Some(component.into()),
        action: Some(reason.into()),
        source: Some(EventSource {
            component: Some(component.into()),
            host: None,
        }),
        ..Default::default()
    }
}

impl Recorder {
    pub fn new(client: Client, component: &'static str) -> Recorder {
        Recorder {
            client,
            component,
            series: Arc::default(),
        }
    }

    /// Records an event about `obj`. Failures are logged, never returned: an Event that cannot
    /// be written must not stop a controller.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, message: &str) {
        self.publish_ref(&reference(obj), type_, reason, message).await
    }

    pub async fn publish_ref(&self, regarding: &ObjectReference, type_: EventType, reason: &str, message: &str) {
        if let Err(e) = self.try_publish(regarding, type_, reason, message).await {
            tracing::debug!(component = self.component, reason, error = %e, "recording an event failed");
        }
    }

    async fn try_publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> kube::Result<()> {
        let now = jiff::Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let key = Key {
            namespace: namespace.clone(),
            kind: regarding.kind.clone().unwrap_or_default(),
            name: regarding.name.clone().unwrap_or_default(),
            uid: regarding.uid.clone().unwrap_or_default(),
            type_,
            reason: reason.into(),
            message: message.into(),
        };
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        let repeat = {
            let mut series = self.series.lock().await;
            series.retain(|_, s| s.last + SERIES_WINDOW > now);
            match series.get_mut(&key) {
                Some(s) => {
                    s.count += 1;
                    s.last = now;
                    Some((s.name.clone(), s.count))
                }
                None => None,
            }
        };
        if let Some((name, count)) = repeat {
            let patch = json!({"count": count, "lastTimestamp": Time(now)});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                // Deleted (or expired) meanwhile: start a new series below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = new_event(self.component, regarding, type_, reason, message, now);
        let created = api.create(&PostParams::default(), &event).await?;
        let mut series = self.series.lock().await;
        if series.len() >= MAX_SERIES
            && let Some(oldest) = series.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| k.clone())
        {
            series.remove(&oldest);
        }
        series.insert(
            key,
            Series {
                name: created.name_any(),
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn a_first_event_names_its_object_and_counts_one() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web-1".into());
        pod.metadata.namespace = Some("shop".into());
        pod.metadata.uid = Some("u1".into());
        let r = reference(&pod);
        assert_eq!(r.kind.as_deref(), Some("Pod"));
        assert_eq!(r.api_version.as_deref(), Some("v1"));
        let now = jiff::Timestamp::now();
        let ev = new_event("test-controller", &r, EventType::Warning, "Failed", "it broke", now);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("shop"));
        assert!(ev.metadata.name.as_deref().unwrap().starts_with("web-1."));
        assert_eq!(ev.count, Some(1));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(ev.source.unwrap().component.as_deref(), Some("test-controller"));
    }
}
