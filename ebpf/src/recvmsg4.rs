//! cgroup/recvmsg4: a UDP reply from a backend appears to come from the service address
//! the socket sent to. recvmsg4 programs cannot reject: the verdict is always ALLOW.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::service::{ALLOW, translate_reverse4};

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    match try_sock_recvmsg4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_sock_recvmsg4(ctx: &SockAddrContext) -> Result<i32, i32> {
    translate_reverse4(ctx);
    Ok(ALLOW)
}
