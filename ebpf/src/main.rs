//! Weir's kernel programs: socket-LB for Kubernetes services (IPv4). One hook per file;
//! each hook is a thin wrapper around a `try_*` function. The maps they share are in
//! `maps.rs`, the service lookup and the two translations in `service.rs`.
#![no_std]
#![no_main]

mod connect4;
mod getpeername4;
mod maps;
mod recvmsg4;
mod sendmsg4;
mod service;

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
