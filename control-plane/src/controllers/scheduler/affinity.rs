//! Inter-pod affinity and anti-affinity, as kube-scheduler's InterPodAffinity plugin: required
//! terms filter nodes (the incoming pod's own terms and, symmetrically, existing pods'
//! anti-affinity against it), preferred terms score them. Work is per topology domain: each
//! incoming pod is compared with the placed pods once, never once per node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, PodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;

use super::NodeState;
use crate::controllers::replicaset::selects;

/// Namespace labels by name, for `namespaceSelector`.
pub type NamespaceLabels = HashMap<String, BTreeMap<String, String>>;

/// Pods that occupy nodes, indexed for affinity: by label, and the few with terms of their own.
#[derive(Default)]
pub struct PlacedPods {
    pods: Vec<(Arc<Pod>, usize)>,
    by_label: HashMap<(String, String), Vec<usize>>,
    /// Pods with any affinity or anti-affinity term (required or preferred), with those terms.
    with_terms: Vec<(usize, Terms)>,
}

fn pod_affinity_terms(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
}

impl PlacedPods {
    /// Records `pod` as running on the node at `node` (an index into the scheduler's nodes).
    pub fn add(&mut self, pod: Arc<Pod>, node: usize, ns_labels: &NamespaceLabels) {
        let i = self.pods.len();
        for (k, v) in pod.labels() {
            self.by_label.entry((k.clone(), v.clone())).or_default().push(i);
        }
        if pod_affinity_terms(&pod) {
            self.with_terms.push((i, Terms::of(&pod, ns_labels)));
        }
        self.pods.push((pod, node));
    }

    /// Placed pods the term may select: those carrying one of its required labels when it has
    /// one, all of them otherwise.
    fn candidates<'a>(&'a self, term: &Term) -> Box<dyn Iterator<Item = &'a (Arc<Pod>, usize)> + 'a> {
        let Some(sel) = term.selector.as_ref() else {
            return Box::new(std::iter::empty());
        };
        if let Some((k, v)) = sel.match_labels.as_ref().and_then(|m| m.iter().next()) {
            let list = self.by_label.get(&(k.clone(), v.clone()));
            return Box::new(list.into_iter().flatten().map(|&i| &self.pods[i]));
        }
        if let Some(e) = sel.match_expressions.iter().flatten().find(|e| e.operator == "In") {
            let mut ids: Vec<usize> = e
                .values
                .iter()
                .flatten()
                .filter_map(|v| self.by_label.get(&(e.key.clone(), v.clone())))
                .flatten()
                .copied()
                .collect();
            ids.sort_unstable();
            ids.dedup();
            return Box::new(ids.into_iter().map(|i| &self.pods[i]));
        }
        Box::new(self.pods.iter())
    }
}

/// One affinity term made concrete for its owner: namespaces resolved, matchLabelKeys and
/// mismatchLabelKeys folded into the selector (as the API server does since Kubernetes 1.31).
pub struct Term {
    topology_key: String,
    selector: Option<LabelSelector>,
    all_namespaces: bool,
    namespaces: HashSet<String>,
    weight: i64,
}

impl Term {
    pub fn new(term: &PodAffinityTerm, weight: i32, owner: &Pod, ns_labels: &NamespaceLabels) -> Term {
        let mut selector = term.label_selector.clone();
        let owner_labels = owner.labels();
        let mut add = |keys: Option<&Vec<String>>, op: &str| {
            for key in keys.into_iter().flatten() {
                if let (Some(sel), Some(v)) = (selector.as_mut(), owner_labels.get(key)) {
                    sel.match_expressions
                        .get_or_insert_with(Vec::new)
                        .push(LabelSelectorRequirement {
                            key: key.clone(),
                            operator: op.into(),
                            values: Some(vec![v.clone()]),
                        });
                }
            }
        };
        add(term.match_label_keys.as_ref(), "In");
        add(term.mismatch_label_keys.as_ref(), "NotIn");
        let mut namespaces: HashSet<String> = term.namespaces.iter().flatten().cloned().collect();
        let mut all_namespaces = false;
        match &term.namespace_selector {
            None if namespaces.is_empty() => {
                namespaces.insert(owner.namespace().unwrap_or_default());
            }
            None => {}
            Some(sel) if is_empty(sel) => all_namespaces = true,
            Some(sel) => namespaces.extend(
                ns_labels
                    .iter()
                    .filter(|(_, labels)| selects(sel, labels))
                    .map(|(n, _)| n.clone()),
            ),
        }
        Term {
            topology_key: term.topology_key.clone(),
            selector,
            all_namespaces,
            namespaces,
            weight: weight.into(),
        }
    }

    /// Whether the term selects `pod`: a null selector selects nothing, an empty one everything.
    pub fn matches(&self, pod: &Pod) -> bool {
        let in_namespace = self.all_namespaces || pod.namespace().is_some_and(|n| self.namespaces.contains(&n));
        in_namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|s| is_empty(s) || selects(s, pod.labels()))
    }
}

fn is_empty(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty())
}

/// A pod's terms by kind.
#[derive(Default)]
struct Terms {
    required_affinity: Vec<Term>,
    required_anti: Vec<Term>,
    preferred_affinity: Vec<Term>,
    preferred_anti: Vec<Term>,
}

impl Terms {
    fn of(pod: &Pod, ns_labels: &NamespaceLabels) -> Terms {
        let Some(a) = pod.spec.as_ref().and_then(|s| s.affinity.as_ref()) else {
            return Terms::default();
        };
        let required = |terms: Option<&Vec<PodAffinityTerm>>| -> Vec<Term> {
            terms
                .into_iter()
                .flatten()
                .map(|t| Term::new(t, 1, pod, ns_labels))
                .collect()
        };
        let preferred = |terms: Option<&Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>| -> Vec<Term> {
            terms
                .into_iter()
                .flatten()
                .map(|t| Term::new(&t.pod_affinity_term, t.weight, pod, ns_labels))
                .collect()
        };
        let aff = a.pod_affinity.as_ref();
        let anti = a.pod_anti_affinity.as_ref();
        Terms {
            required_affinity: required(
                aff.and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref()),
            ),
            required_anti: required(anti.and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())),
            preferred_affinity: preferred(
                aff.and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_ref()),
            ),
            preferred_anti: preferred(
                anti.and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_ref()),
            ),
        }
    }
}

/// Topology domains: label key → values. Nested so that lookups borrow a node's labels
/// instead of building keys.
#[derive(Default)]
struct Domains<T>(HashMap<String, HashMap<String, T>>);

impl<T: Default> Domains<T> {
    fn entry(&mut self, nodes: &[NodeState], node: usize, key: &str) -> Option<&mut T> {
        let v = nodes[node].node.labels().get(key)?;
        Some(self.0.entry(key.to_string()).or_default().entry(v.clone()).or_default())
    }

    fn insert(&mut self, nodes: &[NodeState], node: usize, key: &str) {
        self.entry(nodes, node, key);
    }

    fn get(&self, key: &str, value: &str) -> Option<&T> {
        self.0.get(key)?.get(value)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the placed pods mean for one incoming pod, per topology domain (label key, value).
#[derive(Default)]
pub struct PodAffinity {
    /// Domains where an existing pod's required anti-affinity rejects the incoming pod.
    existing_anti: Domains<()>,
    /// The incoming pod's required affinity, per term (all must hold): its topology key and the
    /// domains with a pod it matches.
    affinity: Vec<(String, Domains<()>)>,
    /// No placed pod matches, but the pod matches its own terms: the first of its group.
    affinity_first_of_group: bool,
    anti_keys: Vec<String>,
    anti_domains: Domains<()>,
    /// Preferred terms (both ways) and existing pods' required affinity, summed per domain.
    scores: Domains<i64>,
}

impl PodAffinity {
    /// `nodes` are the scheduler's nodes, indexed as in `placed`.
    pub fn new(pod: &Pod, nodes: &[NodeState], placed: &PlacedPods, ns_labels: &NamespaceLabels) -> PodAffinity {
        let mut out = PodAffinity::default();
        let own = Terms::of(pod, ns_labels);
        // Existing pods' terms about the incoming pod (symmetry).
        for (i, theirs) in &placed.with_terms {
            let (_, node) = &placed.pods[*i];
            for t in theirs.required_anti.iter().filter(|t| t.matches(pod)) {
                out.existing_anti.insert(nodes, *node, &t.topology_key);
            }
            // kube-scheduler's hardPodAffinityWeight: an existing pod's required affinity to the
            // incoming one counts as a preference of weight 1.
            for (terms, sign) in [
                (&theirs.required_affinity, 1),
                (&theirs.preferred_affinity, 1),
                (&theirs.preferred_anti, -1),
            ] {
                for t in terms.iter().filter(|t| t.matches(pod)) {
                    if let Some(s) = out.scores.entry(nodes, *node, &t.topology_key) {
                        *s += sign * t.weight;
                    }
                }
            }
        }
        for t in &own.required_affinity {
            let mut domains = Domains::default();
            for (_, node) in placed.candidates(t).filter(|(p, _)| t.matches(p)) {
                domains.insert(nodes, *node, &t.topology_key);
            }
            out.affinity.push((t.topology_key.clone(), domains));
        }
        out.affinity_first_of_group =
            out.affinity.iter().all(|(_, d)| d.is_empty()) && own.required_affinity.iter().all(|t| t.matches(pod));
        for t in &own.required_anti {
            out.anti_keys.push(t.topology_key.clone());
            for (_, node) in placed.candidates(t).filter(|(p, _)| t.matches(p)) {
                out.anti_domains.insert(nodes, *node, &t.topology_key);
            }
        }
        for (terms, sign) in [(&own.preferred_affinity, 1), (&own.preferred_anti, -1)] {
            for t in terms {
                for (_, node) in placed.candidates(t).filter(|(p, _)| t.matches(p)) {
                    if let Some(s) = out.scores.entry(nodes, *node, &t.topology_key) {
                        *s += sign * t.weight;
                    }
                }
            }
        }
        out
    }

    /// Why `node` is ruled out, in kube-scheduler's words and order: own affinity, own
    /// anti-affinity, then existing pods' anti-affinity.
    pub fn misfit(&self, node: &Node) -> Option<&'static str> {
        let labels = node.labels();
        if !self.affinity.is_empty() {
            let mut all_present = true;
            for (key, domains) in &self.affinity {
                match labels.get(key) {
                    None => return Some("node(s) didn't match pod affinity rules"),
                    Some(v) => all_present &= domains.get(key, v).is_some(),
                }
            }
            if !all_present && !self.affinity_first_of_group {
                return Some("node(s) didn't match pod affinity rules");
            }
        }
        if self
            .anti_keys
            .iter()
            .any(|key| labels.get(key).is_some_and(|v| self.anti_domains.get(key, v).is_some()))
        {
            return Some("node(s) didn't match pod anti-affinity rules");
        }
        if !self.existing_anti.is_empty() && labels.iter().any(|(k, v)| self.existing_anti.get(k, v).is_some()) {
            return Some("node(s) didn't satisfy existing pods anti-affinity rules");
        }
        None
    }

    /// Raw preference for `node` (positive: attracted, negative: repelled); normalized by the caller.
    pub fn score(&self, node: &Node) -> i64 {
        if self.scores.is_empty() {
            return 0;
        }
        node.labels().iter().filter_map(|(k, v)| self.scores.get(k, v)).sum()
    }

    pub fn has_scores(&self) -> bool {
        !self.scores.is_empty()
    }
}
