//! Pods on this node: the watch of the pods bound to it (`manager`), one worker per pod
//! that runs it on containerd (`worker`), and what they are built from: container configs
//! (`config`), environments (`env`), quantities (`quantity`), status (`status`),
//! CrashLoopBackOff (`backoff`), probes (`probes`) and the pod directory the streaming
//! server reads (`directory`).

pub mod backoff;
pub mod config;
pub mod directory;
pub mod env;
pub mod manager;
pub mod probes;
pub mod quantity;
pub mod status;
pub mod worker;
