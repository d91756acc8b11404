//! cgroup/connect4: TCP and connected UDP to a ClusterIP go to a backend, chosen once per
//! connection. A service without backends fails the connect at once with ECONNREFUSED.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{REJECT, translate_forward4};

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    match try_sock_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(errno) => {
            // A bare REJECT makes connect() fail with EPERM; setting the return value
            // first is what turns it into the ECONNREFUSED a client expects (kernel ≥ 5.18).
            // SAFETY: bpf_set_retval is available to connect4 programs.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

fn try_sock_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_forward4(ctx)
}
