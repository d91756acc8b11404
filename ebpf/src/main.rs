//! Weir's kernel programs for Kubernetes services: socket-LB on the cgroup hooks (IPv4 and
//! IPv6), and NodePort/LoadBalancer translation on TC and XDP (IPv4). One hook per file; each hook is a
//! thin wrapper. The maps they share are in `maps.rs`, the service lookup and the socket
//! translations in `service.rs`, the per-packet NAT TC and XDP share in `nodeport.rs`.
#![no_std]
#![no_main]

mod connect4;
mod connect6;
mod getpeername4;
mod getpeername6;
mod maps;
mod nodeport;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod service;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic at run time.
    unsafe { core::hint::unreachable_unchecked() }
}

// None of the helpers used here is GPL-only, so the project's own license applies.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
