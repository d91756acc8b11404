//! The EndpointSlice controller (and the legacy Endpoints beside it): for every Service with a
//! selector, slices listing the matching Pods that have an IP, with ready/serving/terminating
//! conditions, named target ports resolved per Pod, hostnames and topology. Owns only the
//! slices labelled as managed by it and the Endpoints named after such Services.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, Node, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};

use super::{Error, Result, is_status};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
pub const ENDPOINTS_MANAGED_BY_LABEL: &str = "endpoints.kubernetes.io/managed-by";
pub const ENDPOINTS_MANAGED_BY: &str = "endpoint-controller";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Kubernetes' default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What should exist for one Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Unnamed (generateName) slices, grouped by address type and resolved ports.
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Endpoints,
}

/// The Service's selector, if it selects Pods (nil or empty: the Service's endpoints are
/// managed by someone else).
pub fn selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

pub fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ip(pod: &Pod) -> Option<&str> {
    let status = pod.status.as_ref()?;
    status
        .pod_ip
        .as_deref()
        .or_else(|| status.pod_ips.as_ref()?.first().map(|ip| ip.ip.as_str()))
        .filter(|ip| !ip.is_empty())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The container port `target` names or numbers in `pod`, for `protocol`.
fn resolve_port(pod: &Pod, target: Option<&IntOrString>, port: i32, protocol: &str) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            Ok(p) => Some(p),
            Err(_) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.as_ref()?.iter().find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str()) && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
            }),
        },
    }
}

/// The Service's ports as `pod` serves them; a named port the Pod lacks is left out.
fn ports_for(svc: &Service, pod: &Pod) -> Vec<EndpointPort> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = resolve_port(pod, sp.target_port.as_ref(), sp.port, &protocol)?;
            Some(EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(port),
                protocol: Some(protocol),
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect()
}

fn target_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.namespace(),
        name: Some(pod.name_any()),
        uid: pod.uid(),
        ..Default::default()
    }
}

/// `spec.hostname` of a Pod in the Service's DNS subdomain (StatefulSet pods).
fn hostname(svc: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let host = spec.hostname.as_ref().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == Some(svc.name_any().as_str()) && pod.namespace() == svc.namespace())
        .then(|| host.clone())
}

fn owner(svc: &Service) -> Option<OwnerReference> {
    let mut o = svc.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(true);
    Some(o)
}

fn labels(svc: &Service, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels = svc.labels().clone();
    for (k, v) in extra {
        labels.insert(k.to_string(), v.to_string());
    }
    labels
}

/// The slices and Endpoints `svc` should have, given the Pods its selector matches (other Pods
/// are ignored) and the zone of each node.
pub fn desired(svc: &Service, pods: &[Pod], zone_of: &dyn Fn(&str) -> Option<String>) -> Option<Desired> {
    let selector = selector(svc)?;
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| selects(selector, p) && pod_ip(p).is_some() && !pod_finished(p))
        .collect();
    pods.sort_by_key(|p| (pod_ip(p).map(String::from), p.name_any()));

    // (address type, ports) -> endpoints; for Endpoints, ports -> (ready, not ready).
    let mut groups: BTreeMap<(String, String), (Vec<EndpointPort>, Vec<Endpoint>)> = BTreeMap::new();
    let mut subsets: BTreeMap<String, (Vec<EndpointPort>, EndpointSubset)> = BTreeMap::new();
    for pod in pods {
        let ip = pod_ip(pod).expect("filtered").to_string();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let serving = publish_not_ready || pod_ready(pod);
        let ready = publish_not_ready || (serving && !terminating);
        let ports = ports_for(svc, pod);
        let ports_key = serde_json::to_string(&ports).unwrap_or_default();
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let address_type = if ip.contains(':') { "IPv6" } else { "IPv4" };
        let endpoint = Endpoint {
            addresses: vec![ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            hostname: hostname(svc, pod),
            zone: node_name.as_deref().and_then(zone_of),
            node_name: node_name.clone(),
            target_ref: Some(target_ref(pod)),
            ..Default::default()
        };
        groups
            .entry((address_type.to_string(), ports_key.clone()))
            .or_insert_with(|| (ports.clone(), Vec::new()))
            .1
            .push(endpoint);
        // Endpoints, as the legacy controller: terminating Pods only with publishNotReadyAddresses.
        if terminating && !publish_not_ready {
            continue;
        }
        let address = EndpointAddress {
            ip,
            hostname: hostname(svc, pod),
            node_name,
            target_ref: Some(target_ref(pod)),
        };
        let subset = &mut subsets
            .entry(ports_key)
            .or_insert_with(|| (ports, EndpointSubset::default()))
            .1;
        let list = if ready {
            subset.addresses.get_or_insert_default()
        } else {
            subset.not_ready_addresses.get_or_insert_default()
        };
        list.push(address);
    }

    let slice_labels = labels(
        svc,
        &[(SERVICE_NAME_LABEL, &svc.name_any()), (MANAGED_BY_LABEL, MANAGED_BY)],
    );
    let slice = |address_type: &str, ports: Option<Vec<EndpointPort>>, endpoints: Vec<Endpoint>| EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", svc.name_any())),
            namespace: svc.namespace(),
            labels: Some(slice_labels.clone()),
            owner_references: owner(svc).map(|o| vec![o]),
            ..Default::default()
        },
        address_type: address_type.into(),
        endpoints: Some(endpoints),
        ports,
    };
    let mut slices = Vec::new();
    for ((address_type, _), (ports, endpoints)) in groups {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(slice(&address_type, Some(ports.clone()), chunk.to_vec()));
        }
    }
    if slices.is_empty() {
        // Kubernetes keeps one empty placeholder slice for a Service with no endpoints.
        let family = svc
            .spec
            .as_ref()
            .and_then(|s| s.ip_families.as_ref()?.first().cloned())
            .unwrap_or_else(|| "IPv4".into());
        slices.push(slice(&family, None, Vec::new()));
    }

    let subsets: Vec<EndpointSubset> = subsets
        .into_values()
        .map(|(ports, mut subset)| {
            subset.ports = Some(
                ports
                    .into_iter()
                    .map(|p| CorePort {
                        name: p.name,
                        port: p.port.unwrap_or_default(),
                        protocol: p.protocol,
                        app_protocol: p.app_protocol,
                    })
                    .collect(),
            );
            subset
        })
        .collect();
    let endpoints = Endpoints {
        metadata: ObjectMeta {
            name: Some(svc.name_any()),
            namespace: svc.namespace(),
            labels: Some(labels(svc, &[(ENDPOINTS_MANAGED_BY_LABEL, ENDPOINTS_MANAGED_BY)])),
            owner_references: owner(svc).map(|o| vec![o]),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };
    Some(Desired { slices, endpoints })
}

#[derive(Debug, Clone, PartialEq)]
pub enum SliceAction {
    Create(EndpointSlice),
    /// The existing slice's name and resourceVersion with the desired content.
    Update(EndpointSlice),
    Delete(String),
}

fn same_content(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.address_type == b.address_type
        && a.endpoints.clone().unwrap_or_default() == b.endpoints.clone().unwrap_or_default()
        && a.ports.clone().unwrap_or_default() == b.ports.clone().unwrap_or_default()
        && a.metadata.labels == b.metadata.labels
        && a.metadata.owner_references == b.metadata.owner_references
}

fn slice_key(s: &EndpointSlice) -> (String, String) {
    (
        s.address_type.clone(),
        serde_json::to_string(&s.ports.clone().unwrap_or_default()).unwrap_or_default(),
    )
}

/// Turn `existing` slices into `desired` with few writes: a slice with the same address type and
/// ports is updated in place (only if its content differs), then others of the same address
/// type are reused (it is immutable), the rest created or deleted.
pub fn plan_slices(desired: Vec<EndpointSlice>, existing: &[EndpointSlice]) -> Vec<SliceAction> {
    let mut existing: Vec<&EndpointSlice> = existing.iter().collect();
    existing.sort_by_key(|s| s.metadata.name.clone());
    let mut used = vec![false; existing.len()];
    let mut pending = Vec::new();
    let mut actions = Vec::new();
    let update = |want: EndpointSlice, have: &EndpointSlice, actions: &mut Vec<SliceAction>| {
        if !same_content(&want, have) {
            let mut next = want;
            next.metadata.name = have.metadata.name.clone();
            next.metadata.generate_name = None;
            next.metadata.resource_version = have.metadata.resource_version.clone();
            actions.push(SliceAction::Update(next));
        }
    };
    for want in desired {
        match (0..existing.len()).find(|&i| !used[i] && slice_key(existing[i]) == slice_key(&want)) {
            Some(i) => {
                used[i] = true;
                update(want, existing[i], &mut actions);
            }
            None => pending.push(want),
        }
    }
    for want in pending {
        match (0..existing.len()).find(|&i| !used[i] && existing[i].address_type == want.address_type) {
            Some(i) => {
                used[i] = true;
                update(want, existing[i], &mut actions);
            }
            None => actions.push(SliceAction::Create(want)),
        }
    }
    for (i, s) in existing.iter().enumerate() {
        if !used[i] {
            actions.push(SliceAction::Delete(s.name_any()));
        }
    }
    actions
}

/// Whether the Endpoints object must be written to become `want`.
pub fn endpoints_differ(want: &Endpoints, have: &Endpoints) -> bool {
    want.subsets.clone().unwrap_or_default() != have.subsets.clone().unwrap_or_default()
        || want.metadata.labels != have.metadata.labels
        || want.metadata.owner_references != have.metadata.owner_references
}

type ServiceKey = (String, String);

struct Ctx {
    client: Client,
    nodes: Store<Node>,
    services: Store<Service>,
    /// Pods each Service listed last time, so a Pod that stops matching still wakes it.
    members: Arc<Mutex<HashMap<ServiceKey, HashSet<String>>>>,
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = svc.name_any();
    let key = (ns.clone(), name.clone());
    let Some(sel) = selector(&svc) else {
        ctx.members.lock().expect("members lock").remove(&key);
        return Ok(Action::await_change());
    };
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let selector_string = sel
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    // A live, consistent list: the trigger may be ahead of any cache of ours.
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector_string))
        .await?
        .items;
    let zone_of = |node: &str| {
        ctx.nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| n.labels().get(ZONE_LABEL).cloned())
    };
    let want = desired(&svc, &pods, &zone_of).expect("a selector was checked");
    {
        let mut members = ctx.members.lock().expect("members lock");
        members.insert(key, pods.iter().map(|p| p.name_any()).collect());
        // Deleted Services are never reconciled again: forget them here.
        members.retain(|(ns, name), _| ctx.services.get(&ObjectRef::new(name).within(ns)).is_some());
    }

    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = slices
        .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await?
        .items;
    let pp = PostParams::default();
    for action in plan_slices(want.slices, &existing) {
        match action {
            SliceAction::Create(s) => {
                slices.create(&pp, &s).await?;
            }
            SliceAction::Update(s) => {
                slices.replace(&s.name_any(), &pp, &s).await?;
            }
            SliceAction::Delete(n) => match slices.delete(&n, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e.into()),
            },
        }
    }

    let endpoints: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    match endpoints.get_opt(&name).await? {
        None => match endpoints.create(&pp, &want.endpoints).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => return Ok(Action::requeue(Duration::from_millis(100))),
            Err(e) => return Err(e.into()),
        },
        Some(have) if endpoints_differ(&want.endpoints, &have) => {
            let mut next = want.endpoints;
            next.metadata.resource_version = have.metadata.resource_version;
            next.metadata.annotations = have.metadata.annotations;
            endpoints.replace(&name, &pp, &next).await?;
        }
        Some(_) => {}
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(svc: Arc<Service>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = svc.namespace().unwrap_or_default(), service = %svc.name_any(), error = %e, "endpointslice reconcile failed");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: Client) -> Result<()> {
    let (nodes, writer) = reflector::store::<Node>();
    // A node's zone label feeds every endpoint on it.
    let zone_changes = reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::labels, PredicateConfig::default())
    .filter_map(|n| futures::future::ready(n.ok().map(|_| ())));
    let members: Arc<Mutex<HashMap<ServiceKey, HashSet<String>>>> = Arc::default();
    let controller = Controller::new(Api::<Service>::all(client.clone()), watcher::Config::default());
    let services = controller.store();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        nodes,
        services: services.clone(),
        members: members.clone(),
    });
    let pod_members = members;
    controller
        .owns(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        .owns(Api::<Endpoints>::all(client.clone()), watcher::Config::default())
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod: Pod| {
                let ns = pod.namespace().unwrap_or_default();
                let name = pod.name_any();
                let members = pod_members.lock().expect("members lock");
                services
                    .state()
                    .into_iter()
                    .filter(|svc| svc.namespace().as_deref() == Some(ns.as_str()))
                    .filter(|svc| {
                        selector(svc).is_some_and(|s| selects(s, &pod))
                            || members
                                .get(&(ns.clone(), svc.name_any()))
                                .is_some_and(|m| m.contains(&name))
                    })
                    .map(|svc| ObjectRef::from_obj(svc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(zone_changes)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the endpointslice controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServicePort, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("svc-uid".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(name: &str, port: i32, target: IntOrString) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target_port: Some(target),
            ..Default::default()
        }
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some(format!("{name}-uid")),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn no_zone(_: &str) -> Option<String> {
        None
    }

    fn conditions(e: &Endpoint) -> (bool, bool, bool) {
        let c = e.conditions.clone().unwrap();
        (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
    }

    #[test]
    fn ready_and_unready_pods_get_their_conditions() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let pods = [pod("a", Some("10.244.0.1"), true), pod("b", Some("10.244.0.2"), false)];
        let d = desired(&svc, &pods, &no_zone).unwrap();
        assert_eq!(d.slices.len(), 1);
        let eps = d.slices[0].endpoints.clone().unwrap();
        assert_eq!(eps[0].addresses, ["10.244.0.1"]);
        assert_eq!(conditions(&eps[0]), (true, true, false));
        assert_eq!(conditions(&eps[1]), (false, false, false));
        let labels = d.slices[0].metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            d.slices[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        let subset = &d.endpoints.subsets.as_ref().unwrap()[0];
        assert_eq!(subset.addresses.as_ref().unwrap()[0].ip, "10.244.0.1");
        assert_eq!(subset.not_ready_addresses.as_ref().unwrap()[0].ip, "10.244.0.2");
    }

    #[test]
    fn pods_without_an_ip_or_finished_are_left_out() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let mut done = pod("done", Some("10.244.0.3"), false);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let d = desired(&svc, &[pod("pending", None, false), done], &no_zone).unwrap();
        assert_eq!(d.slices.len(), 1, "one placeholder slice");
        assert!(d.slices[0].endpoints.clone().unwrap().is_empty());
        assert!(d.endpoints.subsets.is_none());
    }

    #[test]
    fn terminating_pods_are_serving_but_not_ready() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let mut p = pod("a", Some("10.244.0.1"), true);
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        let d = desired(&svc, &[p], &no_zone).unwrap();
        assert_eq!(
            conditions(&d.slices[0].endpoints.clone().unwrap()[0]),
            (false, true, true)
        );
        assert!(d.endpoints.subsets.is_none(), "Endpoints leave terminating pods out");
    }

    #[test]
    fn publish_not_ready_addresses_marks_every_pod_ready() {
        let mut svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
        let d = desired(&svc, &[pod("a", Some("10.244.0.1"), false)], &no_zone).unwrap();
        assert_eq!(
            conditions(&d.slices[0].endpoints.clone().unwrap()[0]),
            (true, true, false)
        );
        assert!(d.endpoints.subsets.as_ref().unwrap()[0].addresses.is_some());
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_split_slices() {
        let svc = service(vec![port("http", 80, IntOrString::String("http".into()))]);
        let mut other = pod("b", Some("10.244.0.2"), true);
        other.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].container_port = 9090;
        let d = desired(&svc, &[pod("a", Some("10.244.0.1"), true), other], &no_zone).unwrap();
        let mut ports: Vec<i32> = d
            .slices
            .iter()
            .map(|s| s.ports.as_ref().unwrap()[0].port.unwrap())
            .collect();
        ports.sort();
        assert_eq!(ports, [8080, 9090]);
        assert_eq!(d.endpoints.subsets.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn a_named_port_the_pod_lacks_is_left_out_for_that_pod() {
        let svc = service(vec![
            port("http", 80, IntOrString::String("http".into())),
            port("metrics", 9100, IntOrString::String("metrics".into())),
        ]);
        let d = desired(&svc, &[pod("a", Some("10.244.0.1"), true)], &no_zone).unwrap();
        let ports = d.slices[0].ports.clone().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("http"), Some(8080)));
    }

    #[test]
    fn statefulset_pods_get_hostnames_and_topology() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let mut p = pod("web-0", Some("10.244.0.1"), true);
        let spec = p.spec.as_mut().unwrap();
        spec.hostname = Some("web-0".into());
        spec.subdomain = Some("web".into());
        let zone = |node: &str| (node == "node-a").then(|| "zone-1".to_string());
        let d = desired(&svc, &[p], &zone).unwrap();
        let e = &d.slices[0].endpoints.clone().unwrap()[0];
        assert_eq!(e.hostname.as_deref(), Some("web-0"));
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert_eq!(e.zone.as_deref(), Some("zone-1"));
        assert_eq!(e.target_ref.as_ref().unwrap().name.as_deref(), Some("web-0"));
    }

    #[test]
    fn services_without_selector_are_not_managed() {
        let mut svc = service(vec![]);
        svc.spec.as_mut().unwrap().selector = None;
        assert!(desired(&svc, &[], &no_zone).is_none());
    }

    #[test]
    fn many_endpoints_are_split_into_slices_of_a_hundred() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let pods: Vec<Pod> = (0..250)
            .map(|i| pod(&format!("p{i}"), Some(&format!("10.244.{}.{}", i / 200, i % 200)), true))
            .collect();
        let d = desired(&svc, &pods, &no_zone).unwrap();
        let sizes: Vec<usize> = d.slices.iter().map(|s| s.endpoints.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
    }

    #[test]
    fn unchanged_slices_are_not_rewritten_and_stale_ones_go() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let d = desired(&svc, &[pod("a", Some("10.244.0.1"), true)], &no_zone).unwrap();
        let mut existing = d.slices[0].clone();
        existing.metadata.name = Some("web-abcde".into());
        let mut stale = existing.clone();
        stale.metadata.name = Some("web-zzzzz".into());
        let actions = plan_slices(d.slices.clone(), &[existing.clone(), stale]);
        assert_eq!(actions, [SliceAction::Delete("web-zzzzz".into())]);

        let d2 = desired(&svc, &[pod("a", Some("10.244.0.1"), false)], &no_zone).unwrap();
        let actions = plan_slices(d2.slices, &[existing]);
        let [SliceAction::Update(s)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(s.metadata.name.as_deref(), Some("web-abcde"));
    }

    #[test]
    fn first_slice_is_created() {
        let svc = service(vec![port("http", 80, IntOrString::Int(8080))]);
        let d = desired(&svc, &[pod("a", Some("10.244.0.1"), true)], &no_zone).unwrap();
        let actions = plan_slices(d.slices, &[]);
        assert!(
            matches!(actions.as_slice(), [SliceAction::Create(s)] if s.metadata.generate_name.as_deref() == Some("web-"))
        );
    }
}
