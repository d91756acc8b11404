//! The agent's mirror of the service maps of both families, and the planning of writes:
//! from what the maps hold and what a service should become, the few writes that get
//! there, ordered so a program never follows a slot to a backend that is not there. Pure;
//! the I/O is in mod.rs.
//!
//! One index serves IPv4 and IPv6: map keys and values come as [`ByFamily`] pairs, and
//! backend and reverse-NAT ids are handed out from one id space over both families (the
//! kernel's AFFINITY and MAGLEV maps, keyed by those ids, are shared).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use weir_ebpf_common::{
    BACKEND_FLAG_REMOTE, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, BACKENDS4_MAX_ENTRIES, BACKENDS6_MAX_ENTRIES,
    BackendValue, Ipv6Words, REV_NAT4_MAX_ENTRIES, REV_NAT6_MAX_ENTRIES, RevNatValue, SCOPE_EXTERNAL, ServiceMapKey,
    ServiceValue,
};

use super::model::{Backend, BackendState, Protocol, ServiceKey};

pub(crate) type BackendId = u32;
pub(crate) type RevNatId = u32;

/// An address family: which of the `*4` or `*6` maps an entry lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An entry of the IPv4 map or of its IPv6 twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ByFamily<T4, T6> {
    V4(T4),
    V6(T6),
}

impl<T4, T6> ByFamily<T4, T6> {
    pub(crate) fn family(&self) -> Family {
        match self {
            ByFamily::V4(_) => Family::V4,
            ByFamily::V6(_) => Family::V6,
        }
    }
}

/// A key of SERVICES4 or SERVICES6.
pub(crate) type SlotKey = ByFamily<ServiceMapKey<u32>, ServiceMapKey<Ipv6Words>>;
/// A value of BACKENDS4 or BACKENDS6.
pub(crate) type BackendEntry = ByFamily<BackendValue<u32>, BackendValue<Ipv6Words>>;
/// A value of REV_NAT4 or REV_NAT6.
pub(crate) type RevNatEntry = ByFamily<RevNatValue<u32>, RevNatValue<Ipv6Words>>;

impl SlotKey {
    pub(crate) fn slot(&self) -> u16 {
        match self {
            ByFamily::V4(key) => key.slot,
            ByFamily::V6(key) => key.slot,
        }
    }

    fn with_slot(self, slot: u16) -> SlotKey {
        match self {
            ByFamily::V4(key) => ByFamily::V4(ServiceMapKey { slot, ..key }),
            ByFamily::V6(key) => ByFamily::V6(ServiceMapKey { slot, ..key }),
        }
    }

    /// The service this is a slot of; `None` for a protocol the agent never writes.
    fn service(&self) -> Option<ServiceKey> {
        let (address, port, proto) = match self {
            ByFamily::V4(key) => (key.address.ip(), key.port, key.proto),
            ByFamily::V6(key) => (key.address.ip(), key.port, key.proto),
        };
        Some(ServiceKey {
            address,
            port: u16::from_be(port),
            protocol: Protocol::from_number(proto)?,
        })
    }
}

impl BackendEntry {
    /// Address, port (host order), protocol number, state and flags.
    fn fields(&self) -> (IpAddr, u16, u8, u8, u8) {
        match self {
            ByFamily::V4(v) => (v.address.ip(), u16::from_be(v.port), v.proto, v.state, v.flags),
            ByFamily::V6(v) => (v.address.ip(), u16::from_be(v.port), v.proto, v.state, v.flags),
        }
    }

    pub(crate) fn socket_addr(&self) -> SocketAddr {
        let (address, port, ..) = self.fields();
        SocketAddr::new(address, port)
    }
}

/// The two map forms of an address: `u32` and [`Ipv6Words`], network byte order.
pub(crate) trait MapAddress: Copy {
    fn ip(self) -> IpAddr;
}

impl MapAddress for u32 {
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self.to_ne_bytes()).into()
    }
}

impl MapAddress for Ipv6Words {
    fn ip(self) -> IpAddr {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(self) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets).into()
    }
}

/// One map operation, in the order it must be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    Backend(BackendId, BackendEntry),
    RevNat(RevNatId, RevNatEntry),
    Slot(SlotKey, ServiceValue),
    RemoveSlot(SlotKey),
    RemoveRevNat(RevNatId, Family),
    RemoveBackend(BackendId, Family),
}

/// A service's frontend flags, affinity timeout, reverse-NAT id and selectable backends
/// (in slot order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Selection {
    pub(crate) flags: u8,
    pub(crate) affinity_timeout: u32,
    pub(crate) rev_nat_id: RevNatId,
    pub(crate) backends: Vec<(BackendId, BackendEntry)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceEntry {
    rev_nat_id: RevNatId,
    /// Backend ids by slot (slot n is `slots[n - 1]`): the first `selectable` are chosen
    /// from, the rest are draining. 0 marks a slot missing from the maps.
    slots: Vec<BackendId>,
    selectable: usize,
    /// `SERVICE_FLAG_*` of the frontend.
    flags: u8,
    /// sessionAffinity ClientIP timeout in seconds, 0 for none.
    affinity_timeout: u32,
}

impl ServiceEntry {
    fn frontend(&self) -> ServiceValue {
        ServiceValue {
            backend_id: 0,
            backend_count: self.selectable as u16,
            rev_nat_id: self.rev_nat_id,
            draining_count: (self.slots.len() - self.selectable) as u16,
            flags: self.flags,
            pad: [0; 3],
            affinity_timeout: self.affinity_timeout,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendAddr {
    address: IpAddr,
    port: u16,
    protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdsExhausted {
    #[error("the backend map is full ({0} backends); raise datapath::Capacity::backends")]
    Backend(usize),
    #[error("the reverse-NAT map is full ({0} service frontends); raise datapath::Capacity::services")]
    RevNat(usize),
    #[error("the IPv6 backend map is full ({0} backends); raise datapath::Capacity::backends6")]
    Backend6(usize),
    #[error("the IPv6 reverse-NAT map is full ({0} service frontends); raise datapath::Capacity::services6")]
    RevNat6(usize),
}

/// How many backends and service frontends the maps of each family hold (indexed by
/// [`Family`]): ids are handed out while a family is below these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) backends: [usize; 2],
    pub(crate) rev_nats: [usize; 2],
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            backends: [BACKENDS4_MAX_ENTRIES as usize, BACKENDS6_MAX_ENTRIES as usize],
            rev_nats: [REV_NAT4_MAX_ENTRIES as usize, REV_NAT6_MAX_ENTRIES as usize],
        }
    }
}

/// What the maps hold, in the agent's terms, plus the entries found on restore that
/// belong to nothing (left by an agent that stopped half-way); `cleanup` removes those.
#[derive(Debug, Default)]
pub(crate) struct Index {
    services: HashMap<ServiceKey, ServiceEntry>,
    backends: HashMap<BackendId, BackendEntry>,
    backend_ids: HashMap<BackendAddr, BackendId>,
    refs: HashMap<BackendId, usize>,
    rev_nat_ids: BTreeSet<RevNatId>,
    /// Backends and services per family, against [`Limits`].
    backend_counts: [usize; 2],
    service_counts: [usize; 2],
    next_backend_id: BackendId,
    next_rev_nat_id: RevNatId,
    stray_slots: Vec<SlotKey>,
    stray_rev_nats: Vec<(RevNatId, Family)>,
    stray_backends: Vec<(BackendId, Family)>,
    limits: Limits,
}

pub(crate) fn map_address(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

pub(crate) fn map_address6(address: Ipv6Addr) -> Ipv6Words {
    let octets = address.octets();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

pub(crate) fn map_port(port: u16) -> u16 {
    port.to_be()
}

fn service_map_key(key: &ServiceKey, slot: usize) -> SlotKey {
    fn build<A>(address: A, key: &ServiceKey, slot: usize) -> ServiceMapKey<A> {
        ServiceMapKey {
            address,
            port: map_port(key.port),
            slot: slot as u16,
            proto: key.protocol.number(),
            scope: SCOPE_EXTERNAL,
            pad: [0; 2],
        }
    }
    match key.address {
        IpAddr::V4(address) => ByFamily::V4(build(map_address(address), key, slot)),
        IpAddr::V6(address) => ByFamily::V6(build(map_address6(address), key, slot)),
    }
}

fn rev_nat_value(key: &ServiceKey) -> RevNatEntry {
    fn build<A>(address: A, port: u16) -> RevNatValue<A> {
        RevNatValue {
            address,
            port: map_port(port),
            pad: [0; 2],
        }
    }
    match key.address {
        IpAddr::V4(address) => ByFamily::V4(build(map_address(address), key.port)),
        IpAddr::V6(address) => ByFamily::V6(build(map_address6(address), key.port)),
    }
}

fn backend_value(addr: BackendAddr, state: BackendState, remote: bool) -> BackendEntry {
    fn build<A>(address: A, addr: BackendAddr, state: BackendState, remote: bool) -> BackendValue<A> {
        BackendValue {
            flags: if remote { BACKEND_FLAG_REMOTE } else { 0 },
            pad: [0; 3],
            address,
            port: map_port(addr.port),
            proto: addr.protocol.number(),
            state: match state {
                BackendState::Active => BACKEND_STATE_ACTIVE,
                BackendState::Terminating => BACKEND_STATE_TERMINATING,
            },
        }
    }
    match addr.address {
        IpAddr::V4(address) => ByFamily::V4(build(map_address(address), addr, state, remote)),
        IpAddr::V6(address) => ByFamily::V6(build(map_address6(address), addr, state, remote)),
    }
}

fn backend_addr(value: &BackendEntry) -> Option<BackendAddr> {
    let (address, port, proto, ..) = value.fields();
    Some(BackendAddr {
        address,
        port,
        protocol: Protocol::from_number(proto)?,
    })
}

/// Keeps every id that stays in `wanted` in its old slot, puts newcomers into the holes
/// and then at the end, and closes remaining holes by moving the last slot into them:
/// one backend more or less rewrites at most two slots.
fn stable_slots(old: &[BackendId], wanted: &[BackendId]) -> Vec<BackendId> {
    let wanted_set: BTreeSet<BackendId> = wanted.iter().copied().collect();
    let old_set: BTreeSet<BackendId> = old.iter().copied().collect();
    let mut newcomers = wanted.iter().copied().filter(|id| !old_set.contains(id));
    let mut slots: Vec<Option<BackendId>> = old.iter().map(|id| wanted_set.contains(id).then_some(*id)).collect();
    for slot in slots.iter_mut().filter(|slot| slot.is_none()) {
        *slot = newcomers.next();
    }
    slots.extend(newcomers.map(Some));
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        match slots.iter().position(Option::is_none) {
            Some(hole) => {
                slots.swap_remove(hole);
            }
            None => break,
        }
    }
    slots.into_iter().flatten().collect()
}

impl Index {
    /// Rebuilds the mirror from the contents of the service, backend and reverse-NAT maps
    /// of both families.
    pub(crate) fn restore(
        services: impl IntoIterator<Item = (SlotKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (BackendId, BackendEntry)>,
        rev_nats: impl IntoIterator<Item = (RevNatId, Family)>,
        limits: Limits,
    ) -> Index {
        let mut index = Index {
            limits,
            ..Index::default()
        };
        let mut frontends = Vec::new();
        let mut slots: HashMap<SlotKey, BTreeMap<u16, BackendId>> = HashMap::new();
        for (key, value) in services {
            if key.slot() == 0 {
                frontends.push((key, value));
            } else {
                slots
                    .entry(key.with_slot(0))
                    .or_default()
                    .insert(key.slot(), value.backend_id);
            }
        }
        for (id, value) in backends {
            index.next_backend_id = index.next_backend_id.max(id.wrapping_add(1));
            if index.backends.contains_key(&id) {
                // The same id in both families: the second is unreferenced by design.
                index.stray_backends.push((id, value.family()));
                continue;
            }
            match backend_addr(&value) {
                Some(addr) if !index.backend_ids.contains_key(&addr) => {
                    index.backend_ids.insert(addr, id);
                    index.insert_backend(id, value);
                }
                // A duplicate: unreferenced, so cleanup removes it.
                Some(_) => index.insert_backend(id, value),
                None => index.stray_backends.push((id, value.family())),
            }
        }
        for (key, value) in frontends {
            let Some(service) = key.service() else {
                index.stray_slots.push(key);
                continue;
            };
            let family = key.family();
            let total = usize::from(value.backend_count) + usize::from(value.draining_count);
            let mut held = slots.remove(&key).unwrap_or_default();
            let entry = ServiceEntry {
                rev_nat_id: value.rev_nat_id,
                slots: (1..=total)
                    .map(|slot| {
                        held.remove(&(slot as u16))
                            .filter(|id| index.backends.get(id).is_some_and(|b| b.family() == family))
                            .unwrap_or(0)
                    })
                    .collect(),
                selectable: usize::from(value.backend_count),
                flags: value.flags,
                affinity_timeout: value.affinity_timeout,
            };
            index
                .stray_slots
                .extend(held.into_keys().map(|slot| key.with_slot(slot)));
            for id in entry.slots.iter().filter(|id| **id != 0) {
                *index.refs.entry(*id).or_default() += 1;
            }
            index.rev_nat_ids.insert(entry.rev_nat_id);
            index.service_counts[family.index()] += 1;
            index.services.insert(service, entry);
        }
        for (frontend, held) in slots {
            index
                .stray_slots
                .extend(held.into_keys().map(|slot| frontend.with_slot(slot)));
        }
        let owned: BTreeSet<(RevNatId, Family)> = index
            .services
            .iter()
            .map(|(key, entry)| (entry.rev_nat_id, Family::of(key.address)))
            .collect();
        for (id, family) in rev_nats {
            if !owned.contains(&(id, family)) {
                index.stray_rev_nats.push((id, family));
            }
            index.next_rev_nat_id = index.next_rev_nat_id.max(id.wrapping_add(1));
        }
        index
    }

    pub(crate) fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// The backends of `key` as the maps hold them, selectable ones first.
    pub(crate) fn backends_of(&self, key: &ServiceKey) -> Option<Vec<Backend>> {
        let entry = self.services.get(key)?;
        Some(
            entry
                .slots
                .iter()
                .filter_map(|id| {
                    let (address, port, _, state, flags) = self.backends.get(id)?.fields();
                    Some(Backend {
                        address,
                        port,
                        state: if state == BACKEND_STATE_TERMINATING {
                            BackendState::Terminating
                        } else {
                            BackendState::Active
                        },
                        remote: flags & BACKEND_FLAG_REMOTE != 0,
                    })
                })
                .collect(),
        )
    }

    /// The writes that make `key` serve `backends`; none when the maps already do.
    /// Active backends are selectable; terminating ones only when no backend is active.
    #[cfg(test)]
    pub(crate) fn plan_upsert(&mut self, key: ServiceKey, backends: &[Backend]) -> Result<Vec<Write>, IdsExhausted> {
        self.plan_upsert_flagged(key, backends, 0, 0)
    }

    /// How `key` selects its backends, as the maps hold it.
    pub(crate) fn selection_of(&self, key: &ServiceKey) -> Option<Selection> {
        let entry = self.services.get(key)?;
        let backends = entry.slots[..entry.selectable]
            .iter()
            .filter_map(|id| Some((*id, *self.backends.get(id)?)))
            .collect();
        Some(Selection {
            flags: entry.flags,
            affinity_timeout: entry.affinity_timeout,
            rev_nat_id: entry.rev_nat_id,
            backends,
        })
    }

    /// Plans `key` to balance over `backends` with frontend `flags` (`SERVICE_FLAG_*`) and
    /// a sessionAffinity timeout in seconds (0: none). The backends must be of `key`'s
    /// family (the caller checks).
    pub(crate) fn plan_upsert_flagged(
        &mut self,
        key: ServiceKey,
        backends: &[Backend],
        flags: u8,
        affinity_timeout: u32,
    ) -> Result<Vec<Write>, IdsExhausted> {
        debug_assert!(
            backends
                .iter()
                .all(|b| Family::of(b.address) == Family::of(key.address)),
            "{key}: backends of another family"
        );
        let mut wanted: BTreeMap<(IpAddr, u16), (BackendState, bool)> = BTreeMap::new();
        for backend in backends {
            wanted
                .entry((backend.address, backend.port))
                .and_modify(|(state, _)| *state = (*state).min(backend.state))
                .or_insert((backend.state, backend.remote));
        }
        let mut writes = Vec::new();
        let mut active = Vec::new();
        let mut terminating = Vec::new();
        for ((address, port), (state, remote)) in wanted {
            let addr = BackendAddr {
                address,
                port,
                protocol: key.protocol,
            };
            let id = self.backend_id(addr, state, remote, &mut writes)?;
            match state {
                BackendState::Active => active.push(id),
                BackendState::Terminating => terminating.push(id),
            }
        }
        let (selectable, draining) = if active.is_empty() {
            (terminating, Vec::new())
        } else {
            (active, terminating)
        };

        let old = self.services.get(&key).cloned();
        let (old_selectable, old_draining) = match &old {
            Some(entry) => entry.slots.split_at(entry.selectable),
            None => (&[][..], &[][..]),
        };
        let new_selectable = stable_slots(old_selectable, &selectable);
        let new_draining = stable_slots(old_draining, &draining);
        let rev_nat_id = match &old {
            Some(entry) => entry.rev_nat_id,
            None => {
                let id = self.allocate_rev_nat_id(Family::of(key.address))?;
                writes.push(Write::RevNat(id, rev_nat_value(&key)));
                id
            }
        };
        let new = ServiceEntry {
            rev_nat_id,
            selectable: new_selectable.len(),
            slots: new_selectable.into_iter().chain(new_draining).collect(),
            flags,
            affinity_timeout,
        };
        let old_slots = old.as_ref().map_or(&[][..], |entry| &entry.slots[..]);

        let slot_writes = new
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, id)| old_slots.get(i) != Some(id))
            .map(|(i, id)| {
                Write::Slot(
                    service_map_key(&key, i + 1),
                    ServiceValue {
                        backend_id: *id,
                        ..ServiceValue::default()
                    },
                )
            });
        let frontend = (old.as_ref().map(ServiceEntry::frontend) != Some(new.frontend()))
            .then(|| Write::Slot(service_map_key(&key, 0), new.frontend()));
        // Shrinking: narrow the window programs pick from before its slots change.
        // Growing: fill the slots before the window widens over them.
        if old.as_ref().is_some_and(|entry| new.selectable < entry.selectable) {
            writes.extend(frontend);
            writes.extend(slot_writes);
        } else {
            writes.extend(slot_writes);
            writes.extend(frontend);
        }
        writes.extend((new.slots.len()..old_slots.len()).map(|i| Write::RemoveSlot(service_map_key(&key, i + 1))));

        let old_ids = old_slots.to_vec();
        self.retain(&new.slots);
        if old.is_none() {
            self.service_counts[Family::of(key.address).index()] += 1;
        }
        self.services.insert(key, new);
        self.release(&old_ids, &mut writes);
        Ok(writes)
    }

    /// The writes that remove `key`: the frontend first, so programs stop at once.
    pub(crate) fn plan_remove(&mut self, key: &ServiceKey) -> Vec<Write> {
        let Some(entry) = self.services.remove(key) else {
            return Vec::new();
        };
        let family = Family::of(key.address);
        self.service_counts[family.index()] -= 1;
        let mut writes = vec![Write::RemoveSlot(service_map_key(key, 0))];
        writes.extend((1..=entry.slots.len()).map(|slot| Write::RemoveSlot(service_map_key(key, slot))));
        writes.push(Write::RemoveRevNat(entry.rev_nat_id, family));
        self.rev_nat_ids.remove(&entry.rev_nat_id);
        self.release(&entry.slots, &mut writes);
        writes
    }

    /// Removes what restore found belonging to nothing.
    pub(crate) fn plan_cleanup(&mut self) -> Vec<Write> {
        let mut writes: Vec<Write> = self.stray_slots.drain(..).map(Write::RemoveSlot).collect();
        writes.extend(
            self.stray_rev_nats
                .drain(..)
                .map(|(id, family)| Write::RemoveRevNat(id, family)),
        );
        writes.extend(
            self.stray_backends
                .drain(..)
                .map(|(id, family)| Write::RemoveBackend(id, family)),
        );
        let orphans: Vec<BackendId> = self
            .backends
            .keys()
            .filter(|id| self.refs.get(id).copied().unwrap_or(0) == 0)
            .copied()
            .collect();
        for id in orphans {
            if let Some(family) = self.forget_backend(id) {
                writes.push(Write::RemoveBackend(id, family));
            }
        }
        writes
    }

    fn backend_id(
        &mut self,
        addr: BackendAddr,
        state: BackendState,
        remote: bool,
        writes: &mut Vec<Write>,
    ) -> Result<BackendId, IdsExhausted> {
        let value = backend_value(addr, state, remote);
        let id = match self.backend_ids.get(&addr) {
            Some(id) => *id,
            None => {
                let id = self.allocate_backend_id(value.family())?;
                self.backend_ids.insert(addr, id);
                id
            }
        };
        if self.backends.get(&id) != Some(&value) {
            self.insert_backend(id, value);
            writes.push(Write::Backend(id, value));
        }
        Ok(id)
    }

    fn insert_backend(&mut self, id: BackendId, value: BackendEntry) {
        if let Some(old) = self.backends.insert(id, value) {
            self.backend_counts[old.family().index()] -= 1;
        }
        self.backend_counts[value.family().index()] += 1;
    }

    fn retain(&mut self, ids: &[BackendId]) {
        for id in ids {
            *self.refs.entry(*id).or_default() += 1;
        }
    }

    /// Drops one reference per id; backends nobody refers to any more are removed last.
    fn release(&mut self, ids: &[BackendId], writes: &mut Vec<Write>) {
        for id in ids {
            let Some(count) = self.refs.get_mut(id) else { continue };
            *count -= 1;
            if *count == 0
                && let Some(family) = self.forget_backend(*id)
            {
                writes.push(Write::RemoveBackend(*id, family));
            }
        }
    }

    /// Forgets backend `id`; its family, if it was known.
    fn forget_backend(&mut self, id: BackendId) -> Option<Family> {
        self.refs.remove(&id);
        let value = self.backends.remove(&id)?;
        self.backend_counts[value.family().index()] -= 1;
        if let Some(addr) = backend_addr(&value)
            && self.backend_ids.get(&addr) == Some(&id)
        {
            self.backend_ids.remove(&addr);
        }
        Some(value.family())
    }

    fn allocate_backend_id(&mut self, family: Family) -> Result<BackendId, IdsExhausted> {
        let limit = self.limits.backends[family.index()];
        if self.backend_counts[family.index()] >= limit {
            return Err(match family {
                Family::V4 => IdsExhausted::Backend(limit),
                Family::V6 => IdsExhausted::Backend6(limit),
            });
        }
        loop {
            let id = self.next_backend_id.max(1);
            self.next_backend_id = id.wrapping_add(1);
            if !self.backends.contains_key(&id) {
                return Ok(id);
            }
        }
    }

    fn allocate_rev_nat_id(&mut self, family: Family) -> Result<RevNatId, IdsExhausted> {
        let limit = self.limits.rev_nats[family.index()];
        if self.service_counts[family.index()] >= limit {
            return Err(match family {
                Family::V4 => IdsExhausted::RevNat(limit),
                Family::V6 => IdsExhausted::RevNat6(limit),
            });
        }
        loop {
            let id = self.next_rev_nat_id.max(1);
            self.next_rev_nat_id = id.wrapping_add(1);
            if self.rev_nat_ids.insert(id) {
                return Ok(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey {
            address: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 53,
            protocol: Protocol::Udp,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend::active(Ipv4Addr::new(10, 244, 0, last), 5353)
    }

    fn slot_writes(writes: &[Write]) -> Vec<(u16, u32)> {
        writes
            .iter()
            .filter_map(|w| match w {
                Write::Slot(k, v) if k.slot() > 0 => Some((k.slot(), v.backend_id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn upserting_the_same_backends_again_writes_nothing() {
        let mut index = Index::default();
        let first = index.plan_upsert(key(), &[backend(1), backend(2)]).unwrap();
        // rev-NAT, two backends, two slots, the frontend.
        assert_eq!(first.len(), 6);
        assert!(index.plan_upsert(key(), &[backend(2), backend(1)]).unwrap().is_empty());
    }

    #[test]
    fn a_new_service_fills_its_slots_before_the_frontend_points_at_them() {
        let mut index = Index::default();
        let writes = index.plan_upsert(key(), &[backend(1)]).unwrap();
        let position = |pred: &dyn Fn(&Write) -> bool| writes.iter().position(pred).unwrap();
        let backend_at = position(&|w| matches!(w, Write::Backend(..)));
        let slot_at = position(&|w| matches!(w, Write::Slot(k, _) if k.slot() == 1));
        let frontend_at = position(&|w| matches!(w, Write::Slot(k, _) if k.slot() == 0));
        assert!(backend_at < slot_at && slot_at < frontend_at, "{writes:?}");
    }

    #[test]
    fn removing_a_middle_backend_moves_only_the_last_slot_and_narrows_first() {
        let mut index = Index::default();
        index.plan_upsert(key(), &[backend(1), backend(2), backend(3)]).unwrap();
        let ids = index.services[&key()].slots.clone();
        let writes = index.plan_upsert(key(), &[backend(1), backend(3)]).unwrap();
        assert!(
            matches!(&writes[0], Write::Slot(k, v) if k.slot() == 0 && v.backend_count == 2),
            "{writes:?}"
        );
        assert_eq!(slot_writes(&writes), vec![(2, ids[2])]);
        assert!(matches!(&writes[writes.len() - 2], Write::RemoveSlot(k) if k.slot() == 3));
        assert_eq!(writes.last(), Some(&Write::RemoveBackend(ids[1], Family::V4)));
    }

    #[test]
    fn terminating_backends_are_chosen_only_when_none_is_active() {
        let mut index = Index::default();
        let terminating = Backend::terminating(Ipv4Addr::new(10, 244, 0, 9), 5353);
        index.plan_upsert(key(), &[backend(1), terminating]).unwrap();
        let frontend = index.services[&key()].frontend();
        assert_eq!((frontend.backend_count, frontend.draining_count), (1, 1));

        index.plan_upsert(key(), &[terminating]).unwrap();
        let frontend = index.services[&key()].frontend();
        assert_eq!((frontend.backend_count, frontend.draining_count), (1, 0));
        assert_eq!(index.backends_of(&key()).unwrap(), vec![terminating]);
    }

    #[test]
    fn a_backend_shared_by_two_services_stays_until_the_last_one_goes() {
        let mut index = Index::default();
        let other = ServiceKey { port: 5353, ..key() };
        index.plan_upsert(key(), &[backend(1)]).unwrap();
        let second = index.plan_upsert(other, &[backend(1)]).unwrap();
        assert!(!second.iter().any(|w| matches!(w, Write::Backend(..))), "{second:?}");
        let removed = index.plan_remove(&key());
        assert!(
            !removed.iter().any(|w| matches!(w, Write::RemoveBackend(..))),
            "{removed:?}"
        );
        let removed = index.plan_remove(&other);
        assert!(
            removed.iter().any(|w| matches!(w, Write::RemoveBackend(..))),
            "{removed:?}"
        );
        assert_eq!(removed[0], Write::RemoveSlot(service_map_key(&other, 0)));
    }

    #[test]
    fn restore_from_map_contents_gives_back_the_same_plan_state() {
        let mut index = Index::default();
        let writes = index.plan_upsert(key(), &[backend(1), backend(2)]).unwrap();
        let (mut services, mut backends, mut rev_nats) = (Vec::new(), Vec::new(), Vec::new());
        for write in writes {
            match write {
                Write::Slot(k, v) => services.push((k, v)),
                Write::Backend(id, v) => backends.push((id, v)),
                Write::RevNat(id, v) => rev_nats.push((id, v.family())),
                other => panic!("unexpected {other:?}"),
            }
        }
        // A slot and a backend left behind by an interrupted agent.
        services.push((service_map_key(&key(), 7), ServiceValue::default()));
        backends.push((
            99,
            backend_value(
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 99).into(),
                    port: 1,
                    protocol: Protocol::Tcp,
                },
                BackendState::Active,
                false,
            ),
        ));
        let mut restored = Index::restore(services, backends, rev_nats, Limits::default());
        assert!(
            restored
                .plan_upsert(key(), &[backend(1), backend(2)])
                .unwrap()
                .is_empty()
        );
        let cleanup = restored.plan_cleanup();
        assert!(
            cleanup.contains(&Write::RemoveSlot(service_map_key(&key(), 7))),
            "{cleanup:?}"
        );
        assert!(cleanup.contains(&Write::RemoveBackend(99, Family::V4)), "{cleanup:?}");
        assert_eq!(cleanup.len(), 2);
        // New ids never collide with restored ones.
        let added = restored
            .plan_upsert(key(), &[backend(1), backend(2), backend(3)])
            .unwrap();
        let new_id = added
            .iter()
            .find_map(|w| match w {
                Write::Backend(id, _) => Some(*id),
                _ => None,
            })
            .unwrap();
        assert!(new_id > 2 && new_id != 99, "{added:?}");
    }

    #[test]
    fn stable_slots_keeps_survivors_in_place() {
        assert_eq!(stable_slots(&[1, 2, 3, 4], &[1, 3, 4, 5]), vec![1, 5, 3, 4]);
        assert_eq!(stable_slots(&[1, 2, 3, 4], &[1, 4]), vec![1, 4]);
        assert_eq!(stable_slots(&[1, 2, 3], &[2, 3]), vec![3, 2]);
        assert_eq!(stable_slots(&[], &[7, 8]), vec![7, 8]);
        assert_eq!(stable_slots(&[7, 8], &[]), Vec::<BackendId>::new());
    }

    fn key6() -> ServiceKey {
        ServiceKey {
            address: "fd00:96::10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        }
    }

    fn backend6(last: u16) -> Backend {
        Backend::active(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, last), 5353)
    }

    #[test]
    fn map_addresses_keep_network_byte_order_and_read_back() {
        let v6: Ipv6Addr = "fd00:96::1:2".parse().unwrap();
        let words = map_address6(v6);
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x96]);
        assert_eq!(words[3].to_ne_bytes(), [0x00, 0x01, 0x00, 0x02]);
        assert_eq!(words.ip(), IpAddr::V6(v6));
        let v4 = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(map_address(v4).ip(), IpAddr::V4(v4));
    }

    #[test]
    fn an_ipv6_service_is_written_to_the_ipv6_maps_only() {
        let mut index = Index::default();
        let writes = index.plan_upsert(key6(), &[backend6(1), backend6(2)]).unwrap();
        assert_eq!(writes.len(), 6, "{writes:?}");
        for write in &writes {
            let family = match write {
                Write::Backend(_, value) => value.family(),
                Write::RevNat(_, value) => value.family(),
                Write::Slot(key, _) | Write::RemoveSlot(key) => key.family(),
                Write::RemoveRevNat(_, family) | Write::RemoveBackend(_, family) => *family,
            };
            assert_eq!(family, Family::V6, "{write:?}");
        }
        let rev_nat = writes.iter().find_map(|w| match w {
            Write::RevNat(_, ByFamily::V6(value)) => Some(*value),
            _ => None,
        });
        assert_eq!(
            rev_nat.map(|v| (v.address.ip(), u16::from_be(v.port))),
            Some((key6().address, 53))
        );
        assert_eq!(index.backends_of(&key6()).unwrap(), vec![backend6(1), backend6(2)]);
        assert!(
            index
                .plan_upsert(key6(), &[backend6(2), backend6(1)])
                .unwrap()
                .is_empty()
        );

        let removed = index.plan_remove(&key6());
        assert!(removed.contains(&Write::RemoveRevNat(1, Family::V6)), "{removed:?}");
        assert_eq!(
            removed
                .iter()
                .filter(|w| matches!(w, Write::RemoveBackend(_, Family::V6)))
                .count(),
            2
        );
    }

    #[test]
    fn both_families_draw_ids_from_one_space() {
        let mut index = Index::default();
        index.plan_upsert(key(), &[backend(1)]).unwrap();
        index.plan_upsert(key6(), &[backend6(1)]).unwrap();
        let v4 = index.selection_of(&key()).unwrap();
        let v6 = index.selection_of(&key6()).unwrap();
        // AFFINITY and MAGLEV are keyed by these ids in both families.
        assert_ne!(v4.rev_nat_id, v6.rev_nat_id);
        assert_ne!(v4.backends[0].0, v6.backends[0].0);
        assert_eq!(v6.backends[0].1.socket_addr().to_string(), "[fd00:244::1]:5353");
    }

    #[test]
    fn each_family_is_limited_by_its_own_maps() {
        let mut index = Index {
            limits: Limits {
                backends: [4, 1],
                rev_nats: [4, 1],
            },
            ..Index::default()
        };
        index.plan_upsert(key6(), &[backend6(1)]).unwrap();
        let other6 = ServiceKey { port: 54, ..key6() };
        assert_eq!(index.plan_upsert(other6, &[]), Err(IdsExhausted::RevNat6(1)));
        assert_eq!(
            index.plan_upsert(key6(), &[backend6(1), backend6(2)]),
            Err(IdsExhausted::Backend6(1))
        );
        // IPv4 has room of its own.
        index.plan_upsert(key(), &[backend(1), backend(2)]).unwrap();
        index.plan_remove(&key6());
        index.plan_upsert(other6, &[backend6(3)]).unwrap();
    }

    #[test]
    fn restore_sorts_both_families_and_cleans_up_entries_of_the_wrong_family() {
        let mut index = Index::default();
        let mut writes = index.plan_upsert(key(), &[backend(1), backend(2)]).unwrap();
        writes.extend(index.plan_upsert(key6(), &[backend6(1)]).unwrap());
        let (mut services, mut backends, mut rev_nats) = (Vec::new(), Vec::new(), Vec::new());
        for write in writes {
            match write {
                Write::Slot(k, v) => services.push((k, v)),
                Write::Backend(id, v) => backends.push((id, v)),
                Write::RevNat(id, v) => rev_nats.push((id, v.family())),
                other => panic!("unexpected {other:?}"),
            }
        }
        let v4_rev_nat = index.selection_of(&key()).unwrap().rev_nat_id;
        // The IPv4 service's id in REV_NAT6: no IPv6 service owns it.
        rev_nats.push((v4_rev_nat, Family::V6));
        let mut restored = Index::restore(services, backends, rev_nats, Limits::default());
        assert_eq!(restored.services.len(), 2);
        assert!(
            restored
                .plan_upsert(key(), &[backend(1), backend(2)])
                .unwrap()
                .is_empty()
        );
        assert!(restored.plan_upsert(key6(), &[backend6(1)]).unwrap().is_empty());
        assert_eq!(
            restored.plan_cleanup(),
            vec![Write::RemoveRevNat(v4_rev_nat, Family::V6)]
        );
    }
}
