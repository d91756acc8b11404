//! Garbage collection of the NodePort/LoadBalancer conntrack map: the kernel programs only
//! refresh `last_seen_ns`; entries of finished flows are removed here, by the agent, either
//! on demand ([`Datapath::sweep_conntrack`]) or by a [`ConntrackSweeper`] thread.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use tracing::{info, warn};
use weir_ebpf_common::{CT4, Ct4Key, Ct4Value};

use super::external::{ConntrackTimeouts, expired, monotonic_ns};
use super::{Datapath, Error, ignore_missing, open_lru_map};

pub(crate) type ConntrackMap = BpfHashMap<MapData, Ct4Key, Ct4Value>;

/// Every entry of the conntrack map. Entries removed while the map is walked are skipped.
pub(crate) fn entries(map: &ConntrackMap) -> Result<Vec<(Ct4Key, Ct4Value)>, Error> {
    map.iter()
        .filter(|entry| !matches!(entry, Err(MapError::KeyNotFound)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Map { name: CT4, source })
}

/// Removes the entries idle longer than `timeouts` (a flow's two directions together).
/// Returns how many went.
pub(crate) fn sweep(map: &mut ConntrackMap, timeouts: &ConntrackTimeouts) -> Result<usize, Error> {
    let entries: HashMap<Ct4Key, Ct4Value> = entries(map)?.into_iter().collect();
    let dead = expired(&entries, monotonic_ns(), timeouts);
    for key in &dead {
        ignore_missing(map.remove(key)).map_err(|source| Error::Map { name: CT4, source })?;
    }
    if !dead.is_empty() {
        info!(
            removed = dead.len(),
            remaining = entries.len() - dead.len(),
            "datapath: conntrack sweep"
        );
    }
    Ok(dead.len())
}

/// A thread sweeping the conntrack map every `interval` through its own handle on the
/// pinned map, so the [`Datapath`] stays free for map updates. Stops (and joins) when
/// dropped; the map and the flows in it stay.
pub struct ConntrackSweeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConntrackSweeper {
    fn start(pin_dir: &Path, timeouts: ConntrackTimeouts, interval: Duration) -> Result<ConntrackSweeper, Error> {
        let mut map: ConntrackMap = open_lru_map(pin_dir, CT4)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        // Short naps so a drop never waits a whole interval.
        let nap = interval.min(Duration::from_millis(100));
        let thread = std::thread::Builder::new()
            .name("weir-ct-gc".to_owned())
            .spawn(move || {
                let mut slept = Duration::ZERO;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(nap);
                    slept += nap;
                    if slept < interval {
                        continue;
                    }
                    slept = Duration::ZERO;
                    if let Err(error) = sweep(&mut map, &timeouts) {
                        warn!(%error, "datapath: conntrack sweep failed; retrying next interval");
                    }
                }
            })
            .map_err(|source| Error::Io {
                what: "starting the conntrack sweeper thread",
                path: pin_dir.join(CT4),
                source,
            })?;
        Ok(ConntrackSweeper {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ConntrackSweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Datapath {
    /// Starts sweeping idle conntrack entries every `interval` in a thread of its own (the
    /// agent runs one for its lifetime; Cilium sweeps about every 5 minutes or sooner
    /// under pressure).
    pub fn spawn_conntrack_sweeper(
        &self,
        timeouts: ConntrackTimeouts,
        interval: Duration,
    ) -> Result<ConntrackSweeper, Error> {
        ConntrackSweeper::start(&self.pin_dir, timeouts, interval)
    }
}
