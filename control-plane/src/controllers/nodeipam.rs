//! Node IPAM: every Node gets `spec.podCIDR` and `spec.podCIDRs`, one block per cluster CIDR
//! (one per address family), as kube-controller-manager's node-ipam controller does with
//! `--allocate-node-cidrs --cluster-cidr --node-cidr-mask-size`. The agents give pods
//! addresses from their node's block and route other nodes' blocks to those nodes.
//!
//! Nothing is kept but the Nodes: every pass rebuilds what is taken from their specs, so a
//! deleted node's block is free again and a restarted server never hands one out twice.
//! A node that already has a podCIDR keeps it (Kubernetes never changes it); when a cluster
//! CIDR is full, the node gets a `CIDRNotAvailable` Event and waits for a block to free.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::events::{EventType, Recorder};
use super::{Pass, Result, run_passes};

const COMPONENT: &str = "node-ipam-controller";

/// One cluster CIDR and the size of the block each node gets from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCidr {
    pub net: IpNet,
    pub node_prefix: u8,
}

impl ClusterCidr {
    /// How many node blocks the CIDR holds (saturating at u128::MAX).
    fn blocks(&self) -> u128 {
        let bits = u32::from(self.node_prefix - self.net.prefix_len());
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    /// The `index`th node block.
    fn block(&self, index: u128) -> IpNet {
        let host_bits = u32::from(self.net.max_prefix_len() - self.node_prefix);
        let offset = index.checked_shl(host_bits).unwrap_or(0);
        let address = match self.net.network() {
            std::net::IpAddr::V4(v4) => std::net::IpAddr::V4((u32::from(v4) + offset as u32).into()),
            std::net::IpAddr::V6(v6) => std::net::IpAddr::V6((u128::from(v6) + offset).into()),
        };
        IpNet::new(address, self.node_prefix).expect("the prefix was validated")
    }

    /// The index of `block` when it is one of this CIDR's node blocks.
    fn index_of(&self, block: &IpNet) -> Option<u128> {
        if block.prefix_len() != self.node_prefix || !self.net.contains(block) {
            return None;
        }
        let host_bits = u32::from(self.net.max_prefix_len() - self.node_prefix);
        let delta = match (block.network(), self.net.network()) {
            (std::net::IpAddr::V4(b), std::net::IpAddr::V4(n)) => u128::from(u32::from(b) - u32::from(n)),
            (std::net::IpAddr::V6(b), std::net::IpAddr::V6(n)) => u128::from(b) - u128::from(n),
            _ => return None,
        };
        Some(delta.checked_shr(host_bits).unwrap_or(0))
    }
}

/// The `--cluster-cidr` blocks with their `--node-cidr-mask-size[-ipv4|-ipv6]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCidrs(pub Vec<ClusterCidr>);

impl fmt::Display for ClusterCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|c| format!("{}/{}", c.net, c.node_prefix)).collect();
        f.write_str(&parts.join(","))
    }
}

impl ClusterCidrs {
    /// `cidrs`: comma-separated, at most one IPv4 and one IPv6 (dual-stack); the node blocks
    /// are /`v4_prefix` and /`v6_prefix`. An empty string turns allocation off.
    pub fn parse(cidrs: &str, v4_prefix: u8, v6_prefix: u8) -> Result<ClusterCidrs, String> {
        let mut out: Vec<ClusterCidr> = Vec::new();
        for part in cidrs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net: IpNet = part
                .parse()
                .map_err(|e| format!("--cluster-cidr: {part:?} is not a CIDR like 10.244.0.0/16: {e}"))?;
            if net.addr() != net.network() {
                return Err(format!(
                    "--cluster-cidr: {part:?} has host bits set: did you mean {}/{}?",
                    net.network(),
                    net.prefix_len()
                ));
            }
            let (node_prefix, flag) = match net {
                IpNet::V4(_) => (v4_prefix, "--node-cidr-mask-size-ipv4"),
                IpNet::V6(_) => (v6_prefix, "--node-cidr-mask-size-ipv6"),
            };
            // A block must hold more than the network and broadcast addresses, and be part
            // of the cluster CIDR.
            let max = net.max_prefix_len() - 2;
            if node_prefix < net.prefix_len() || node_prefix > max {
                return Err(format!(
                    "{flag} {node_prefix} does not fit --cluster-cidr {net}: it must be from {} to {max}",
                    net.prefix_len()
                ));
            }
            if out.iter().any(|c| c.net.addr().is_ipv4() == net.addr().is_ipv4()) {
                return Err(format!(
                    "--cluster-cidr {cidrs:?}: at most one IPv4 and one IPv6 CIDR (dual-stack)"
                ));
            }
            out.push(ClusterCidr { net, node_prefix });
        }
        Ok(ClusterCidrs(out))
    }
}

/// What the allocator needs of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCidrs {
    pub name: String,
    /// creationTimestamp (RFC 3339), for oldest-first allocation.
    pub created: String,
    pub pod_cidrs: Vec<String>,
}

impl NodeCidrs {
    pub fn of(node: &Node) -> NodeCidrs {
        let spec = node.spec.as_ref();
        let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if pod_cidrs.is_empty()
            && let Some(cidr) = spec.and_then(|s| s.pod_cidr.clone()).filter(|c| !c.is_empty())
        {
            pod_cidrs.push(cidr);
        }
        NodeCidrs {
            name: node.name_any(),
            created: node
                .meta()
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            pod_cidrs,
        }
    }
}

/// What a pass decides for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write these blocks (one per cluster CIDR, in `--cluster-cidr` order).
    Assign(Vec<IpNet>),
    /// A cluster CIDR has no free block left.
    Exhausted(IpNet),
}

/// The blocks nodes without podCIDRs get: oldest nodes first, lowest free block first.
/// Blocks that nodes hold (inside the cluster CIDRs or not) are never handed out again.
pub fn allocate(cidrs: &ClusterCidrs, nodes: &[NodeCidrs]) -> HashMap<String, Decision> {
    let mut taken: Vec<BTreeSet<u128>> = vec![BTreeSet::new(); cidrs.0.len()];
    for node in nodes {
        for block in node.pod_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()) {
            for (cidr, taken) in cidrs.0.iter().zip(taken.iter_mut()) {
                if let Some(index) = cidr.index_of(&block) {
                    taken.insert(index);
                }
            }
        }
    }
    let mut waiting: Vec<&NodeCidrs> = nodes.iter().filter(|n| n.pod_cidrs.is_empty()).collect();
    waiting.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    let mut decisions = HashMap::new();
    'nodes: for node in waiting {
        let mut blocks = Vec::new();
        let mut chosen = Vec::new();
        for (i, cidr) in cidrs.0.iter().enumerate() {
            // The lowest index not taken: the taken set is sorted, so walk it.
            let mut index = 0u128;
            for used in &taken[i] {
                if *used != index {
                    break;
                }
                index += 1;
            }
            if index >= cidr.blocks() {
                decisions.insert(node.name.clone(), Decision::Exhausted(cidr.net));
                continue 'nodes;
            }
            chosen.push((i, index));
            blocks.push(cidr.block(index));
        }
        for (i, index) in chosen {
            taken[i].insert(index);
        }
        decisions.insert(node.name.clone(), Decision::Assign(blocks));
    }
    decisions
}

struct Allocator {
    client: Client,
    cidrs: ClusterCidrs,
    nodes: Store<Node>,
    recorder: Recorder,
    /// Nodes told that their CIDR is full, so the Event is not repeated every pass.
    reported: BTreeSet<String>,
    /// Blocks written to nodes (by uid) that the watch cache may not show yet: counted as
    /// theirs, so a pass working from a stale cache never hands them out twice.
    assigned: HashMap<String, Vec<String>>,
}

impl Pass for Allocator {
    async fn pass(&mut self) -> Result<()> {
        let nodes: Vec<Arc<Node>> = self.nodes.state();
        let mut infos: Vec<NodeCidrs> = nodes.iter().map(|n| NodeCidrs::of(n)).collect();
        // Assignments the cache shows by now, or whose node is gone, need no more keeping.
        let waiting: HashMap<String, usize> = nodes
            .iter()
            .zip(&infos)
            .enumerate()
            .filter(|(_, (_, info))| info.pod_cidrs.is_empty())
            .filter_map(|(i, (node, _))| Some((node.uid()?, i)))
            .collect();
        self.assigned.retain(|uid, _| waiting.contains_key(uid));
        for (uid, blocks) in &self.assigned {
            infos[waiting[uid]].pod_cidrs = blocks.clone();
        }
        self.reported.retain(|name| infos.iter().any(|info| &info.name == name));
        let api: Api<Node> = Api::all(self.client.clone());
        for (name, decision) in allocate(&self.cidrs, &infos) {
            let Some(node) = nodes.iter().find(|n| n.name_any() == name) else {
                continue;
            };
            match decision {
                Decision::Assign(blocks) => {
                    let texts: Vec<String> = blocks.iter().map(ToString::to_string).collect();
                    // The resourceVersion makes a racing writer (another allocator, an
                    // agent) lose with a conflict instead of being overwritten.
                    let patch = json!({
                        "metadata": {"resourceVersion": node.resource_version()},
                        "spec": {"podCIDR": texts[0], "podCIDRs": texts},
                    });
                    match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        Ok(_) => {
                            tracing::info!(node = %name, cidrs = ?texts, "node-ipam: assigned pod CIDRs");
                            self.reported.remove(&name);
                            if let Some(uid) = node.uid() {
                                self.assigned.insert(uid, texts);
                            }
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Decision::Exhausted(net) => {
                    if self.reported.insert(name.clone()) {
                        let message = format!(
                            "Node {name} status is now: CIDRNotAvailable (no free block left in cluster CIDR {net})"
                        );
                        tracing::warn!(node = %name, %net, "node-ipam: cluster CIDR exhausted");
                        self.recorder
                            .publish(node.as_ref(), EventType::Normal, "CIDRNotAvailable", &message)
                            .await;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Assigns pod CIDRs to Nodes until the watch ends. With no cluster CIDR it does nothing.
pub async fn run(client: Client, cidrs: ClusterCidrs) -> Result<()> {
    if cidrs.0.is_empty() {
        std::future::pending::<()>().await;
    }
    let recorder = Recorder::new(client.clone(), COMPONENT);
    let api = Api::<Node>::all(client.clone());
    run_passes(
        "the node-ipam controller's watch",
        api,
        Duration::from_secs(30),
        |nodes| Allocator {
            recorder,
            client,
            cidrs,
            nodes,
            reported: BTreeSet::new(),
            assigned: HashMap::new(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, created: &str, cidrs: &[&str]) -> NodeCidrs {
        NodeCidrs {
            name: name.to_owned(),
            created: created.to_owned(),
            pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn assigned(decisions: &HashMap<String, Decision>, name: &str) -> Vec<String> {
        match &decisions[name] {
            Decision::Assign(blocks) => blocks.iter().map(ToString::to_string).collect(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn flags_parse_and_say_what_is_wrong() {
        let c = ClusterCidrs::parse("10.244.0.0/16", 24, 64).unwrap();
        assert_eq!(c.to_string(), "10.244.0.0/16/24");
        let dual = ClusterCidrs::parse("10.244.0.0/16, fd00:10:244::/56", 24, 64).unwrap();
        assert_eq!(dual.0.len(), 2);
        assert!(ClusterCidrs::parse("", 24, 64).unwrap().0.is_empty());
        let err = ClusterCidrs::parse("10.244.0.1/16", 24, 64).unwrap_err();
        assert!(err.contains("did you mean 10.244.0.0/16"), "{err}");
        let err = ClusterCidrs::parse("10.244.0.0/16", 8, 64).unwrap_err();
        assert!(
            err.contains("--node-cidr-mask-size-ipv4 8") && err.contains("from 16 to 30"),
            "{err}"
        );
        let err = ClusterCidrs::parse("10.0.0.0/8,10.244.0.0/16", 24, 64).unwrap_err();
        assert!(err.contains("at most one IPv4"), "{err}");
        assert!(ClusterCidrs::parse("ten/8", 24, 64).is_err());
    }

    #[test]
    fn nodes_get_the_lowest_free_block_oldest_first_and_keep_theirs() {
        let cidrs = ClusterCidrs::parse("10.244.0.0/16", 24, 64).unwrap();
        let nodes = [
            node("c", "2026-01-03T00:00:00Z", &[]),
            node("a", "2026-01-01T00:00:00Z", &["10.244.0.0/24"]),
            node("b", "2026-01-02T00:00:00Z", &[]),
            // Outside the cluster CIDR: kept, and takes nothing from it.
            node("d", "2025-12-31T00:00:00Z", &["192.168.7.0/24"]),
        ];
        let decisions = allocate(&cidrs, &nodes);
        assert_eq!(decisions.len(), 2, "nodes with a podCIDR are left alone: {decisions:?}");
        assert_eq!(assigned(&decisions, "b"), ["10.244.1.0/24"]);
        assert_eq!(assigned(&decisions, "c"), ["10.244.2.0/24"]);
    }

    #[test]
    fn a_deleted_nodes_block_is_reused_and_holes_fill_first() {
        let cidrs = ClusterCidrs::parse("10.244.0.0/16", 24, 64).unwrap();
        let nodes = [
            node("a", "1", &["10.244.0.0/24"]),
            node("c", "3", &["10.244.2.0/24"]),
            node("new", "4", &[]),
        ];
        assert_eq!(assigned(&allocate(&cidrs, &nodes), "new"), ["10.244.1.0/24"]);
    }

    #[test]
    fn dual_stack_nodes_get_one_block_per_family() {
        let cidrs = ClusterCidrs::parse("10.244.0.0/16,fd00:10:244::/56", 24, 64).unwrap();
        let nodes = [
            node("a", "1", &["10.244.0.0/24", "fd00:10:244::/64"]),
            node("b", "2", &[]),
        ];
        assert_eq!(
            assigned(&allocate(&cidrs, &nodes), "b"),
            ["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
    }

    #[test]
    fn a_full_cluster_cidr_leaves_the_rest_waiting() {
        let cidrs = ClusterCidrs::parse("10.244.0.0/23", 24, 64).unwrap();
        let nodes = [node("a", "1", &[]), node("b", "2", &[]), node("c", "3", &[])];
        let decisions = allocate(&cidrs, &nodes);
        assert_eq!(assigned(&decisions, "a"), ["10.244.0.0/24"]);
        assert_eq!(assigned(&decisions, "b"), ["10.244.1.0/24"]);
        assert_eq!(decisions["c"], Decision::Exhausted("10.244.0.0/23".parse().unwrap()));
    }

    #[test]
    fn huge_ipv6_ranges_do_not_overflow() {
        let cidrs = ClusterCidrs::parse("fd00::/8", 24, 120).unwrap();
        assert_eq!(cidrs.0[0].blocks(), 1u128 << 112);
        let decisions = allocate(&cidrs, &[node("a", "1", &["fd00::/120"]), node("b", "2", &[])]);
        assert_eq!(assigned(&decisions, "b"), ["fd00::100/120"]);
    }
}
