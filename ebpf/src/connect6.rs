//! cgroup/connect6: connect4 for IPv6 sockets. A ClusterIP of either family (IPv4 as an
//! IPv4-mapped address on a dual-stack socket) goes to a backend; no backend, ECONNREFUSED.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{REJECT, translate_forward6};

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    match try_sock_connect6(&ctx) {
        Ok(verdict) => verdict,
        Err(errno) => {
            // As in connect4: the return value turns the bare EPERM into ECONNREFUSED.
            // SAFETY: bpf_set_retval is available to connect6 programs.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

fn try_sock_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_forward6(ctx)
}
