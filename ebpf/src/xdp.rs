//! XDP on the node's external interfaces: the ingress half of TC's work (new
//! NodePort/LoadBalancer flows, replies from remote backends) before the kernel builds an
//! skb. Packets are edited in place; checksums are updated incrementally (RFC 1624),
//! since the skb checksum helpers do not exist here. The verdict is XDP_PASS: the kernel
//! routes the translated packet. What XDP leaves alone TC still translates: IPv4 headers
//! with options, ICMP errors, and the packets of DSR flows that need the DSR option (a new
//! or retransmitted TCP SYN, every UDP datagram), since growing the packet is TC's
//! (bpf_skb_adjust_room); the other packets of a DSR flow XDP translates.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use weir_ebpf_common::{STAT_XDP_NEW, STAT_XDP_TRACKED};

use crate::nodeport::{Hook, IP_CSUM, L4Csum, Packet, Verdict, process};

struct Frame<'a>(&'a XdpContext);

impl Frame<'_> {
    #[inline(always)]
    fn ptr<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.0.data() + offset;
        if start + core::mem::size_of::<T>() > self.0.data_end() {
            return None;
        }
        Some(start as *mut T)
    }

    /// `check` with 16-bit words `old` replaced by `new` (one's complement arithmetic on
    /// words as they sit in memory, so byte order does not matter).
    #[inline(always)]
    fn csum_update(&mut self, offset: usize, old: u32, new: u32, udp: bool) -> Option<()> {
        let check: *mut u16 = self.ptr(offset)?;
        // SAFETY: bounds checked by `ptr`.
        let current = unsafe { check.read_unaligned() };
        if udp && current == 0 {
            return Some(());
        }
        let mut sum = u32::from(!current);
        sum += (!old & 0xffff) + (!old >> 16);
        sum += (new & 0xffff) + (new >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let mut folded = !(sum as u16);
        if udp && folded == 0 {
            folded = 0xffff;
        }
        // SAFETY: as above.
        unsafe { check.write_unaligned(folded) };
        Some(())
    }
}

impl Packet for Frame<'_> {
    const IP_OPTIONS: bool = false;
    const DSR_AND_ICMP: bool = false;

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let ptr: *mut T = self.ptr(offset)?;
        // SAFETY: bounds checked by `ptr`.
        Some(unsafe { ptr.read_unaligned() })
    }

    #[inline(always)]
    fn set_addr(&mut self, offset: usize, csum: L4Csum, old: u32, new: u32) -> Option<()> {
        self.csum_update(csum.offset, old, new, csum.udp)?;
        self.csum_update(IP_CSUM, old, new, false)?;
        let field: *mut u32 = self.ptr(offset)?;
        // SAFETY: bounds checked by `ptr`.
        unsafe { field.write_unaligned(new) };
        Some(())
    }

    #[inline(always)]
    fn set_port(&mut self, offset: usize, csum: L4Csum, old: u16, new: u16) -> Option<()> {
        self.csum_update(csum.offset, u32::from(old), u32::from(new), csum.udp)?;
        let field: *mut u16 = self.ptr(offset)?;
        // SAFETY: bounds checked by `ptr`.
        unsafe { field.write_unaligned(new) };
        Some(())
    }

    #[inline(always)]
    fn set_addr_l3(&mut self, offset: usize, ip_csum: usize, old: u32, new: u32) -> Option<()> {
        self.csum_update(ip_csum, old, new, false)?;
        let field: *mut u32 = self.ptr(offset)?;
        // SAFETY: bounds checked by `ptr`.
        unsafe { field.write_unaligned(new) };
        Some(())
    }
}

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    match process(&mut Frame(&ctx), Hook::Xdp, STAT_XDP_NEW, STAT_XDP_TRACKED) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}
