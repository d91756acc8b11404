//! cgroup/sendmsg4: each datagram an unconnected UDP socket sends to a ClusterIP goes to a
//! backend; the reverse entry lets recvmsg4 restore the service address on the reply.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{REJECT, translate_forward4};

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_sock_sendmsg4(&ctx) {
        Ok(verdict) => verdict,
        Err(errno) => {
            // SAFETY: bpf_set_retval is available to sendmsg4 programs.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

fn try_sock_sendmsg4(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_forward4(ctx)
}
