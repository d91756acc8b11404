//! TC (TCX, or clsact on older kernels) on the node's external interfaces. Ingress: new
//! NodePort/LoadBalancer flows are translated, and replies that come back from remote
//! backends (to the SNAT address) are reverse-NATed. Egress: replies of local backends
//! leave with the frontend as their source. Packets are edited with bpf_skb_store_bytes,
//! checksums with bpf_l3_csum_replace / bpf_l4_csum_replace, which also handle skbs whose
//! L4 checksum is left to the device (CHECKSUM_PARTIAL).

use aya_ebpf::{macros::classifier, programs::TcContext};
use weir_ebpf_common::{STAT_TC_EGRESS_TRACKED, STAT_TC_INGRESS_NEW, STAT_TC_INGRESS_TRACKED};

use crate::nodeport::{Hook, IP_CSUM, L4Csum, Packet, Verdict, process};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

struct Skb<'a>(&'a TcContext);

impl Packet for Skb<'_> {
    const IP_OPTIONS: bool = true;

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
