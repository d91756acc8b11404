//! Routes to other nodes' podCIDRs via their node IPs, marked with
//! [`NODE_ROUTE_PROTOCOL`](super::NODE_ROUTE_PROTOCOL) in the main table so that only ours
//! are ever changed. The plan (what to add, replace, remove) is a pure function; applying it
//! is in [`PodNetwork::sync_node_routes`](super::PodNetwork::sync_node_routes).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{Error, Result};

/// A route to a podCIDR via a node IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeRoute {
    /// The other node's podCIDR.
    pub cidr: IpNet,
    /// The other node's IP (on a network this node is directly attached to).
    pub via: IpAddr,
}

/// The routes to the podCIDRs of `nodes` (all of them: [`plan`] skips this node's own):
/// each of a node's `spec.podCIDRs` (or `spec.podCIDR`) via its first `InternalIP` of the
/// same family. A node without a podCIDR yet, or without an address of that family, gets no
/// route.
pub fn node_routes(nodes: &[Node]) -> Vec<NodeRoute> {
    let mut routes = Vec::new();
    for node in nodes {
        let Some(spec) = node.spec.as_ref() else { continue };
        let cidrs = match (&spec.pod_cidrs, &spec.pod_cidr) {
            (Some(cidrs), _) if !cidrs.is_empty() => cidrs.clone(),
            (_, Some(cidr)) => vec![cidr.clone()],
            _ => continue,
        };
        let internal_ips: Vec<IpAddr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        for cidr in cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()) {
            if let Some(via) = internal_ips.iter().find(|ip| ip.is_ipv4() == cidr.network().is_ipv4()) {
                routes.push(NodeRoute {
                    cidr: cidr.trunc(),
                    via: *via,
                });
            }
        }
    }
    routes
}

/// One change to the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// No route of ours to this podCIDR: add one (failing if a route of someone else's is
    /// there, which is left alone).
    Add(NodeRoute),
    /// Our route to this podCIDR goes elsewhere: replace it.
    Replace(NodeRoute),
    /// A route of ours that is no longer wanted.
    Remove(NodeRoute),
}

/// The changes that turn `current` (our routes in the kernel) into `desired`, skipping
/// `own_cidr` (this node's pods are routed by their `/32` routes). Fails when two nodes
/// claim one podCIDR or a podCIDR and its node IP are of different families.
pub fn plan(own_cidr: Option<IpNet>, current: &[NodeRoute], desired: &[NodeRoute]) -> Result<Vec<RouteChange>> {
    let mut wanted: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
    for route in desired {
        let cidr = route.cidr.trunc();
        if cidr.network().is_ipv4() != route.via.is_ipv4() {
            return Err(Error::MixedFamilies { cidr, via: route.via });
        }
        if Some(cidr) == own_cidr.map(|c| c.trunc()) {
            continue;
        }
        if let Some(other) = wanted.insert(cidr, route.via)
            && other != route.via
        {
            return Err(Error::Invalid(format!(
                "podCIDR {cidr} is claimed by two nodes, {other} and {}; the node IPAM controller \
                 should never do that: check the nodes' spec.podCIDR",
                route.via
            )));
        }
    }
    let mut have: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
    for route in current {
        have.entry(route.cidr.trunc()).or_default().push(route.via);
    }
    let mut changes = Vec::new();
    for (cidr, vias) in &have {
        match wanted.get(cidr) {
            // One route per destination is ours to keep; duplicates (other metrics) go.
            Some(via) if vias.contains(via) => {
                let mut kept = false;
                for v in vias {
                    if v == via && !kept {
                        kept = true;
                    } else {
                        changes.push(RouteChange::Remove(NodeRoute { cidr: *cidr, via: *v }));
                    }
                }
            }
            Some(via) => {
                changes.push(RouteChange::Replace(NodeRoute { cidr: *cidr, via: *via }));
                for v in &vias[1..] {
                    changes.push(RouteChange::Remove(NodeRoute { cidr: *cidr, via: *v }));
                }
            }
            None => changes.extend(
                vias.iter()
                    .map(|v| RouteChange::Remove(NodeRoute { cidr: *cidr, via: *v })),
            ),
        }
    }
    for (cidr, via) in &wanted {
        if !have.contains_key(cidr) {
            changes.push(RouteChange::Add(NodeRoute { cidr: *cidr, via: *via }));
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cidr: &str, via: &str) -> NodeRoute {
        NodeRoute {
            cidr: cidr.parse().unwrap(),
            via: via.parse().unwrap(),
        }
    }

    fn node(name: &str, cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidrs.first().map(|c| c.to_string()),
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(type_, address)| NodeAddress {
                            type_: type_.to_string(),
                            address: address.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn node_routes_pair_each_podcidr_with_the_internal_ip_of_its_family() {
        let nodes = [
            node(
                "a",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &[
                    ("Hostname", "a"),
                    ("InternalIP", "192.0.2.1"),
                    ("InternalIP", "2001:db8::1"),
                ],
            ),
            node(
                "b",
                &["10.244.2.0/24"],
                &[("ExternalIP", "198.51.100.2"), ("InternalIP", "192.0.2.2")],
            ),
            // No podCIDR yet, or no InternalIP: no route.
            node("c", &[], &[("InternalIP", "192.0.2.3")]),
            node("d", &["10.244.4.0/24"], &[("ExternalIP", "198.51.100.4")]),
        ];
        assert_eq!(
            node_routes(&nodes),
            vec![
                r("10.244.1.0/24", "192.0.2.1"),
                r("fd00:10:244:1::/64", "2001:db8::1"),
                r("10.244.2.0/24", "192.0.2.2"),
            ]
        );
    }

    #[test]
    fn nothing_changes_when_the_kernel_has_what_is_wanted() {
        let routes = [r("10.244.1.0/24", "192.0.2.1"), r("10.244.2.0/24", "192.0.2.2")];
        assert_eq!(plan(None, &routes, &routes).unwrap(), vec![]);
    }

    #[test]
    fn missing_routes_are_added_moved_ones_replaced_and_stale_ones_removed() {
        let current = [r("10.244.1.0/24", "192.0.2.1"), r("10.244.2.0/24", "192.0.2.2")];
        let desired = [r("10.244.2.0/24", "192.0.2.9"), r("10.244.3.0/24", "192.0.2.3")];
        assert_eq!(
            plan(None, &current, &desired).unwrap(),
            vec![
                RouteChange::Remove(r("10.244.1.0/24", "192.0.2.1")),
                RouteChange::Replace(r("10.244.2.0/24", "192.0.2.9")),
                RouteChange::Add(r("10.244.3.0/24", "192.0.2.3")),
            ]
        );
    }

    #[test]
    fn the_own_podcidr_is_never_routed_to_a_node_and_a_stale_route_to_it_goes() {
        let own = "10.244.1.0/24".parse().unwrap();
        let current = [r("10.244.1.0/24", "192.0.2.7")];
        let desired = [r("10.244.1.0/24", "192.0.2.1"), r("10.244.2.0/24", "192.0.2.2")];
        assert_eq!(
            plan(Some(own), &current, &desired).unwrap(),
            vec![
                RouteChange::Remove(r("10.244.1.0/24", "192.0.2.7")),
                RouteChange::Add(r("10.244.2.0/24", "192.0.2.2")),
            ]
        );
    }

    #[test]
    fn duplicate_routes_of_ours_to_one_podcidr_are_reduced_to_one() {
        let current = [r("10.244.2.0/24", "192.0.2.2"), r("10.244.2.0/24", "192.0.2.5")];
        assert_eq!(
            plan(None, &current, &[r("10.244.2.0/24", "192.0.2.5")]).unwrap(),
            vec![RouteChange::Remove(r("10.244.2.0/24", "192.0.2.2"))]
        );
    }

    #[test]
    fn dual_stack_routes_are_planned_per_family() {
        let desired = [r("10.244.2.0/24", "192.0.2.2"), r("fd00:10:244:2::/64", "2001:db8::2")];
        assert_eq!(
            plan(None, &[], &desired).unwrap(),
            vec![
                RouteChange::Add(r("10.244.2.0/24", "192.0.2.2")),
                RouteChange::Add(r("fd00:10:244:2::/64", "2001:db8::2")),
            ]
        );
    }

    #[test]
    fn conflicting_or_mixed_family_input_is_refused() {
        let two_owners = [r("10.244.2.0/24", "192.0.2.2"), r("10.244.2.0/24", "192.0.2.3")];
        let err = plan(None, &[], &two_owners).unwrap_err();
        assert!(err.to_string().contains("claimed by two nodes"), "{err}");
        let mixed = [r("10.244.2.0/24", "2001:db8::2")];
        assert!(matches!(plan(None, &[], &mixed), Err(Error::MixedFamilies { .. })));
        // The same route twice is fine.
        let twice = [r("10.244.2.0/24", "192.0.2.2"), r("10.244.2.0/24", "192.0.2.2")];
        assert_eq!(plan(None, &[], &twice).unwrap().len(), 1);
    }
}
