//! The maps, pinned by name so they outlive the agent that loaded them. Their names must
//! equal the `weir_ebpf_common` constants (the agent opens them by those names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use weir_ebpf_common::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS4_MAX_ENTRIES, BACKENDS6_MAX_ENTRIES, Backend4Value,
    Backend6Value, CT4_MAX_ENTRIES, Ct4Key, Ct4Value, MAGLEV_MAX_ENTRIES, Node4Config, REV_NAT4_MAX_ENTRIES,
    REV_NAT6_MAX_ENTRIES, RevNat4Value, RevNat6Value, SERVICES4_MAX_ENTRIES, SERVICES6_MAX_ENTRIES,
    SOCK_REV_NAT4_MAX_ENTRIES, SOCK_REV_NAT6_MAX_ENTRIES, STATS_MAX_ENTRIES, Service4Key, Service6Key, ServiceValue,
    SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value,
};

#[map]
pub static SERVICES4: HashMap<Service4Key, ServiceValue> = HashMap::pinned(SERVICES4_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS4: HashMap<u32, Backend4Value> = HashMap::pinned(BACKENDS4_MAX_ENTRIES, 0);

#[map]
pub static REV_NAT4: HashMap<u32, RevNat4Value> = HashMap::pinned(REV_NAT4_MAX_ENTRIES, 0);

#[map]
pub static SOCK_REV_NAT4: LruHashMap<SockRevNat4Key, SockRevNat4Value> =
    LruHashMap::pinned(SOCK_REV_NAT4_MAX_ENTRIES, 0);

#[map]
pub static SERVICES6: HashMap<Service6Key, ServiceValue> = HashMap::pinned(SERVICES6_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS6: HashMap<u32, Backend6Value> = HashMap::pinned(BACKENDS6_MAX_ENTRIES, 0);

#[map]
pub static REV_NAT6: HashMap<u32, RevNat6Value> = HashMap::pinned(REV_NAT6_MAX_ENTRIES, 0);

#[map]
pub static SOCK_REV_NAT6: LruHashMap<SockRevNat6Key, SockRevNat6Value> =
    LruHashMap::pinned(SOCK_REV_NAT6_MAX_ENTRIES, 0);

/// Allocated on use (BPF_F_NO_PREALLOC): only Maglev services have tables. Both families:
/// reverse-NAT ids are unique over both.
#[map]
pub static MAGLEV: HashMap<u64, u32> = HashMap::pinned(MAGLEV_MAX_ENTRIES, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Both families, as MAGLEV.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

/// NodePort/LoadBalancer conntrack. LRU: under pressure the least recently used flows go
/// first; the agent's sweep removes idle ones long before that.
#[map]
pub static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(CT4_MAX_ENTRIES, 0);

#[map]
pub static NODE4: Array<Node4Config> = Array::pinned(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_MAX_ENTRIES, 0);
