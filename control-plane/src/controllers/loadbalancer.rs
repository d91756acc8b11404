//! LoadBalancer addresses: Services of type LoadBalancer (without a loadBalancerClass) get an
//! address from `--load-balancer-pool` in status.loadBalancer.ingress, like MetalLB's allocator.
//! Writes only Service status and Events; the allocation table is rebuilt from Service statuses.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::events::{EventType, Recorder};
use super::{Pass, Result, is_status, run_passes};

/// Annotation listing the addresses a Service asks for (comma-separated, e.g. one per family).
pub const REQUESTED_IPS: &str = "weir.dev/load-balancer-ips";
const COMPONENT: &str = "loadbalancer-controller";

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(n: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(n.into())
    } else {
        IpAddr::V4((n as u32).into())
    }
}

/// The addresses LoadBalancer Services may get: inclusive ranges, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    ranges: Vec<(IpAddr, IpAddr)>,
    text: String,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pool {
    /// `192.0.2.0/28,198.51.100.10-198.51.100.20,2001:db8::/120,203.0.113.7`: CIDRs (every
    /// address in them), inclusive ranges and single addresses, IPv4 and IPv6.
    pub fn parse(s: &str) -> Result<Pool, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let range = if part.contains('/') {
                let net: ipnet::IpNet = part
                    .parse()
                    .map_err(|e| format!("{part:?} is not a CIDR like 192.0.2.0/28: {e}"))?;
                if net.addr() != net.network() {
                    return Err(format!(
                        "{part:?} has host bits set: did you mean {}/{}?",
                        net.network(),
                        net.prefix_len()
                    ));
                }
                (net.network(), net.broadcast())
            } else if let Some((a, b)) = part.split_once('-') {
                let parse = |x: &str| {
                    x.trim()
                        .parse::<IpAddr>()
                        .map_err(|_| format!("{part:?}: {:?} is not an IP address", x.trim()))
                };
                let (a, b) = (parse(a)?, parse(b)?);
                if a.is_ipv4() != b.is_ipv4() {
                    return Err(format!("{part:?} mixes IPv4 and IPv6"));
                }
                if to_u128(a) > to_u128(b) {
                    return Err(format!("{part:?} ends before it starts"));
                }
                (a, b)
            } else {
                let ip: IpAddr = part.parse().map_err(|_| {
                    format!("{part:?} is not a CIDR (192.0.2.0/28), a range (192.0.2.10-192.0.2.20) or an address")
                })?;
                (ip, ip)
            };
            ranges.push(range);
        }
        if ranges.is_empty() {
            return Err("the load-balancer pool is empty: give CIDRs or ranges such as 192.0.2.0/28".into());
        }
        Ok(Pool {
            ranges,
            text: s.trim().to_string(),
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges
            .iter()
            .any(|(a, b)| a.is_ipv4() == ip.is_ipv4() && (to_u128(*a)..=to_u128(*b)).contains(&to_u128(ip)))
    }

    /// The first address of the family not in `taken`; steps over taken addresses only, so an
    /// IPv6 /64 costs no more than a /30.
    pub fn first_free(&self, v6: bool, taken: &HashSet<IpAddr>) -> Option<IpAddr> {
        for (a, b) in self.ranges.iter().filter(|(a, _)| a.is_ipv6() == v6) {
            let mut n = to_u128(*a);
            let end = to_u128(*b);
            loop {
                let ip = from_u128(n, v6);
                if !taken.contains(&ip) {
                    return Some(ip);
                }
                if n == end {
                    break;
                }
                n += 1;
            }
        }
        None
    }
}

/// What the allocator sees of one Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// namespace/name
    pub key: String,
    pub created: Option<jiff::Timestamp>,
    /// Type LoadBalancer without a loadBalancerClass.
    pub managed: bool,
    /// Type LoadBalancer with another loadBalancerClass: someone else's, left alone.
    pub foreign: bool,
    /// spec.loadBalancerIP or the annotation; an unparseable address is an error message.
    pub requested: Result<Vec<IpAddr>, String>,
    /// One address per family (`true` = IPv6), from spec.ipFamilies.
    pub families: Vec<bool>,
    /// The addresses status.loadBalancer.ingress holds.
    pub holds: Vec<IpAddr>,
}

impl Claim {
    pub fn of(svc: &Service) -> Claim {
        let spec = svc.spec.clone().unwrap_or_default();
        let lb = spec.type_.as_deref() == Some("LoadBalancer");
        let requested_text: Vec<String> = match (
            svc.annotations().get(REQUESTED_IPS),
            spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()),
        ) {
            (Some(list), _) => list
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            (None, Some(ip)) => vec![ip.to_string()],
            (None, None) => vec![],
        };
        let requested = requested_text
            .iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| format!("requested address {s:?} is not an IP address"))
            })
            .collect();
        let families = match spec.ip_families.as_deref() {
            Some(f) if !f.is_empty() => f.iter().map(|f| f == "IPv6").collect(),
            _ => vec![false],
        };
        let holds = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref().and_then(|ip| ip.parse().ok()))
            .collect();
        Claim {
            key: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            managed: lb && spec.load_balancer_class.is_none(),
            foreign: lb && spec.load_balancer_class.is_some(),
            requested,
            families,
            holds,
        }
    }
}

/// The allocator's answer for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What status.loadBalancer.ingress should hold (empty: pending, or not a LoadBalancer).
    pub ips: Vec<IpAddr>,
    /// Why a LoadBalancer Service has no address.
    pub failure: Option<String>,
}

/// The whole table, decided from scratch over every Service: addresses already held stay with
/// their holder (older Services first when two claim one), then the others are served oldest
/// first, the requested address when it is free and in the pool, else the first free one per
/// family. Deterministic, so a restart or a stale cache gives the same answer.
pub fn allocate(pool: Option<&Pool>, claims: &[Claim]) -> HashMap<String, Decision> {
    let mut order: Vec<&Claim> = claims.iter().collect();
    order.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    let mut taken: HashSet<IpAddr> = HashSet::new();
    let mut holder: HashMap<IpAddr, &str> = HashMap::new();
    let mut out = HashMap::new();
    // Someone else's addresses are not ours to give.
    for c in order.iter().filter(|c| c.foreign) {
        for ip in &c.holds {
            taken.insert(*ip);
            holder.entry(*ip).or_insert(&c.key);
        }
    }
    let mut unserved = Vec::new();
    for c in order.iter().filter(|c| c.managed) {
        let valid = !c.holds.is_empty()
            && pool.is_some_and(|p| c.holds.iter().all(|ip| p.contains(*ip)))
            && c.holds.iter().all(|ip| !taken.contains(ip))
            && c.holds.iter().collect::<BTreeSet<_>>().len() == c.holds.len()
            && match &c.requested {
                Ok(r) if !r.is_empty() => r.iter().collect::<BTreeSet<_>>() == c.holds.iter().collect(),
                Ok(_) => true,
                Err(_) => false,
            };
        if valid {
            for ip in &c.holds {
                taken.insert(*ip);
                holder.insert(*ip, &c.key);
            }
            out.insert(
                c.key.clone(),
                Decision {
                    ips: c.holds.clone(),
                    failure: None,
                },
            );
        } else {
            unserved.push(*c);
        }
    }
    for c in unserved {
        let result: Result<Vec<IpAddr>, String> = match (pool, &c.requested) {
            (None, _) => Err("no load-balancer address pool is configured: start weir server with \
                 --load-balancer-pool (CIDRs or ranges, e.g. --load-balancer-pool 192.0.2.0/28)"
                .into()),
            (Some(_), Err(e)) => Err(e.clone()),
            (Some(p), Ok(requested)) if !requested.is_empty() => requested
                .iter()
                .map(|ip| {
                    if !p.contains(*ip) {
                        Err(format!("requested address {ip} is not in the load-balancer pool {p}"))
                    } else if let Some(other) = holder.get(ip) {
                        Err(format!("requested address {ip} is already assigned to {other}"))
                    } else {
                        Ok(*ip)
                    }
                })
                .collect(),
            (Some(p), Ok(_)) => {
                let mut got = Vec::new();
                let mut scratch = taken.clone();
                for v6 in &c.families {
                    match p.first_free(*v6, &scratch) {
                        Some(ip) => {
                            scratch.insert(ip);
                            got.push(ip);
                        }
                        None => break,
                    }
                }
                if got.len() != c.families.len() {
                    let v6 = c.families[got.len()];
                    let family = if v6 { "IPv6" } else { "IPv4" };
                    Err(format!("no available {family} address in the load-balancer pool {p}"))
                } else {
                    Ok(got)
                }
            }
        };
        let decision = match result {
            Ok(ips) => {
                for ip in &ips {
                    taken.insert(*ip);
                    holder.insert(*ip, &c.key);
                }
                Decision { ips, failure: None }
            }
            Err(message) => Decision {
                ips: vec![],
                failure: Some(message),
            },
        };
        out.insert(c.key.clone(), decision);
    }
    // Not (or no longer) a LoadBalancer: whatever it holds from the pool goes back.
    for c in claims
        .iter()
        .filter(|c| !c.managed && !c.foreign && !c.holds.is_empty())
    {
        out.insert(
            c.key.clone(),
            Decision {
                ips: vec![],
                failure: None,
            },
        );
    }
    out
}

struct Allocator {
    client: Client,
    recorder: Recorder,
    pool: Option<Pool>,
    services: Store<Service>,
    /// Statuses written but perhaps not yet in the cache, by uid: they count as held.
    written: HashMap<String, Vec<IpAddr>>,
    /// The failure last reported per uid, so a pending Service gets one Event per cause.
    reported: HashMap<String, String>,
}

impl Pass for Allocator {
    async fn pass(&mut self) -> Result<()> {
        let services = self.services.state();
        let mut claims = Vec::with_capacity(services.len());
        let live: HashSet<String> = services.iter().filter_map(|s| s.uid()).collect();
        self.written.retain(|uid, _| live.contains(uid));
        self.reported.retain(|uid, _| live.contains(uid));
        for svc in &services {
            let mut claim = Claim::of(svc);
            let uid = svc.uid().unwrap_or_default();
            if let Some(ips) = self.written.get(&uid) {
                if *ips == claim.holds {
                    self.written.remove(&uid);
                } else {
                    claim.holds = ips.clone();
                }
            }
            claims.push((svc, uid, claim));
        }
        let plain: Vec<Claim> = claims.iter().map(|(_, _, c)| c.clone()).collect();
        let decisions = allocate(self.pool.as_ref(), &plain);
        for (svc, uid, claim) in claims {
            let Some(decision) = decisions.get(&claim.key) else {
                continue;
            };
            if decision.ips != claim.holds {
                let ns = svc.namespace().unwrap_or_default();
                let name = svc.name_any();
                let ingress: Vec<_> = decision
                    .ips
                    .iter()
                    .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
                    .collect();
                let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
                let api: Api<Service> = Api::namespaced(self.client.clone(), &ns);
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => continue,
                    Err(e) => return Err(e.into()),
                }
                self.written.insert(uid.clone(), decision.ips.clone());
                let list: Vec<String> = decision.ips.iter().map(IpAddr::to_string).collect();
                if decision.ips.is_empty() {
                    tracing::info!(namespace = %ns, service = %name, released = ?claim.holds, "released load-balancer addresses");
                } else {
                    tracing::info!(namespace = %ns, service = %name, ips = ?list, "assigned load-balancer addresses");
                    let message = format!("Assigned IP [\"{}\"]", list.join("\",\""));
                    self.recorder
                        .publish(svc.as_ref(), EventType::Normal, "IPAllocated", &message)
                        .await;
                }
            }
            match &decision.failure {
                Some(message) if self.reported.get(&uid) != Some(message) => {
                    tracing::info!(service = %claim.key, reason = %message, "no load-balancer address");
                    self.recorder
                        .publish(svc.as_ref(), EventType::Warning, "AllocationFailed", message)
                        .await;
                    self.reported.insert(uid, message.clone());
                }
                Some(_) => {}
                None => {
                    self.reported.remove(&uid);
                }
            }
        }
        Ok(())
    }
}

pub async fn run(client: Client, pool: Option<Pool>) -> Result<()> {
    let recorder = Recorder::new(client.clone(), COMPONENT);
    let api = Api::<Service>::all(client.clone());
    run_passes(
        "the load-balancer controller's watch",
        api,
        Duration::from_secs(30),
        |services| Allocator {
            recorder,
            client,
            pool,
            services,
            written: HashMap::new(),
            reported: HashMap::new(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn claim(key: &str, created: &str) -> Claim {
        Claim {
            key: key.into(),
            created: Some(created.parse().unwrap()),
            managed: true,
            foreign: false,
            requested: Ok(vec![]),
            families: vec![false],
            holds: vec![],
        }
    }

    fn ips(decisions: &HashMap<String, Decision>, key: &str) -> Vec<String> {
        decisions[key].ips.iter().map(IpAddr::to_string).collect()
    }

    #[test]
    fn claims_read_requests_classes_and_held_addresses() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {REQUESTED_IPS: "192.0.2.1, 2001:db8::1"}},
            "spec": {"type": "LoadBalancer", "loadBalancerIP": "192.0.2.9", "ipFamilies": ["IPv4", "IPv6"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"hostname": "lb.example"}]}},
        }))
        .unwrap();
        let c = Claim::of(&svc);
        assert_eq!(c.key, "shop/web");
        assert!(c.managed && !c.foreign);
        // The annotation wins over the deprecated spec.loadBalancerIP.
        assert_eq!(c.requested, Ok(vec![ip("192.0.2.1"), ip("2001:db8::1")]));
        assert_eq!(c.families, [false, true]);
        assert_eq!(c.holds, [ip("192.0.2.1")]);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "other", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/lb", "loadBalancerIP": "x"},
        }))
        .unwrap();
        let c = Claim::of(&svc);
        assert!(!c.managed && c.foreign);
        assert!(c.requested.is_err());
        assert_eq!(c.families, [false]);
    }

    #[test]
    fn pools_parse_cidrs_ranges_and_addresses() {
        let p = Pool::parse("192.0.2.0/30, 198.51.100.10-198.51.100.11,203.0.113.7,2001:db8::/126").unwrap();
        assert!(p.contains(ip("192.0.2.0")) && p.contains(ip("192.0.2.3")) && !p.contains(ip("192.0.2.4")));
        assert!(p.contains(ip("198.51.100.11")) && !p.contains(ip("198.51.100.12")));
        assert!(p.contains(ip("203.0.113.7")) && p.contains(ip("2001:db8::3")));
        assert!(!p.contains(ip("::ffff:192.0.2.1")), "families do not mix");
        for bad in [
            "",
            "192.0.2.0/33",
            "192.0.2.1/30",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-2001:db8::1",
            "banana",
            "10.0.0.1-x",
        ] {
            let e = Pool::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(Pool::parse("192.0.2.1/30").unwrap_err().contains("192.0.2.0/30"));
    }

    #[test]
    fn first_free_skips_taken_addresses_even_in_huge_ranges() {
        let p = Pool::parse("2001:db8::/64,192.0.2.0/31").unwrap();
        let taken: HashSet<IpAddr> = [ip("2001:db8::"), ip("2001:db8::1"), ip("192.0.2.0")].into();
        assert_eq!(p.first_free(true, &taken), Some(ip("2001:db8::2")));
        assert_eq!(p.first_free(false, &taken), Some(ip("192.0.2.1")));
        let all: HashSet<IpAddr> = [ip("192.0.2.0"), ip("192.0.2.1")].into();
        assert_eq!(p.first_free(false, &all), None);
    }

    #[test]
    fn services_get_addresses_oldest_first_and_the_rest_wait() {
        let p = Pool::parse("192.0.2.0/31").unwrap();
        let claims = [
            claim("default/c", "2026-01-01T00:00:03Z"),
            claim("default/a", "2026-01-01T00:00:01Z"),
            claim("default/b", "2026-01-01T00:00:02Z"),
        ];
        let d = allocate(Some(&p), &claims);
        assert_eq!(ips(&d, "default/a"), ["192.0.2.0"]);
        assert_eq!(ips(&d, "default/b"), ["192.0.2.1"]);
        assert!(d["default/c"].ips.is_empty());
        assert!(
            d["default/c"]
                .failure
                .as_deref()
                .unwrap()
                .contains("no available IPv4 address")
        );
        // a is deleted: c gets its address, b keeps its own.
        let mut claims = claims.to_vec();
        claims.retain(|c| c.key != "default/a");
        claims.iter_mut().find(|c| c.key == "default/b").unwrap().holds = vec![ip("192.0.2.1")];
        let d = allocate(Some(&p), &claims);
        assert_eq!(ips(&d, "default/c"), ["192.0.2.0"]);
        assert_eq!(ips(&d, "default/b"), ["192.0.2.1"]);
    }

    #[test]
    fn held_addresses_survive_a_rebuild_and_a_duplicate_goes_to_the_older() {
        let p = Pool::parse("192.0.2.0/30").unwrap();
        // As read back after a restart: the younger one holds the lower address.
        let mut old = claim("default/old", "2026-01-01T00:00:01Z");
        old.holds = vec![ip("192.0.2.2")];
        let mut young = claim("default/young", "2026-01-01T00:00:02Z");
        young.holds = vec![ip("192.0.2.0")];
        let mut dup = claim("default/dup", "2026-01-01T00:00:03Z");
        dup.holds = vec![ip("192.0.2.2")];
        let d = allocate(Some(&p), &[young, old, dup]);
        assert_eq!(ips(&d, "default/old"), ["192.0.2.2"]);
        assert_eq!(ips(&d, "default/young"), ["192.0.2.0"]);
        assert_eq!(ips(&d, "default/dup"), ["192.0.2.1"]);
    }

    #[test]
    fn requested_addresses_are_honoured_only_when_free_and_in_the_pool() {
        let p = Pool::parse("192.0.2.0/29").unwrap();
        let mut first = claim("default/first", "2026-01-01T00:00:01Z");
        first.requested = Ok(vec![ip("192.0.2.5")]);
        let mut second = claim("default/second", "2026-01-01T00:00:02Z");
        second.requested = Ok(vec![ip("192.0.2.5")]);
        let mut outside = claim("default/outside", "2026-01-01T00:00:03Z");
        outside.requested = Ok(vec![ip("10.0.0.1")]);
        let mut garbage = claim("default/garbage", "2026-01-01T00:00:04Z");
        garbage.requested = Err("requested address \"x\" is not an IP address".into());
        let d = allocate(Some(&p), &[second, first, outside, garbage]);
        assert_eq!(ips(&d, "default/first"), ["192.0.2.5"]);
        assert!(d["default/second"].ips.is_empty());
        assert_eq!(
            d["default/second"].failure.as_deref(),
            Some("requested address 192.0.2.5 is already assigned to default/first")
        );
        assert!(
            d["default/outside"]
                .failure
                .as_deref()
                .unwrap()
                .contains("not in the load-balancer pool")
        );
        assert!(d["default/garbage"].failure.is_some());
        // Asking for another address moves a holder.
        let mut moved = claim("default/first", "2026-01-01T00:00:01Z");
        moved.holds = vec![ip("192.0.2.5")];
        moved.requested = Ok(vec![ip("192.0.2.6")]);
        let d = allocate(Some(&p), &[moved]);
        assert_eq!(ips(&d, "default/first"), ["192.0.2.6"]);
    }

    #[test]
    fn other_classes_are_left_alone_and_former_load_balancers_give_back() {
        let p = Pool::parse("192.0.2.0/31").unwrap();
        let mut foreign = claim("default/foreign", "2026-01-01T00:00:01Z");
        (foreign.managed, foreign.foreign) = (false, true);
        foreign.holds = vec![ip("192.0.2.0")];
        let mut now_cluster_ip = claim("default/was-lb", "2026-01-01T00:00:02Z");
        now_cluster_ip.managed = false;
        now_cluster_ip.holds = vec![ip("192.0.2.1")];
        let plain = claim("default/new", "2026-01-01T00:00:03Z");
        let d = allocate(Some(&p), &[foreign, now_cluster_ip, plain]);
        assert!(!d.contains_key("default/foreign"));
        assert_eq!(
            d["default/was-lb"],
            Decision {
                ips: vec![],
                failure: None
            }
        );
        // The former load balancer's address is free again; the foreign one is not ours.
        assert_eq!(ips(&d, "default/new"), ["192.0.2.1"]);
    }

    #[test]
    fn dual_stack_services_get_one_address_per_family() {
        let p = Pool::parse("192.0.2.0/31,2001:db8::/127").unwrap();
        let mut dual = claim("default/dual", "2026-01-01T00:00:01Z");
        dual.families = vec![true, false];
        let d = allocate(Some(&p), &[dual]);
        assert_eq!(ips(&d, "default/dual"), ["2001:db8::", "192.0.2.0"]);
        let mut v6 = claim("default/v6", "2026-01-01T00:00:01Z");
        v6.families = vec![true];
        let d = allocate(Some(&Pool::parse("192.0.2.0/31").unwrap()), &[v6]);
        assert!(d["default/v6"].failure.as_deref().unwrap().contains("IPv6"));
    }

    #[test]
    fn without_a_pool_services_wait_and_say_how_to_configure_one() {
        let d = allocate(None, &[claim("default/a", "2026-01-01T00:00:01Z")]);
        assert!(d["default/a"].ips.is_empty());
        assert!(
            d["default/a"]
                .failure
                .as_deref()
                .unwrap()
                .contains("--load-balancer-pool")
        );
    }
}
