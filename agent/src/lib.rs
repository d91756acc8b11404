//! Weir's node agent: joining a cluster with a token (`join`), the Node and its heartbeats
//! (`node`), the pod network (`network`), containers on containerd (`runtime`), pod status
//! and back-off (`pods`), the streaming server for logs, exec and port-forward (`stream`) and the userspace side of the eBPF service datapath (`datapath`).

pub mod agent;
pub mod datapath;
pub mod join;
pub mod network;
pub mod node;
pub mod pods;
pub mod runtime;
pub mod stream;
pub mod volumes;
