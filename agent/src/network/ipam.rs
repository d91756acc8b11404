//! Pod addresses from the node's podCIDR, persisted so a restarted agent never hands out an
//! address a live pod still holds. Owns `<root>/<cidr>/`; knows nothing of interfaces.
//!
//! Layout, as the CNI `host-local` plugin keeps it: one directory per podCIDR (`/` written
//! as `_`, e.g. `10.244.3.0_24`), one file per allocated address named by the address and
//! holding the owner's pod UID, and `last_reserved_ip` so allocation goes round the range
//! instead of handing a just-released address to the next pod (clients and conntrack may
//! still hold it). A file is written to a temporary name, synced, then hard-linked into
//! place, which fails if the address is taken: an allocation is on disk whole or not at all.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::{Error, Result};

const LAST_RESERVED: &str = "last_reserved_ip";

/// The gateway and pod addresses of a podCIDR: pure address arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRange {
    cidr: IpNet,
    /// The gateway: the first usable address.
    pub gateway: IpAddr,
    /// The first pod address.
    pub first: IpAddr,
    /// The last pod address (the one before the broadcast address in IPv4).
    pub last: IpAddr,
}

impl PodRange {
    /// The range of `cidr` (host bits are ignored: `10.244.3.7/24` is `10.244.3.0/24`).
    pub fn new(cidr: IpNet) -> Result<PodRange> {
        let cidr = cidr.trunc();
        let network = to_u128(cidr.network());
        let (gateway, first, last) = match cidr {
            // .0 is the network and .255 the broadcast address.
            IpNet::V4(net) if net.prefix_len() <= 30 => (network + 1, network + 2, to_u128(cidr.broadcast()) - 1),
            // No broadcast in IPv6; the all-zero address is the subnet-router anycast.
            IpNet::V6(net) if net.prefix_len() <= 126 => (network + 1, network + 2, to_u128(cidr.broadcast())),
            _ => return Err(Error::CidrTooSmall { cidr }),
        };
        let family = cidr.network();
        Ok(PodRange {
            cidr,
            gateway: from_u128(family, gateway),
            first: from_u128(family, first),
            last: from_u128(family, last),
        })
    }

    /// The podCIDR.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// How many pod addresses there are.
    pub fn size(&self) -> u128 {
        to_u128(self.last) - to_u128(self.first) + 1
    }

    /// Whether `ip` is a pod address of this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.first.is_ipv4() && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(ip))
    }

    /// The next pod address not in `used`, going round from the one after `last_reserved`
    /// (from the first when there is none); `None` when all are used.
    pub fn next_free(&self, used: &BTreeMap<IpAddr, String>, last_reserved: Option<IpAddr>) -> Option<IpAddr> {
        let size = self.size();
        let used_here = used.keys().filter(|ip| self.contains(**ip)).count() as u128;
        if used_here >= size {
            return None;
        }
        let first = to_u128(self.first);
        let start = match last_reserved.filter(|ip| self.contains(*ip)) {
            Some(ip) => (to_u128(ip) - first + 1) % size,
            None => 0,
        };
        // Among used_here + 1 consecutive addresses at least one is free: the loop is short
        // even in an IPv6 /64.
        (0..=used_here)
            .map(|step| from_u128(self.first, first + (start + step) % size))
            .find(|ip| !used.contains_key(ip))
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u32::from(ip).into(),
        IpAddr::V6(ip) => ip.into(),
    }
}

/// `value` as an address of `family`'s kind (an IPv4 value always fits: it came from one).
fn from_u128(family: IpAddr, value: u128) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// Checks that `owner` can be stored as one line of an allocation file.
pub(super) fn check_owner(owner: &str) -> Result<()> {
    let reason = if owner.is_empty() {
        "it is empty"
    } else if owner.len() > 253 {
        "it is longer than 253 characters"
    } else if !owner
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        "only letters, digits, '-', '_' and '.' are allowed (Kubernetes UIDs are UUIDs)"
    } else {
        return Ok(());
    };
    Err(Error::InvalidUid {
        uid: owner.to_owned(),
        reason,
    })
}

/// The pod address allocations of one podCIDR, in memory and on disk.
#[derive(Debug)]
pub struct Ipam {
    range: PodRange,
    dir: PathBuf,
    allocated: BTreeMap<IpAddr, String>,
    last_reserved: Option<IpAddr>,
}

impl Ipam {
    /// Opens (creating when missing) the allocations of `cidr` under `root`, e.g.
    /// `<data-dir>/ipam`, and removes temporary files a crash left.
    pub fn open(root: &Path, cidr: IpNet) -> Result<Ipam> {
        let range = PodRange::new(cidr)?;
        let dir = root.join(range.cidr().to_string().replace('/', "_"));
        fs::create_dir_all(&dir).map_err(Error::io("creating the IPAM directory", &dir))?;
        let mut ipam = Ipam {
            range,
            dir,
            allocated: BTreeMap::new(),
            last_reserved: None,
        };
        for entry in fs::read_dir(&ipam.dir).map_err(Error::io("reading the IPAM directory", &ipam.dir))? {
            let entry = entry.map_err(Error::io("reading the IPAM directory", &ipam.dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A temporary file of an allocation that never completed.
                fs::remove_file(&path).map_err(Error::io("removing a stale temporary IPAM file", &path))?;
                continue;
            }
            let read = || fs::read_to_string(&path).map_err(Error::io("reading an IPAM file", &path));
            if name == LAST_RESERVED {
                ipam.last_reserved = read()?.trim().parse().ok();
                continue;
            }
            match name.parse::<IpAddr>() {
                Ok(ip) if range.contains(ip) => {
                    ipam.allocated.insert(ip, read()?.trim().to_owned());
                }
                _ => tracing::warn!(
                    file = %path.display(),
                    cidr = %range.cidr(),
                    "ignoring a file that is no pod address of this podCIDR in the IPAM directory"
                ),
            }
        }
        Ok(ipam)
    }

    /// The podCIDR and its gateway and pod addresses.
    pub fn range(&self) -> &PodRange {
        &self.range
    }

    /// The directory holding the allocation files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address `owner` holds, if any.
    pub fn address_of(&self, owner: &str) -> Option<IpAddr> {
        self.allocated.iter().find(|(_, o)| *o == owner).map(|(ip, _)| *ip)
    }

    /// Every allocation: address and owner, in address order.
    pub fn allocations(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.allocated.iter().map(|(ip, owner)| (*ip, owner.as_str()))
    }

    /// An address for `owner`: the one it already holds (a retried sandbox gets its own
    /// address back), or a free one, on disk before this returns.
    pub fn allocate(&mut self, owner: &str) -> Result<IpAddr> {
        check_owner(owner)?;
        if let Some(ip) = self.address_of(owner) {
            return Ok(ip);
        }
        loop {
            let ip = self
                .range
                .next_free(&self.allocated, self.last_reserved)
                .ok_or(Error::Exhausted {
                    cidr: self.range.cidr(),
                    total: self.range.size(),
                })?;
            match self.claim(ip, owner) {
                Ok(()) => {}
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                    // Another writer took it since we read the directory: learn who, go on.
                    let path = self.dir.join(ip.to_string());
                    let holder = fs::read_to_string(&path).map_err(Error::io("reading an IPAM file", &path))?;
                    self.allocated.insert(ip, holder.trim().to_owned());
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.allocated.insert(ip, owner.to_owned());
            self.last_reserved = Some(ip);
            self.write_atomically(LAST_RESERVED, ip.to_string().as_bytes(), true)?;
            return Ok(ip);
        }
    }

    /// Releases what `owner` holds; returns the addresses freed (none when it held none).
    pub fn release(&mut self, owner: &str) -> Result<Vec<IpAddr>> {
        let held: Vec<IpAddr> = self
            .allocated
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &held {
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing an IPAM file", path)(e)),
            }
            self.allocated.remove(ip);
        }
        if !held.is_empty() {
            self.sync_dir()?;
        }
        Ok(held)
    }

    /// Writes `<dir>/<ip>` holding `owner`; `AlreadyExists` when the file is there.
    fn claim(&self, ip: IpAddr, owner: &str) -> Result<()> {
        self.write_atomically(&ip.to_string(), format!("{owner}\n").as_bytes(), false)
    }

    /// Writes `name` through a synced temporary file: renamed over the old one when
    /// `replace`, hard-linked (failing with `AlreadyExists` if `name` exists) otherwise.
    fn write_atomically(&self, name: &str, content: &[u8], replace: bool) -> Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(Error::io("creating a temporary IPAM file", &tmp))?;
        file.write_all(content)
            .and_then(|()| file.sync_all())
            .map_err(Error::io("writing a temporary IPAM file", &tmp))?;
        let placed = if replace {
            fs::rename(&tmp, &path)
        } else {
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            linked
        };
        placed.map_err(Error::io("placing an IPAM file", &path))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(Error::io("syncing the IPAM directory", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn range_of_a_slash_24_keeps_network_gateway_and_broadcast_out() {
        let range = PodRange::new(net("10.244.3.0/24")).unwrap();
        assert_eq!(range.gateway, ip("10.244.3.1"));
        assert_eq!(range.first, ip("10.244.3.2"));
        assert_eq!(range.last, ip("10.244.3.254"));
        assert_eq!(range.size(), 253);
        assert!(!range.contains(ip("10.244.3.1")));
        assert!(!range.contains(ip("10.244.3.255")));
        assert!(!range.contains(ip("10.244.4.2")));
        assert!(!range.contains(ip("::2")));
    }

    #[test]
    fn range_ignores_host_bits_and_handles_ipv6() {
        let range = PodRange::new(net("10.244.3.77/24")).unwrap();
        assert_eq!(range.cidr(), net("10.244.3.0/24"));
        let v6 = PodRange::new(net("fd00:10:244:3::/64")).unwrap();
        assert_eq!(v6.gateway, ip("fd00:10:244:3::1"));
        assert_eq!(v6.first, ip("fd00:10:244:3::2"));
        assert_eq!(v6.last, ip("fd00:10:244:3:ffff:ffff:ffff:ffff"));
        assert_eq!(v6.size(), (1u128 << 64) - 2);
    }

    #[test]
    fn a_slash_30_has_one_pod_address_and_a_slash_31_is_refused() {
        let range = PodRange::new(net("10.0.0.0/30")).unwrap();
        assert_eq!((range.first, range.last), (ip("10.0.0.2"), ip("10.0.0.2")));
        assert!(matches!(
            PodRange::new(net("10.0.0.0/31")),
            Err(Error::CidrTooSmall { .. })
        ));
        assert!(matches!(
            PodRange::new(net("fd00::/127")),
            Err(Error::CidrTooSmall { .. })
        ));
    }

    #[test]
    fn next_free_goes_round_after_the_last_reserved_address() {
        let range = PodRange::new(net("10.0.0.0/29")).unwrap(); // pods .2 to .6
        let mut used = BTreeMap::new();
        assert_eq!(range.next_free(&used, None), Some(ip("10.0.0.2")));
        assert_eq!(range.next_free(&used, Some(ip("10.0.0.3"))), Some(ip("10.0.0.4")));
        assert_eq!(range.next_free(&used, Some(ip("10.0.0.6"))), Some(ip("10.0.0.2")));
        used.insert(ip("10.0.0.4"), "a".to_owned());
        used.insert(ip("10.0.0.5"), "b".to_owned());
        assert_eq!(range.next_free(&used, Some(ip("10.0.0.3"))), Some(ip("10.0.0.6")));
        used.insert(ip("10.0.0.6"), "c".to_owned());
        assert_eq!(range.next_free(&used, Some(ip("10.0.0.3"))), Some(ip("10.0.0.2")));
        // A last_reserved outside the range (the podCIDR changed) starts from the first.
        assert_eq!(range.next_free(&used, Some(ip("192.0.2.1"))), Some(ip("10.0.0.2")));
        used.insert(ip("10.0.0.2"), "d".to_owned());
        used.insert(ip("10.0.0.3"), "e".to_owned());
        assert_eq!(range.next_free(&used, None), None);
    }

    #[test]
    fn owners_that_cannot_be_stored_are_refused() {
        check_owner("6f1c8a4e-3b0d-4c2a-9e1f-0a1b2c3d4e5f").unwrap();
        for bad in ["", "a\nb", "../x", "a b", &"x".repeat(254)] {
            assert!(matches!(check_owner(bad), Err(Error::InvalidUid { .. })), "{bad:?}");
        }
    }

    #[test]
    fn allocation_is_idempotent_per_owner_and_distinct_between_owners() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), net("10.244.3.0/24")).unwrap();
        let a = ipam.allocate("pod-a").unwrap();
        let b = ipam.allocate("pod-b").unwrap();
        assert_eq!((a, b), (ip("10.244.3.2"), ip("10.244.3.3")));
        assert_eq!(ipam.allocate("pod-a").unwrap(), a);
        assert_eq!(ipam.address_of("pod-b"), Some(b));
        let content = fs::read_to_string(dir.path().join("10.244.3.0_24").join("10.244.3.2")).unwrap();
        assert_eq!(content, "pod-a\n");
    }

    #[test]
    fn allocations_survive_reopening_and_released_addresses_are_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cidr = net("10.244.3.0/24");
        {
            let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
            ipam.allocate("pod-a").unwrap();
            ipam.allocate("pod-b").unwrap();
            assert_eq!(ipam.release("pod-a").unwrap(), vec![ip("10.244.3.2")]);
        }
        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(
            ipam.allocations().collect::<Vec<_>>(),
            vec![(ip("10.244.3.3"), "pod-b")],
            "pod-b's address is live after a restart; pod-a's is free"
        );
        assert_eq!(ipam.allocate("pod-b").unwrap(), ip("10.244.3.3"));
        // Round robin continues after the last reserved address, even after reopening.
        assert_eq!(ipam.allocate("pod-c").unwrap(), ip("10.244.3.4"));
    }

    #[test]
    fn release_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), net("10.244.3.0/24")).unwrap();
        ipam.allocate("pod-a").unwrap();
        assert_eq!(ipam.release("pod-a").unwrap().len(), 1);
        assert!(ipam.release("pod-a").unwrap().is_empty());
        assert!(ipam.release("never-seen").unwrap().is_empty());
        assert!(
            fs::read_dir(ipam.dir())
                .unwrap()
                .all(|e| e.unwrap().file_name() == LAST_RESERVED)
        );
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_a_release_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), net("10.0.0.0/29")).unwrap();
        for n in 0..5 {
            ipam.allocate(&format!("pod-{n}")).unwrap();
        }
        let err = ipam.allocate("pod-5").unwrap_err();
        assert!(matches!(err, Error::Exhausted { total: 5, .. }), "{err:?}");
        assert!(err.to_string().contains("10.0.0.0/29 has no free pod address"), "{err}");
        ipam.release("pod-2").unwrap();
        assert_eq!(ipam.allocate("pod-5").unwrap(), ip("10.0.0.4"));
    }

    #[test]
    fn an_address_another_writer_took_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), net("10.244.3.0/24")).unwrap();
        fs::write(ipam.dir().join("10.244.3.2"), "someone-else\n").unwrap();
        assert_eq!(ipam.allocate("pod-a").unwrap(), ip("10.244.3.3"));
        assert_eq!(
            ipam.allocations().collect::<Vec<_>>(),
            vec![(ip("10.244.3.2"), "someone-else"), (ip("10.244.3.3"), "pod-a")]
        );
    }

    #[test]
    fn reopening_removes_temporary_files_and_ignores_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let cidr = net("10.244.3.0/24");
        let sub = Ipam::open(dir.path(), cidr).unwrap().dir().to_owned();
        fs::write(sub.join(".10.244.3.2.123.tmp"), "half").unwrap();
        fs::write(sub.join("10.244.9.9"), "elsewhere\n").unwrap();
        fs::write(sub.join("README"), "hello").unwrap();
        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert!(!sub.join(".10.244.3.2.123.tmp").exists());
        assert_eq!(ipam.allocations().count(), 0);
        assert_eq!(ipam.allocate("pod-a").unwrap(), ip("10.244.3.2"));
    }
}
