//! The maps, pinned by name so they outlive the agent that loaded them. Their names must
//! equal the `weir_ebpf_common` constants (the agent opens them by those names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use weir_ebpf_common::{
    AFFINITY4_MAX_ENTRIES, Affinity4Key, Affinity4Value, BACKENDS4_MAX_ENTRIES, Backend4Value, CT4_MAX_ENTRIES, Ct4Key,
    Ct4Value, MAGLEV4_MAX_ENTRIES, Node4Config, REV_NAT4_MAX_ENTRIES, RevNat4Value, SERVICES4_MAX_ENTRIES,
    SOCK_REV_NAT4_MAX_ENTRIES, STATS_MAX_ENTRIES, Service4Key, Service4Value, SockRevNat4Key, SockRevNat4Value,
};

#[map]
pub static SERVICES4: HashMap<Service4Key, Service4Value> = HashMap::pinned(SERVICES4_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS4: HashMap<u32, Backend4Value> = HashMap::pinned(BACKENDS4_MAX_ENTRIES, 0);

#[map]
pub static REV_NAT4: HashMap<u32, RevNat4Value> = HashMap::pinned(REV_NAT4_MAX_ENTRIES, 0);

#[map]
pub static SOCK_REV_NAT4: LruHashMap<SockRevNat4Key, SockRevNat4Value> =
    LruHashMap::pinned(SOCK_REV_NAT4_MAX_ENTRIES, 0);

/// Allocated on use (BPF_F_NO_PREALLOC): only Maglev services have tables.
#[map]
pub static MAGLEV4: HashMap<u64, u32> = HashMap::pinned(MAGLEV4_MAX_ENTRIES, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
pub static AFFINITY4: LruHashMap<Affinity4Key, Affinity4Value> = LruHashMap::pinned(AFFINITY4_MAX_ENTRIES, 0);

/// NodePort/LoadBalancer conntrack. LRU: under pressure the least recently used flows go
/// first; the agent's sweep removes idle ones long before that.
#[map]
pub static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(CT4_MAX_ENTRIES, 0);

#[map]
pub static NODE4: Array<Node4Config> = Array::pinned(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_MAX_ENTRIES, 0);
