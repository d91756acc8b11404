//! Weir's node agent: joining a cluster with a token (`join`), the Node and its heartbeats
//! (`node`) and the userspace side of the eBPF service datapath (`datapath`); pods on
//! containerd and the pod network grow around it.

pub mod datapath;
pub mod join;
pub mod node;
pub mod pods;
