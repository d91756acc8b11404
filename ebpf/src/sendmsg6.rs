//! cgroup/sendmsg6: sendmsg4 for IPv6 sockets: each datagram an unconnected UDP socket
//! sends to a ClusterIP goes to a backend; recvmsg6 restores the service on the reply.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{REJECT, translate_forward6};

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_sock_sendmsg6(&ctx) {
        Ok(verdict) => verdict,
        Err(errno) => {
            // SAFETY: bpf_set_retval is available to sendmsg6 programs.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

fn try_sock_sendmsg6(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_forward6(ctx)
}
