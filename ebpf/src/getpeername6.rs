//! cgroup/getpeername6: an IPv6 socket connected through a service reports the service
//! address as its peer. Cannot reject: the verdict is always ALLOW.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{ALLOW, translate_reverse6};

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    match try_sock_getpeername6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_sock_getpeername6(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_reverse6(ctx);
    Ok(ALLOW)
}
