//! cgroup/recvmsg6: a UDP reply from a backend appears to come from the service address
//! the IPv6 socket sent to. recvmsg6 programs cannot reject: the verdict is always ALLOW.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{ALLOW, translate_reverse6};

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    match try_sock_recvmsg6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_sock_recvmsg6(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_reverse6(ctx);
    Ok(ALLOW)
}
