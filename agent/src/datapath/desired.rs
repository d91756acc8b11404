//! From Kubernetes objects to datapath contents: which ClusterIP:port goes to which
//! endpoints. A pure function of the Services and EndpointSlices the agent has cached;
//! it knows nothing of maps.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::index::Family;
use super::model::{Backend, BackendState, DesiredState, LbAlgorithm, Protocol, Selection, ServiceKey};

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The annotation selecting a service's backend selection: `random` (default) or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "service.weir.dev/lb-algorithm";

/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// The node the desired state is computed for: its name (to tell its endpoints from other
/// nodes') and the addresses NodePorts listen on (its InternalIPs, or the addresses of
/// the interfaces TC/XDP attach to). IPv4 only: TC and XDP translate IPv4.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
}

/// Every ClusterIP port of `services`, IPv4 and IPv6, with the endpoints of `slices` that
/// serve it: an IPv4 ClusterIP gets the endpoints of the `IPv4` slices, an IPv6 one those
/// of the `IPv6` slices, so a dual-stack Service (`spec.clusterIPs` of both families) has
/// one frontend per family. No NodePort or LoadBalancer frontends: see
/// [`desired_state_for_node`].
///
/// Endpoint conditions as kube-proxy reads them: `ready` and `serving` default to true,
/// `terminating` to false. Ready endpoints are active backends; terminating ones that
/// still serve are terminating backends (used only when nothing is active); the rest are
/// left out. A service port with no endpoints stays, with no backends, so connections to
/// it are refused rather than sent to the ClusterIP itself. Headless and ExternalName
/// services, SCTP, and `FQDN` slices are skipped.
pub fn desired_state(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
    desired(services, slices, None)
}

/// [`desired_state`] plus the external frontends on `node`: each NodePort (spec.type
/// NodePort or LoadBalancer, `ports[].nodePort`) on every node address, and each
/// `status.loadBalancer.ingress[].ip` on the service ports, flagged external. Endpoints
/// whose `nodeName` is not `node.name` are remote backends (SNATed when reached from
/// outside). With externalTrafficPolicy Local, the external frontends get only this
/// node's endpoints (none: packets to them are dropped, as kube-proxy does); ClusterIPs
/// keep all of them unless internalTrafficPolicy is Local, which gives the ClusterIPs only
/// this node's endpoints (none: connections are refused).
///
/// External frontends are IPv4 only (TC and XDP translate IPv4): NodePorts on the node's
/// IPv4 addresses with the IPv4 endpoints, for services with an IPv4 ClusterIP; IPv6
/// LoadBalancer ingress IPs and the NodePorts of IPv6-only services are skipped.
pub fn desired_state_for_node(services: &[Service], slices: &[EndpointSlice], node: &NodeContext) -> DesiredState {
    desired(services, slices, Some(node))
}

fn desired(services: &[Service], slices: &[EndpointSlice], node: Option<&NodeContext>) -> DesiredState {
    let mut desired = DesiredState::default();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let addresses = cluster_ips(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref());
        if addresses.is_empty() {
            continue;
        }
        let has_ipv4 = addresses.iter().any(IpAddr::is_ipv4);
        let algorithm = match service
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(LB_ALGORITHM_ANNOTATION))
            .map(|value| value.trim().to_ascii_lowercase())
            .as_deref()
        {
            Some("maglev") => LbAlgorithm::Maglev,
            _ => LbAlgorithm::Random,
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds)
                .and_then(|seconds| u32::try_from(seconds).ok())
                .filter(|seconds| *seconds > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let selection = Selection {
            algorithm,
            affinity_timeout,
            ..Selection::default()
        };
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        // Which endpoints are this node's is known only with a node.
        let internal_local = node.is_some() && spec.internal_traffic_policy.as_deref() == Some("Local");
        let external = Selection {
            external: true,
            external_local,
            ..selection
        };
        let node_ports =
            node.filter(|_| has_ipv4 && matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")));
        let lb_ips: Vec<Ipv4Addr> = if has_ipv4 && node.is_some() && spec.type_.as_deref() == Some("LoadBalancer") {
            service
                .status
                .iter()
                .filter_map(|status| status.load_balancer.as_ref())
                .flat_map(|lb| lb.ingress.iter().flatten())
                .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
                .collect()
        } else {
            Vec::new()
        };
        let own_slices: Vec<&EndpointSlice> = slices.iter().filter(|slice| belongs_to(slice, service)).collect();
        for port in spec.ports.iter().flatten() {
            let Some(protocol) = protocol(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let backends4 = backends_for(port, protocol, &own_slices, Family::V4, node);
            let backends6 = backends_for(port, protocol, &own_slices, Family::V6, node);
            let mut frontends: Vec<(ServiceKey, Selection)> = addresses
                .iter()
                .map(|address| {
                    (
                        ServiceKey {
                            address: *address,
                            port: service_port,
                            protocol,
                        },
                        selection,
                    )
                })
                .collect();
            if let Some(node) = node_ports
                && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
            {
                frontends.extend(node.addresses.iter().map(|address| {
                    (
                        ServiceKey {
                            address: (*address).into(),
                            port: node_port,
                            protocol,
                        },
                        external,
                    )
                }));
            }
            frontends.extend(lb_ips.iter().map(|address| {
                (
                    ServiceKey {
                        address: (*address).into(),
                        port: service_port,
                        protocol,
                    },
                    external,
                )
            }));
            for (key, selection) in frontends {
                let backends = match Family::of(key.address) {
                    Family::V4 => &backends4,
                    Family::V6 => &backends6,
                };
                let local_only = if selection.external {
                    selection.external_local
                } else {
                    internal_local
                };
                let backends = if local_only {
                    backends.iter().filter(|b| !b.remote).copied().collect()
                } else {
                    backends.clone()
                };
                desired.services.insert(key, backends);
                if selection != Selection::default() {
                    desired.selections.insert(key, selection);
                }
            }
        }
    }
    desired
}

fn cluster_ips(cluster_ip: Option<&str>, cluster_ips: Option<&[String]>) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = cluster_ips
        .into_iter()
        .flatten()
        .map(String::as_str)
        .chain(cluster_ip)
        .filter_map(|ip| ip.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

fn belongs_to(slice: &EndpointSlice, service: &Service) -> bool {
    slice.metadata.namespace == service.metadata.namespace
        && service.metadata.name.is_some()
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            == service.metadata.name.as_ref()
}

fn protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The endpoints of the `family` slices' port with the service port's name and protocol.
/// Slices carry target ports already resolved to numbers, so named target ports need
/// nothing more. With a `node`, endpoints whose nodeName is not the node's (or unset) are
/// remote.
fn backends_for(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    family: Family,
    node: Option<&NodeContext>,
) -> Vec<Backend> {
    let name = port.name.as_deref().unwrap_or("");
    let address_type = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let mut backends: BTreeMap<(IpAddr, u16), (BackendState, bool)> = BTreeMap::new();
    for slice in slices.iter().filter(|slice| slice.address_type == address_type) {
        let Some(target_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == name && self::protocol(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(state) = endpoint_state(endpoint) else {
                continue;
            };
            let Some(address) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|a| Family::of(*a) == family)
            else {
                continue;
            };
            let remote = node.is_some_and(|node| endpoint.node_name.as_deref() != Some(node.name.as_str()));
            backends
                .entry((address, target_port))
                .and_modify(|(s, _)| *s = (*s).min(state))
                .or_insert((state, remote));
        }
    }
    backends
        .into_iter()
        .map(|((address, port), (state, remote))| Backend {
            address,
            port,
            state,
            remote,
        })
        .collect()
}

fn endpoint_state(endpoint: &Endpoint) -> Option<BackendState> {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if terminating {
        serving.then_some(BackendState::Terminating)
    } else {
        ready.then_some(BackendState::Active)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str, cluster_ip: &str, ports: &[(Option<&str>, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("default".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.to_owned()),
                cluster_ips: Some(vec![cluster_ip.to_owned()]),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, protocol)| ServicePort {
                            name: name.map(str::to_owned),
                            port: *port,
                            protocol: Some((*protocol).to_owned()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// `(address, ready, serving, terminating)`; `None` leaves the condition unset.
    type EndpointSpec<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(service: &str, ports: &[(Option<&str>, i32, &str)], endpoints: &[EndpointSpec<'_>]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abcde")),
                namespace: Some("default".to_owned()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_owned(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name: name.map(str::to_owned),
                        port: Some(*port),
                        protocol: Some((*protocol).to_owned()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(address, ready, serving, terminating)| Endpoint {
                        addresses: vec![(*address).to_owned()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
        }
    }

    fn key(address: &str, port: u16, protocol: Protocol) -> ServiceKey {
        ServiceKey {
            address: address.parse().unwrap(),
            port,
            protocol,
        }
    }

    fn ip(address: &str) -> Ipv4Addr {
        address.parse().unwrap()
    }

    #[test]
    fn cluster_ip_port_goes_to_ready_endpoints_on_the_target_port() {
        let services = [service("web", "10.96.0.20", &[(None, 80, "TCP")])];
        let slices = [slice(
            "web",
            &[(None, 8080, "TCP")],
            &[
                ("10.244.1.2", Some(true), Some(true), Some(false)),
                ("10.244.1.3", None, None, None),
            ],
        )];
        let desired = desired_state(&services, &slices);
        assert_eq!(
            desired.services,
            [(
                key("10.96.0.20", 80, Protocol::Tcp),
                vec![
                    Backend::active(ip("10.244.1.2"), 8080),
                    Backend::active(ip("10.244.1.3"), 8080)
                ]
            )]
            .into()
        );
    }

    #[test]
    fn named_service_ports_take_the_slice_port_of_the_same_name() {
        let services = [service(
            "app",
            "10.96.0.21",
            &[(Some("http"), 80, "TCP"), (Some("dns"), 53, "UDP")],
        )];
        let slices = [slice(
            "app",
            &[(Some("dns"), 5353, "UDP"), (Some("http"), 8080, "TCP")],
            &[("10.244.1.2", Some(true), None, None)],
        )];
        let desired = desired_state(&services, &slices);
        assert_eq!(
            desired.services[&key("10.96.0.21", 80, Protocol::Tcp)],
            vec![Backend::active(ip("10.244.1.2"), 8080)]
        );
        assert_eq!(
            desired.services[&key("10.96.0.21", 53, Protocol::Udp)],
            vec![Backend::active(ip("10.244.1.2"), 5353)]
        );
    }

    #[test]
    fn terminating_endpoints_that_serve_become_terminating_backends() {
        let services = [service("web", "10.96.0.22", &[(None, 80, "TCP")])];
        let slices = [slice(
            "web",
            &[(None, 8080, "TCP")],
            &[
                ("10.244.1.2", Some(true), Some(true), Some(false)),
                ("10.244.1.3", Some(false), Some(true), Some(true)),
                ("10.244.1.4", Some(false), Some(false), Some(true)),
                ("10.244.1.5", Some(false), Some(false), Some(false)),
            ],
        )];
        let desired = desired_state(&services, &slices);
        assert_eq!(
            desired.services[&key("10.96.0.22", 80, Protocol::Tcp)],
            vec![
                Backend::active(ip("10.244.1.2"), 8080),
                Backend::terminating(ip("10.244.1.3"), 8080)
            ]
        );
    }

    #[test]
    fn the_lb_algorithm_annotation_selects_maglev_and_anything_else_is_random() {
        let annotated = |name: &str, ip: &str, value: Option<&str>| {
            let mut service = service(name, ip, &[(None, 80, "TCP")]);
            service.metadata.annotations =
                value.map(|value| [(LB_ALGORITHM_ANNOTATION.to_owned(), value.to_owned())].into());
            service
        };
        let services = [
            annotated("maglev", "10.96.0.30", Some("maglev")),
            annotated("shouting", "10.96.0.31", Some(" Maglev ")),
            annotated("random", "10.96.0.32", Some("random")),
            annotated("unknown", "10.96.0.33", Some("round-robin")),
            annotated("plain", "10.96.0.34", None),
        ];
        let desired = desired_state(&services, &[]);
        assert_eq!(desired.services.len(), 5);
        let maglev = |ip: &str| desired.selection(&key(ip, 80, Protocol::Tcp)).algorithm;
        assert_eq!(maglev("10.96.0.30"), LbAlgorithm::Maglev);
        assert_eq!(maglev("10.96.0.31"), LbAlgorithm::Maglev);
        assert_eq!(maglev("10.96.0.32"), LbAlgorithm::Random);
        assert_eq!(maglev("10.96.0.33"), LbAlgorithm::Random);
        assert_eq!(maglev("10.96.0.34"), LbAlgorithm::Random);
        assert_eq!(desired.selections.len(), 2);
    }

    #[test]
    fn session_affinity_client_ip_takes_its_timeout_or_the_default() {
        use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
        let with_affinity = |name: &str, ip: &str, affinity: &str, timeout: Option<i32>| {
            let mut service = service(name, ip, &[(None, 80, "TCP")]);
            let spec = service.spec.as_mut().unwrap();
            spec.session_affinity = Some(affinity.to_owned());
            spec.session_affinity_config = timeout.map(|seconds| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(seconds),
                }),
            });
            service
        };
        let services = [
            with_affinity("short", "10.96.0.40", "ClientIP", Some(30)),
            with_affinity("default", "10.96.0.41", "ClientIP", None),
            with_affinity("none", "10.96.0.42", "None", Some(30)),
        ];
        let desired = desired_state(&services, &[]);
        let timeout = |ip: &str| desired.selection(&key(ip, 80, Protocol::Tcp)).affinity_timeout;
        assert_eq!(timeout("10.96.0.40"), Some(30));
        assert_eq!(timeout("10.96.0.41"), Some(10800));
        assert_eq!(timeout("10.96.0.42"), None);
    }

    #[test]
    fn service_without_endpoints_is_kept_with_no_backends() {
        let services = [service("empty", "10.96.0.23", &[(None, 80, "TCP")])];
        let desired = desired_state(&services, &[]);
        assert_eq!(desired.services[&key("10.96.0.23", 80, Protocol::Tcp)], vec![]);
    }

    #[test]
    fn headless_external_name_and_sctp_are_skipped() {
        let mut external = service("ext", "", &[(None, 80, "TCP")]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".to_owned());
        let services = [
            service("headless", "None", &[(None, 80, "TCP")]),
            external,
            service("sctp", "10.96.0.24", &[(None, 9, "SCTP")]),
        ];
        assert_eq!(desired_state(&services, &[]), DesiredState::default());
    }

    #[test]
    fn slices_of_other_services_namespaces_and_families_are_ignored() {
        let services = [service("web", "10.96.0.25", &[(None, 80, "TCP")])];
        let mut other_namespace = slice("web", &[(None, 8080, "TCP")], &[("10.244.9.1", None, None, None)]);
        other_namespace.metadata.namespace = Some("kube-system".to_owned());
        let mut ipv6 = slice("web", &[(None, 8080, "TCP")], &[("fd00::5", None, None, None)]);
        ipv6.address_type = "IPv6".to_owned();
        let slices = [
            slice("api", &[(None, 8080, "TCP")], &[("10.244.9.2", None, None, None)]),
            other_namespace,
            ipv6,
            slice("web", &[(None, 8080, "TCP")], &[("10.244.1.2", None, None, None)]),
        ];
        let desired = desired_state(&services, &slices);
        assert_eq!(
            desired.services[&key("10.96.0.25", 80, Protocol::Tcp)],
            vec![Backend::active(ip("10.244.1.2"), 8080)]
        );
    }

    #[test]
    fn an_endpoint_in_two_slices_counts_once_and_ready_wins() {
        let services = [service("web", "10.96.0.26", &[(None, 80, "TCP")])];
        let slices = [
            slice(
                "web",
                &[(None, 8080, "TCP")],
                &[("10.244.1.2", Some(false), Some(true), Some(true))],
            ),
            slice(
                "web",
                &[(None, 8080, "TCP")],
                &[("10.244.1.2", Some(true), Some(true), Some(false))],
            ),
        ];
        let desired = desired_state(&services, &slices);
        assert_eq!(
            desired.services[&key("10.96.0.26", 80, Protocol::Tcp)],
            vec![Backend::active(ip("10.244.1.2"), 8080)]
        );
    }

    fn on_node(mut slice: EndpointSlice, nodes: &[&str]) -> EndpointSlice {
        for (endpoint, node) in slice.endpoints.iter_mut().flatten().zip(nodes) {
            endpoint.node_name = Some((*node).to_owned());
        }
        slice
    }

    fn exposed(name: &str, cluster_ip: &str, type_: &str, node_port: i32, policy: Option<&str>) -> Service {
        let mut service = service(name, cluster_ip, &[(None, 80, "TCP")]);
        let spec = service.spec.as_mut().unwrap();
        spec.type_ = Some(type_.to_owned());
        spec.external_traffic_policy = policy.map(str::to_owned);
        spec.ports.as_mut().unwrap()[0].node_port = Some(node_port);
        service
    }

    fn node() -> NodeContext {
        NodeContext {
            name: "node-a".to_owned(),
            addresses: vec![ip("192.168.1.10"), ip("192.168.2.10")],
        }
    }

    #[test]
    fn node_ports_listen_on_every_node_address_and_mark_remote_endpoints() {
        let services = [exposed("web", "10.96.0.50", "NodePort", 30080, None)];
        let slices = [on_node(
            slice(
                "web",
                &[(None, 8080, "TCP")],
                &[("10.244.1.2", None, None, None), ("10.244.2.2", None, None, None)],
            ),
            &["node-a", "node-b"],
        )];
        let desired = desired_state_for_node(&services, &slices, &node());
        let all = vec![
            Backend::active(ip("10.244.1.2"), 8080),
            Backend::active(ip("10.244.2.2"), 8080).on_remote_node(),
        ];
        assert_eq!(desired.services.len(), 3, "{desired:?}");
        assert_eq!(desired.services[&key("10.96.0.50", 80, Protocol::Tcp)], all);
        for address in ["192.168.1.10", "192.168.2.10"] {
            let frontend = key(address, 30080, Protocol::Tcp);
            assert_eq!(desired.services[&frontend], all);
            let selection = desired.selection(&frontend);
            assert!(selection.external && !selection.external_local, "{selection:?}");
        }
        assert!(!desired.selection(&key("10.96.0.50", 80, Protocol::Tcp)).external);
        // Without a node: the ClusterIP alone, every endpoint local.
        let plain = desired_state(&services, &slices);
        assert_eq!(plain.services.len(), 1);
        assert!(plain.services.values().flatten().all(|b| !b.remote));
    }

    #[test]
    fn load_balancer_ips_and_external_traffic_policy_local() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let mut lb = exposed("lb", "10.96.0.51", "LoadBalancer", 30081, Some("Local"));
        lb.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("203.0.113.7".to_owned()),
                        ..LoadBalancerIngress::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example".to_owned()),
                        ..LoadBalancerIngress::default()
                    },
                ]),
            }),
            ..ServiceStatus::default()
        });
        // A ClusterIP service's nodePort (left over after a type change) is no frontend.
        let mut plain = exposed("plain", "10.96.0.52", "ClusterIP", 30082, None);
        plain.spec.as_mut().unwrap().type_ = None;
        let slices = [on_node(
            slice(
                "lb",
                &[(None, 8080, "TCP")],
                &[("10.244.1.2", None, None, None), ("10.244.2.2", None, None, None)],
            ),
            &["node-a", "node-b"],
        )];
        let desired = desired_state_for_node(&[lb, plain], &slices, &node());
        let local = vec![Backend::active(ip("10.244.1.2"), 8080)];
        for frontend in [
            key("203.0.113.7", 80, Protocol::Tcp),
            key("192.168.1.10", 30081, Protocol::Tcp),
            key("192.168.2.10", 30081, Protocol::Tcp),
        ] {
            assert_eq!(desired.services[&frontend], local, "{frontend}");
            let selection = desired.selection(&frontend);
            assert!(selection.external && selection.external_local, "{selection:?}");
        }
        // The ClusterIP keeps both endpoints.
        assert_eq!(desired.services[&key("10.96.0.51", 80, Protocol::Tcp)].len(), 2);
        assert_eq!(desired.services.len(), 5, "{:?}", desired.services.keys());
    }

    #[test]
    fn internal_traffic_policy_local_gives_the_cluster_ip_only_this_nodes_endpoints() {
        let mut service = exposed("web", "10.96.0.53", "NodePort", 30083, None);
        service.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".to_owned());
        let slices = [on_node(
            slice(
                "web",
                &[(None, 8080, "TCP")],
                &[("10.244.1.2", None, None, None), ("10.244.2.2", None, None, None)],
            ),
            &["node-a", "node-b"],
        )];
        let desired = desired_state_for_node(std::slice::from_ref(&service), &slices, &node());
        let cluster_ip = key("10.96.0.53", 80, Protocol::Tcp);
        assert_eq!(desired.services[&cluster_ip], [Backend::active(ip("10.244.1.2"), 8080)]);
        // External traffic follows externalTrafficPolicy (Cluster): every endpoint.
        assert_eq!(desired.services[&key("192.168.1.10", 30083, Protocol::Tcp)].len(), 2);

        // On a node without endpoints of its own the ClusterIP has no backend: refused.
        let other = NodeContext {
            name: "node-c".to_owned(),
            ..node()
        };
        let desired = desired_state_for_node(std::slice::from_ref(&service), &slices, &other);
        assert!(desired.services[&cluster_ip].is_empty(), "{desired:?}");
    }

    fn dual_stack(name: &str, cluster_ips: &[&str]) -> Service {
        let mut service = service(name, cluster_ips[0], &[(None, 80, "TCP")]);
        let spec = service.spec.as_mut().unwrap();
        spec.cluster_ips = Some(cluster_ips.iter().map(|ip| (*ip).to_owned()).collect());
        spec.ip_families = Some(
            cluster_ips
                .iter()
                .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" }.to_owned())
                .collect(),
        );
        spec.ip_family_policy = Some("PreferDualStack".to_owned());
        service
    }

    fn slice6(service: &str, endpoints: &[EndpointSpec<'_>]) -> EndpointSlice {
        let mut slice = slice(service, &[(None, 8080, "TCP")], endpoints);
        slice.metadata.name = Some(format!("{service}-v6"));
        slice.address_type = "IPv6".to_owned();
        slice
    }

    #[test]
    fn an_ipv6_cluster_ip_goes_to_the_endpoints_of_ipv6_slices() {
        let services = [service("v6", "fd00:96::1", &[(None, 80, "TCP")])];
        let slices = [
            slice6(
                "v6",
                &[
                    ("fd00:244::2", None, None, None),
                    ("fd00:244::3", Some(false), Some(true), Some(true)),
                ],
            ),
            // An IPv4 slice of the same service has nothing for an IPv6-only ClusterIP.
            slice("v6", &[(None, 8080, "TCP")], &[("10.244.1.2", None, None, None)]),
        ];
        let desired = desired_state(&services, &slices);
        let v6: IpAddr = "fd00:244::2".parse().unwrap();
        let draining: IpAddr = "fd00:244::3".parse().unwrap();
        assert_eq!(
            desired.services,
            [(
                key("fd00:96::1", 80, Protocol::Tcp),
                vec![Backend::active(v6, 8080), Backend::terminating(draining, 8080)]
            )]
            .into()
        );
    }

    #[test]
    fn a_dual_stack_service_has_one_frontend_per_family_with_that_familys_endpoints() {
        let mut service = dual_stack("web", &["10.96.0.60", "fd00:96::60"]);
        service.metadata.annotations = Some([(LB_ALGORITHM_ANNOTATION.to_owned(), "maglev".to_owned())].into());
        let slices = [
            slice("web", &[(None, 8080, "TCP")], &[("10.244.1.2", None, None, None)]),
            slice6("web", &[("fd00:244::2", None, None, None)]),
        ];
        let desired = desired_state(&[service], &slices);
        let v4 = key("10.96.0.60", 80, Protocol::Tcp);
        let v6 = key("fd00:96::60", 80, Protocol::Tcp);
        assert_eq!(desired.services.len(), 2, "{:?}", desired.services.keys());
        assert_eq!(desired.services[&v4], vec![Backend::active(ip("10.244.1.2"), 8080)]);
        let backend6: IpAddr = "fd00:244::2".parse().unwrap();
        assert_eq!(desired.services[&v6], vec![Backend::active(backend6, 8080)]);
        // Both frontends select the same way.
        assert_eq!(desired.selection(&v4).algorithm, LbAlgorithm::Maglev);
        assert_eq!(desired.selection(&v6).algorithm, LbAlgorithm::Maglev);
    }

    #[test]
    fn external_frontends_are_ipv4_only() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let ingress = |ip: &str| LoadBalancerIngress {
            ip: Some(ip.to_owned()),
            ..LoadBalancerIngress::default()
        };
        let mut dual = dual_stack("dual", &["10.96.0.61", "fd00:96::61"]);
        let mut v6_only = dual_stack("v6only", &["fd00:96::62"]);
        for service in [&mut dual, &mut v6_only] {
            let spec = service.spec.as_mut().unwrap();
            spec.type_ = Some("LoadBalancer".to_owned());
            spec.ports.as_mut().unwrap()[0].node_port = Some(30090);
            service.status = Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![ingress("203.0.113.9"), ingress("2001:db8::9")]),
                }),
                ..ServiceStatus::default()
            });
        }
        let slices = [
            slice("dual", &[(None, 8080, "TCP")], &[("10.244.1.2", None, None, None)]),
            slice6("dual", &[("fd00:244::2", None, None, None)]),
            slice6("v6only", &[("fd00:244::3", None, None, None)]),
        ];
        let desired = desired_state_for_node(&[dual, v6_only], &slices, &node());
        let external: Vec<&ServiceKey> = desired
            .services
            .keys()
            .filter(|key| desired.selection(key).external)
            .collect();
        assert_eq!(
            external,
            [
                &key("192.168.1.10", 30090, Protocol::Tcp),
                &key("192.168.2.10", 30090, Protocol::Tcp),
                &key("203.0.113.9", 80, Protocol::Tcp),
            ],
            "{:?}",
            desired.services.keys()
        );
        for key in external {
            assert!(desired.services[key].iter().all(|b| b.address.is_ipv4()), "{key}");
            assert_eq!(desired.services[key].len(), 1);
        }
        // The ClusterIPs of both families stay.
        assert!(desired.services.contains_key(&key("fd00:96::61", 80, Protocol::Tcp)));
        assert!(desired.services.contains_key(&key("fd00:96::62", 80, Protocol::Tcp)));
        assert_eq!(desired.services.len(), 6);
    }
}
