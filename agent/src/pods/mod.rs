//! Pods on this node: how their status is computed (`status`) and how crashing containers
//! back off (`backoff`). The pod worker that runs them on containerd comes with the node
//! agent issue.

pub mod backoff;
pub mod status;
