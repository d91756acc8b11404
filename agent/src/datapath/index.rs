//! The agent's mirror of the service maps, and the planning of writes: from what the maps
//! hold and what a service should become, the few writes that get there, ordered so a
//! program never follows a slot to a backend that is not there. Pure; the I/O is in mod.rs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use weir_ebpf_common::{
    BACKEND_FLAG_REMOTE, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, BACKENDS4_MAX_ENTRIES, Backend4Value,
    REV_NAT4_MAX_ENTRIES, RevNat4Value, SCOPE_EXTERNAL, Service4Key, Service4Value,
};

use super::model::{Backend, BackendState, Protocol, ServiceKey};

pub(crate) type BackendId = u32;
pub(crate) type RevNatId = u32;

/// One map operation, in the order it must be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    Backend(BackendId, Backend4Value),
    RevNat(RevNatId, RevNat4Value),
    Slot(Service4Key, Service4Value),
    RemoveSlot(Service4Key),
    RemoveRevNat(RevNatId),
    RemoveBackend(BackendId),
}

/// A service's frontend flags, affinity timeout, reverse-NAT id and selectable backends
/// (in slot order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Selection {
    pub(crate) flags: u8,
    pub(crate) affinity_timeout: u32,
    pub(crate) rev_nat_id: RevNatId,
    pub(crate) backends: Vec<(BackendId, Backend4Value)>,
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
    fn frontend(&self) -> Service4Value {
        Service4Value {
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
    address: Ipv4Addr,
    port: u16,
    protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdsExhausted {
    #[error("the backend map is full ({0} backends); raise datapath::Capacity::backends")]
    Backend(usize),
    #[error("the reverse-NAT map is full ({0} service frontends); raise datapath::Capacity::services")]
    RevNat(usize),
}

/// How many backends and service frontends the maps hold: ids are handed out below these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) backends: usize,
    pub(crate) rev_nats: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            backends: BACKENDS4_MAX_ENTRIES as usize,
            rev_nats: REV_NAT4_MAX_ENTRIES as usize,
        }
    }
}

/// What the maps hold, in the agent's terms, plus the entries found on restore that
/// belong to nothing (left by an agent that stopped half-way); `cleanup` removes those.
#[derive(Debug, Default)]
pub(crate) struct Index {
    services: HashMap<ServiceKey, ServiceEntry>,
    backends: HashMap<BackendId, Backend4Value>,
    backend_ids: HashMap<BackendAddr, BackendId>,
    refs: HashMap<BackendId, usize>,
    rev_nat_ids: BTreeSet<RevNatId>,
    next_backend_id: BackendId,
    next_rev_nat_id: RevNatId,
    stray_slots: Vec<Service4Key>,
    stray_rev_nats: Vec<RevNatId>,
    limits: Limits,
}

pub(crate) fn map_address(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

pub(crate) fn map_port(port: u16) -> u16 {
    port.to_be()
}

fn service_map_key(key: &ServiceKey, slot: usize) -> Service4Key {
    Service4Key {
        address: map_address(key.address),
        port: map_port(key.port),
        slot: slot as u16,
        proto: key.protocol.number(),
        scope: SCOPE_EXTERNAL,
        pad: [0; 2],
    }
}

fn backend_value(addr: BackendAddr, state: BackendState, remote: bool) -> Backend4Value {
    Backend4Value {
        flags: if remote { BACKEND_FLAG_REMOTE } else { 0 },
        pad: [0; 3],
        address: map_address(addr.address),
        port: map_port(addr.port),
        proto: addr.protocol.number(),
        state: match state {
            BackendState::Active => BACKEND_STATE_ACTIVE,
            BackendState::Terminating => BACKEND_STATE_TERMINATING,
        },
    }
}

fn backend_addr(value: &Backend4Value) -> Option<BackendAddr> {
    Some(BackendAddr {
        address: Ipv4Addr::from(value.address.to_ne_bytes()),
        port: u16::from_be(value.port),
        protocol: Protocol::from_number(value.proto)?,
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
    /// Rebuilds the mirror from the contents of the three maps.
    pub(crate) fn restore(
        services: impl IntoIterator<Item = (Service4Key, Service4Value)>,
        backends: impl IntoIterator<Item = (BackendId, Backend4Value)>,
        rev_nats: impl IntoIterator<Item = (RevNatId, RevNat4Value)>,
        limits: Limits,
    ) -> Index {
        let mut index = Index {
            limits,
            ..Index::default()
        };
        let mut frontends = Vec::new();
        let mut slots: HashMap<Service4Key, BTreeMap<u16, BackendId>> = HashMap::new();
        for (key, value) in services {
            if key.slot == 0 {
                frontends.push((key, value));
            } else {
                let frontend = Service4Key { slot: 0, ..key };
                slots.entry(frontend).or_default().insert(key.slot, value.backend_id);
            }
        }
        for (id, value) in backends {
            match backend_addr(&value) {
                Some(addr) if !index.backend_ids.contains_key(&addr) => {
                    index.backend_ids.insert(addr, id);
                    index.backends.insert(id, value);
                }
                // Unknown protocol or a duplicate: unreferenced, so cleanup removes it.
                _ => {
                    index.backends.insert(id, value);
                }
            }
            index.next_backend_id = index.next_backend_id.max(id.wrapping_add(1));
        }
        for (key, value) in frontends {
            let Some(protocol) = Protocol::from_number(key.proto) else {
                index.stray_slots.push(key);
                continue;
            };
            let service = ServiceKey {
                address: Ipv4Addr::from(key.address.to_ne_bytes()),
                port: u16::from_be(key.port),
                protocol,
            };
            let total = usize::from(value.backend_count) + usize::from(value.draining_count);
            let mut held = slots.remove(&key).unwrap_or_default();
            let entry = ServiceEntry {
                rev_nat_id: value.rev_nat_id,
                slots: (1..=total)
                    .map(|slot| {
                        held.remove(&(slot as u16))
                            .filter(|id| index.backends.contains_key(id))
                            .unwrap_or(0)
                    })
                    .collect(),
                selectable: usize::from(value.backend_count),
                flags: value.flags,
                affinity_timeout: value.affinity_timeout,
            };
            index
                .stray_slots
                .extend(held.into_keys().map(|slot| Service4Key { slot, ..key }));
            for id in entry.slots.iter().filter(|id| **id != 0) {
                *index.refs.entry(*id).or_default() += 1;
            }
            index.rev_nat_ids.insert(entry.rev_nat_id);
            index.services.insert(service, entry);
        }
        for (frontend, held) in slots {
            index
                .stray_slots
                .extend(held.into_keys().map(|slot| Service4Key { slot, ..frontend }));
        }
        for (id, _) in rev_nats {
            if !index.rev_nat_ids.contains(&id) {
                index.stray_rev_nats.push(id);
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
                    let value = self.backends.get(id)?;
                    let addr = backend_addr(value)?;
                    Some(Backend {
                        address: addr.address,
                        port: addr.port,
                        state: if value.state == BACKEND_STATE_TERMINATING {
                            BackendState::Terminating
                        } else {
                            BackendState::Active
                        },
                        remote: value.flags & BACKEND_FLAG_REMOTE != 0,
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
    /// a sessionAffinity timeout in seconds (0: none).
    pub(crate) fn plan_upsert_flagged(
        &mut self,
        key: ServiceKey,
        backends: &[Backend],
        flags: u8,
        affinity_timeout: u32,
    ) -> Result<Vec<Write>, IdsExhausted> {
        let mut wanted: BTreeMap<(Ipv4Addr, u16), (BackendState, bool)> = BTreeMap::new();
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
                let id = self.allocate_rev_nat_id()?;
                writes.push(Write::RevNat(
                    id,
                    RevNat4Value {
                        address: map_address(key.address),
                        port: map_port(key.port),
                        pad: [0; 2],
                    },
                ));
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
                    Service4Value {
                        backend_id: *id,
                        ..Service4Value::default()
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
        self.services.insert(key, new);
        self.release(&old_ids, &mut writes);
        Ok(writes)
    }

    /// The writes that remove `key`: the frontend first, so programs stop at once.
    pub(crate) fn plan_remove(&mut self, key: &ServiceKey) -> Vec<Write> {
        let Some(entry) = self.services.remove(key) else {
            return Vec::new();
        };
        let mut writes = vec![Write::RemoveSlot(service_map_key(key, 0))];
        writes.extend((1..=entry.slots.len()).map(|slot| Write::RemoveSlot(service_map_key(key, slot))));
        writes.push(Write::RemoveRevNat(entry.rev_nat_id));
        self.rev_nat_ids.remove(&entry.rev_nat_id);
        self.release(&entry.slots, &mut writes);
        writes
    }

    /// Removes what restore found belonging to nothing.
    pub(crate) fn plan_cleanup(&mut self) -> Vec<Write> {
        let mut writes: Vec<Write> = self.stray_slots.drain(..).map(Write::RemoveSlot).collect();
        writes.extend(self.stray_rev_nats.drain(..).map(Write::RemoveRevNat));
        let orphans: Vec<BackendId> = self
            .backends
            .keys()
            .filter(|id| self.refs.get(id).copied().unwrap_or(0) == 0)
            .copied()
            .collect();
        for id in orphans {
            self.forget_backend(id);
            writes.push(Write::RemoveBackend(id));
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
                let id = self.allocate_backend_id()?;
                self.backend_ids.insert(addr, id);
                id
            }
        };
        if self.backends.get(&id) != Some(&value) {
            self.backends.insert(id, value);
            writes.push(Write::Backend(id, value));
        }
        Ok(id)
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
            if *count == 0 {
                self.forget_backend(*id);
                writes.push(Write::RemoveBackend(*id));
            }
        }
    }

    fn forget_backend(&mut self, id: BackendId) {
        self.refs.remove(&id);
        if let Some(value) = self.backends.remove(&id)
            && let Some(addr) = backend_addr(&value)
            && self.backend_ids.get(&addr) == Some(&id)
        {
            self.backend_ids.remove(&addr);
        }
    }

    fn allocate_backend_id(&mut self) -> Result<BackendId, IdsExhausted> {
        if self.backends.len() >= self.limits.backends {
            return Err(IdsExhausted::Backend(self.limits.backends));
        }
        loop {
            let id = self.next_backend_id.max(1);
            self.next_backend_id = id.wrapping_add(1);
            if !self.backends.contains_key(&id) {
                return Ok(id);
            }
        }
    }

    fn allocate_rev_nat_id(&mut self) -> Result<RevNatId, IdsExhausted> {
        if self.rev_nat_ids.len() >= self.limits.rev_nats {
            return Err(IdsExhausted::RevNat(self.limits.rev_nats));
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
            address: Ipv4Addr::new(10, 96, 0, 10),
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
                Write::Slot(k, v) if k.slot > 0 => Some((k.slot, v.backend_id)),
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
        let slot_at = position(&|w| matches!(w, Write::Slot(k, _) if k.slot == 1));
        let frontend_at = position(&|w| matches!(w, Write::Slot(k, _) if k.slot == 0));
        assert!(backend_at < slot_at && slot_at < frontend_at, "{writes:?}");
    }

    #[test]
    fn removing_a_middle_backend_moves_only_the_last_slot_and_narrows_first() {
        let mut index = Index::default();
        index.plan_upsert(key(), &[backend(1), backend(2), backend(3)]).unwrap();
        let ids = index.services[&key()].slots.clone();
        let writes = index.plan_upsert(key(), &[backend(1), backend(3)]).unwrap();
        assert!(
            matches!(&writes[0], Write::Slot(k, v) if k.slot == 0 && v.backend_count == 2),
            "{writes:?}"
        );
        assert_eq!(slot_writes(&writes), vec![(2, ids[2])]);
        assert!(matches!(&writes[writes.len() - 2], Write::RemoveSlot(k) if k.slot == 3));
        assert_eq!(writes.last(), Some(&Write::RemoveBackend(ids[1])));
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
            !removed.iter().any(|w| matches!(w, Write::RemoveBackend(_))),
            "{removed:?}"
        );
        let removed = index.plan_remove(&other);
        assert!(
            removed.iter().any(|w| matches!(w, Write::RemoveBackend(_))),
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
                Write::RevNat(id, v) => rev_nats.push((id, v)),
                other => panic!("unexpected {other:?}"),
            }
        }
        // A slot and a backend left behind by an interrupted agent.
        services.push((service_map_key(&key(), 7), Service4Value::default()));
        backends.push((
            99,
            backend_value(
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 99),
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
        assert!(cleanup.contains(&Write::RemoveBackend(99)), "{cleanup:?}");
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
}
