//! Weir's node agent. Today it holds the userspace side of the eBPF service datapath and
//! the pod network; node lifecycle and pods on containerd grow around them.

pub mod datapath;
pub mod network;
