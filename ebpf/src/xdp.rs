//! XDP on the node's external interfaces: the ingress half of TC's work (new
//! NodePort/LoadBalancer flows, replies from remote backends) before the kernel builds an
//! skb. Packets are edited in place; checksums are updated incrementally (RFC 1624),
//! since the skb checksum helpers do not exist here. The verdict is XDP_PASS: the kernel
//! routes the translated packet. What XDP leaves alone TC still translates: IPv4 headers
//! with options, and ICMP errors. The DSR option is added here (bpf_xdp_adjust_head gives
//! 8 bytes in front; the Ethernet and fixed IPv4 headers move into them).

use aya_ebpf::helpers::bpf_xdp_adjust_head;
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use weir_ebpf_common::{DSR_OPTION_LEN, STAT_XDP_NEW, STAT_XDP_TRACKED};

use crate::nodeport::{ETH_HLEN, Hook, IP_CSUM, IP_HLEN, L4Csum, Packet, Verdict, process};

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
    const ICMP_ERRORS: bool = false;

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

    #[inline(always)]
    fn insert_ip_option(&mut self, option: [u8; DSR_OPTION_LEN as usize]) -> Option<()> {
        const LEN: usize = DSR_OPTION_LEN as usize;
        // Only headers without options get here (IP_OPTIONS is false): 34 bytes to move.
        const HEADERS: usize = ETH_HLEN + IP_HLEN;
        // SAFETY: the context of this program; a negative delta takes headroom.
        if unsafe { bpf_xdp_adjust_head(self.0.ctx, -(LEN as i32)) } != 0 {
            return None;
        }
        // The old headers now start LEN bytes in; copy them to the front, a word at a time
        // (the ranges overlap, and the copy runs front to back, so no byte is read after
        // it was overwritten).
        for word in 0..HEADERS / 2 {
            let from: *mut u16 = self.ptr(LEN + 2 * word)?;
            let to: *mut u16 = self.ptr(2 * word)?;
            // SAFETY: both bounds checked by `ptr`.
            unsafe { to.write_unaligned(from.read_unaligned()) };
        }
        let gap: *mut [u8; LEN] = self.ptr(HEADERS)?;
        // SAFETY: bounds checked by `ptr`.
        unsafe { gap.write_unaligned(option) };
        let first: *mut u16 = self.ptr(ETH_HLEN)?;
        let total: *mut u16 = self.ptr(ETH_HLEN + 2)?;
        // SAFETY: bounds checked by `ptr`.
        let (old_first, old_total) = unsafe { (first.read_unaligned(), total.read_unaligned()) };
        let [version_ihl, tos] = old_first.to_ne_bytes();
        let new_first = u16::from_ne_bytes([version_ihl + (LEN / 4) as u8, tos]);
        let new_total = (u16::from_be(old_total) + LEN as u16).to_be();
        // SAFETY: bounds checked by `ptr`.
        unsafe {
            first.write_unaligned(new_first);
            total.write_unaligned(new_total);
        }
        self.csum_update(IP_CSUM, u32::from(old_first), u32::from(new_first), false)?;
        self.csum_update(IP_CSUM, u32::from(old_total), u32::from(new_total), false)?;
        // The option's words join the header sum.
        for half in [&option[..4], &option[4..]] {
            let word = u32::from_ne_bytes([half[0], half[1], half[2], half[3]]);
            self.csum_update(IP_CSUM, 0, word, false)?;
        }
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
