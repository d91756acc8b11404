//! cgroup/getpeername4: a socket connected through a service reports the service address
//! as its peer, as it would behind kube-proxy. Cannot reject: the verdict is always ALLOW.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{ALLOW, translate_reverse4};

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    match try_sock_getpeername4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_sock_getpeername4(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_reverse4(ctx);
    Ok(ALLOW)
}
