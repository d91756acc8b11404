//! Kinds served in two API groups from one storage, as Kubernetes does: events.k8s.io/v1
//! Event is stored as core/v1 Event, so controllers that record through events.k8s.io and
//! `kubectl describe` (which reads core/v1) see the same events.

use serde_json::{Map, Value};

use super::resources::{self, Resource};

/// `(events.k8s.io/v1 field, core/v1 field)`; fields not listed have the same name in both.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// The resource whose form and keys hold `r`'s objects in the store.
pub fn storage_resource(r: &'static Resource) -> &'static Resource {
    if r.group == "events.k8s.io" {
        resources::find_kind("", "v1", "Event").expect("core Event is served")
    } else {
        r
    }
}

pub fn needs_conversion(r: &Resource) -> bool {
    r.group == "events.k8s.io"
}

fn rename(obj: Value, pairs: impl Iterator<Item = (&'static str, &'static str)>, api_version: &str) -> Value {
    let Value::Object(map) = obj else { return obj };
    let pairs: Vec<(&str, &str)> = pairs.collect();
    let mut out = Map::new();
    for (k, v) in map {
        let key = pairs
            .iter()
            .find(|(from, _)| *from == k)
            .map(|(_, to)| to.to_string())
            .unwrap_or(k);
        out.insert(key, v);
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    Value::Object(out)
}

/// Convert an object of `r` into its storage form.
pub fn to_storage(r: &Resource, obj: Value) -> Value {
    if !needs_conversion(r) {
        return obj;
    }
    let mut out = rename(obj, EVENT_FIELDS.iter().copied(), "v1");
    // An events.k8s.io series is what core/v1 readers (`kubectl describe`) see as the count and
    // the last time, as Kubernetes' conversion does.
    if let Some(series) = out.get("series").cloned() {
        if let Some(count) = series.get("count") {
            out["count"] = count.clone();
        }
        if let Some(last) = series.get("lastObservedTime").and_then(Value::as_str) {
            // MicroTime to Time: whole seconds, as lastTimestamp carries.
            let seconds = last.split('.').next().unwrap_or(last).trim_end_matches('Z');
            out["lastTimestamp"] = Value::String(format!("{seconds}Z"));
        }
    }
    out
}

/// Convert a stored object into `r`'s form.
pub fn from_storage(r: &Resource, obj: Value) -> Value {
    if !needs_conversion(r) {
        return obj;
    }
    rename(obj, EVENT_FIELDS.iter().map(|(a, b)| (*b, *a)), &r.api_version())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_k8s_io_event_round_trips_through_core_storage() {
        let r = resources::find_kind("events.k8s.io", "v1", "Event").unwrap();
        let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "pulled", "reason": "Pulled", "deprecatedCount": 2});
        let stored = to_storage(r, event.clone());
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "pulled");
        assert_eq!(stored["count"], 2);
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(from_storage(r, stored), event);
        assert_eq!(storage_resource(r).group, "");
        let series = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "series": {"count": 7, "lastObservedTime": "2026-11-27T07:00:01.123456Z"}});
        let stored = to_storage(r, series);
        assert_eq!(stored["count"], 7);
        assert_eq!(stored["lastTimestamp"], "2026-11-27T07:00:01Z");
    }
}
