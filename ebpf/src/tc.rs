//! TC (TCX, or clsact on older kernels) on the node's external interfaces. Ingress: new
//! NodePort/LoadBalancer flows are translated, and replies that come back from remote
//! backends (to the SNAT address) are reverse-NATed. Egress: replies of local backends
//! leave with the frontend as their source. Packets are edited with bpf_skb_store_bytes,
//! checksums with bpf_l3_csum_replace / bpf_l4_csum_replace, which also handle skbs whose
//! L4 checksum is left to the device (CHECKSUM_PARTIAL).
//!
//! TC also does the rarer work XDP passes on: ICMP errors about translated flows, and
//! reading the DSR option on a DSR flow's backend node. It adds the option (where XDP did
//! not) with bpf_skb_adjust_room (BPF_ADJ_ROOM_NET: room after the fixed IPv4 header).

use aya_ebpf::{macros::classifier, programs::TcContext};
use weir_ebpf_common::{DSR_OPTION_LEN, STAT_TC_EGRESS_TRACKED, STAT_TC_INGRESS_NEW, STAT_TC_INGRESS_TRACKED};

use crate::nodeport::{ETH_HLEN, Hook, IP_CSUM, IP_HLEN, L4Csum, Packet, Verdict, process};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
const BPF_ADJ_ROOM_NET: u32 = 0;

struct Skb<'a>(&'a TcContext);

impl Packet for Skb<'_> {
    const IP_OPTIONS: bool = true;
    const ICMP_ERRORS: bool = true;

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load(offset).ok()
    }

    #[inline(always)]
    fn set_addr(&mut self, offset: usize, csum: L4Csum, old: u32, new: u32) -> Option<()> {
        let mangled = if csum.udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        self.0
            .l4_csum_replace(
                csum.offset,
                u64::from(old),
                u64::from(new),
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .ok()?;
        self.0
            .l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)
            .ok()?;
        self.0.store(offset, &new, 0).ok()
    }

    #[inline(always)]
    fn set_port(&mut self, offset: usize, csum: L4Csum, old: u16, new: u16) -> Option<()> {
        let mangled = if csum.udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        self.0
            .l4_csum_replace(csum.offset, u64::from(old), u64::from(new), mangled | 2)
            .ok()?;
        self.0.store(offset, &new, 0).ok()
    }

    #[inline(always)]
    fn set_addr_l3(&mut self, offset: usize, ip_csum: usize, old: u32, new: u32) -> Option<()> {
        self.0
            .l3_csum_replace(ip_csum, u64::from(old), u64::from(new), 4)
            .ok()?;
        self.0.store(offset, &new, 0).ok()
    }

    #[inline(always)]
    fn insert_ip_option(&mut self, option: [u8; DSR_OPTION_LEN as usize]) -> Option<()> {
        const LEN: u16 = DSR_OPTION_LEN as u16;
        let first: u16 = self.load(ETH_HLEN)?;
        let total: u16 = self.load(ETH_HLEN + 2)?;
        let [version_ihl, tos] = first.to_ne_bytes();
        // The header length field counts up to 15 words.
        if (version_ihl & 0x0f) + (LEN / 4) as u8 > 15 {
            return None;
        }
        // Room after the fixed header (the kernel moves the Ethernet and IPv4 headers
        // forward, zeroes the gap, and lowers a TCP GSO packet's segment size to match;
        // it refuses UDP GSO packets, which are dropped).
        self.0.adjust_room(i32::from(LEN), BPF_ADJ_ROOM_NET, 0).ok()?;
        self.0.store(ETH_HLEN + IP_HLEN, &option, 0).ok()?;
        let new_first = u16::from_ne_bytes([version_ihl + (LEN / 4) as u8, tos]);
        let new_total = (u16::from_be(total) + LEN).to_be();
        for (offset, old, new) in [(ETH_HLEN, first, new_first), (ETH_HLEN + 2, total, new_total)] {
            self.0
                .l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 2)
                .ok()?;
            self.0.store(offset, &new, 0).ok()?;
        }
        // The option's words join the header sum (the gap they replace was zeros).
        for half in [&option[..4], &option[4..]] {
            let word = u32::from_ne_bytes([half[0], half[1], half[2], half[3]]);
            self.0.l3_csum_replace(IP_CSUM, 0, u64::from(word), 4).ok()?;
        }
        Some(())
    }
}

#[inline(always)]
fn verdict(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    verdict(process(
        &mut Skb(&ctx),
        Hook::TcIngress,
        STAT_TC_INGRESS_NEW,
        STAT_TC_INGRESS_TRACKED,
    ))
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    // Egress never starts a flow: the new-flow counter is never touched.
    verdict(process(
        &mut Skb(&ctx),
        Hook::TcEgress,
        STAT_TC_EGRESS_TRACKED,
        STAT_TC_EGRESS_TRACKED,
    ))
}
