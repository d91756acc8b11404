//! Pods on this node: how their status is computed (`status`), how crashing containers
//! back off (`backoff`) and how their probes run (`probes`). The pod worker that runs them on containerd comes with the node
//! agent issue.

pub mod backoff;
pub mod probes;
pub mod status;
