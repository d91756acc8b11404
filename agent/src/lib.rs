//! Weir's node agent: the Node and its heartbeats (`node`) and the userspace side of the
//! eBPF service datapath (`datapath`); pods on containerd and the pod network grow around it.

pub mod datapath;
pub mod node;
