//! Weir's node agent. Today it holds the userspace side of the eBPF service datapath;
//! node lifecycle, pods on containerd ([`runtime`]) and the pod network grow around it.

pub mod datapath;
pub mod runtime;
