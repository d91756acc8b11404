//! The network files a pod sees, rendered as kubelet and containerd write them: /etc/hosts
//! (kubelet's `managedHostsFileContent`), /etc/hostname and /etc/resolv.conf (kubelet's DNS
//! configurer, formatted as containerd's CRI plugin does). Pure functions of the Pod; the
//! caller writes the files and mounts them into the containers.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, PodDNSConfig};

use super::{Error, Result};

/// The cluster domain unless configured otherwise (kubelet's `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Kubelet's limits: glibc reads at most 3 nameservers; the API allows 32 search domains
/// of at most 2048 characters together, each at most 253.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCH_PATHS: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;
const MAX_SEARCH_DOMAIN_LEN: usize = 253;
/// A pod hostname is one DNS label.
const MAX_HOSTNAME_LEN: usize = 63;

/// The contents of a resolv.conf: what the node has, or what a pod gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, in order.
    pub nameservers: Vec<String>,
    /// The `search` domains.
    pub searches: Vec<String>,
    /// The `options`, as `name` or `name:value`.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses a resolv.conf as kubelet reads the node's: comments (`#`, `;`) dropped, the
    /// last `search` line wins (without `.` and trailing dots), later options override
    /// earlier ones of the same name.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.find(['#', ';']).map_or(line, |i| &line[..i]);
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => conf.nameservers.extend(fields.next().map(str::to_owned)),
                Some("search") => {
                    conf.searches = fields
                        .filter(|s| *s != ".")
                        .map(|s| s.trim_end_matches('.').to_owned())
                        .collect();
                }
                Some("options") => {
                    for option in fields {
                        merge_option(&mut conf.options, option.to_owned());
                    }
                }
                _ => {}
            }
        }
        conf
    }

    /// The file as containerd writes it for a pod sandbox.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for server in &self.nameservers {
            out.push_str(&format!("nameserver {server}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// Sets `option` (`name` or `name:value`) in `options`, replacing one of the same name in
/// place. (Kubelet merges through a Go map, so its order is random; this keeps first-seen
/// order.)
fn merge_option(options: &mut Vec<String>, option: String) {
    let name = |o: &str| o.split(':').next().unwrap_or_default().to_owned();
    let key = name(&option);
    match options.iter_mut().find(|o| name(o) == key) {
        Some(existing) => *existing = option,
        None => options.push(option),
    }
}

/// The node's side of pod DNS: kubelet's `--cluster-dns`, `--cluster-domain` and
/// `--resolv-conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The cluster DNS service addresses (10.96.0.10 by default in Weir).
    pub cluster_dns: Vec<IpAddr>,
    /// The cluster domain (`cluster.local`).
    pub cluster_domain: String,
    /// The node's resolv.conf, the base of `dnsPolicy: Default` and the source of extra
    /// search domains for `ClusterFirst`.
    pub host: ResolvConf,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn pod_name(pod: &Pod) -> Result<&str> {
    pod.metadata
        .name
        .as_deref()
        .ok_or_else(|| Error::Invalid("the pod has no metadata.name".to_owned()))
}

fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// Kubelet's `truncatePodHostnameIfNeeded`: at most 63 characters, no trailing `-` or `.`.
fn truncate_hostname(pod_name: &str, hostname: &str) -> Result<String> {
    if hostname.len() <= MAX_HOSTNAME_LEN {
        return Ok(hostname.to_owned());
    }
    let truncated = hostname[..MAX_HOSTNAME_LEN].trim_end_matches(['-', '.']);
    if truncated.is_empty() {
        return Err(Error::Invalid(format!(
            "hostname of pod {pod_name} is empty once truncated to {MAX_HOSTNAME_LEN} characters"
        )));
    }
    Ok(truncated.to_owned())
}

/// The pod's hostname and, when it has a subdomain, its domain
/// (`<subdomain>.<namespace>.svc.<cluster domain>`), as kubelet's
/// `GeneratePodHostNameAndDomain`: `spec.hostnameOverride` wins (and has no domain), then
/// `spec.hostname`, then the pod name.
pub fn pod_hostname_and_domain(pod: &Pod, cluster_domain: &str) -> Result<(String, Option<String>)> {
    let name = pod_name(pod)?;
    let spec = pod.spec.as_ref();
    if let Some(hostname) = spec.and_then(|s| s.hostname_override.as_deref()) {
        if !is_dns_subdomain(hostname) {
            return Err(Error::Invalid(format!(
                "pod {name}: spec.hostnameOverride {hostname:?} is not a valid DNS subdomain"
            )));
        }
        return Ok((truncate_hostname(name, hostname)?, None));
    }
    let hostname = match spec.and_then(|s| s.hostname.as_deref()).filter(|h| !h.is_empty()) {
        Some(hostname) if !is_dns_label(hostname) => {
            return Err(Error::Invalid(format!(
                "pod {name}: spec.hostname {hostname:?} is not a valid DNS label"
            )));
        }
        Some(hostname) => hostname,
        None => name,
    };
    let hostname = truncate_hostname(name, hostname)?;
    let domain = match spec.and_then(|s| s.subdomain.as_deref()).filter(|s| !s.is_empty()) {
        Some(subdomain) if !is_dns_label(subdomain) => {
            return Err(Error::Invalid(format!(
                "pod {name}: spec.subdomain {subdomain:?} is not a valid DNS label"
            )));
        }
        Some(subdomain) => Some(format!("{subdomain}.{}.svc.{cluster_domain}", pod_namespace(pod))),
        None => None,
    };
    Ok((hostname, domain))
}

/// The pod's /etc/hosts as kubelet writes it for a pod on the pod network: localhost
/// entries, each pod IP with its names, then `hostAliases`.
pub fn hosts_file(pod: &Pod, pod_ips: &[IpAddr], cluster_domain: &str) -> Result<String> {
    let (hostname, domain) = pod_hostname_and_domain(pod, cluster_domain)?;
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    for ip in pod_ips {
        match &domain {
            Some(domain) => out.push_str(&format!("{ip}\t{hostname}.{domain}\t{hostname}\n")),
            None => out.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    push_host_aliases(&mut out, pod);
    Ok(out)
}

/// The /etc/hosts of a hostNetwork pod, as kubelet makes it: the node's hosts file
/// (`node_hosts`) under its own header, then `hostAliases`.
pub fn host_network_hosts_file(node_hosts: &str, pod: &Pod) -> String {
    let mut out = format!("# Kubernetes-managed hosts file (host network).\n{node_hosts}");
    push_host_aliases(&mut out, pod);
    out
}

/// Kubelet's `hostsEntriesFromHostAliases`: one line per alias IP, names tab-separated.
fn push_host_aliases(out: &mut String, pod: &Pod) {
    let aliases = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_aliases.as_deref())
        .unwrap_or_default();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.as_deref().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
}

/// The pod's /etc/hostname: its hostname, or its FQDN when `setHostnameAsFQDN` is set and
/// it has a domain (kubelet's `GetNodenameForKernel`; the kernel allows 64 characters).
pub fn hostname_file(pod: &Pod, cluster_domain: &str) -> Result<String> {
    Ok(format!("{}\n", kernel_hostname(pod, cluster_domain)?))
}

/// The hostname of the pod's UTS namespace (what /etc/hostname holds).
pub fn kernel_hostname(pod: &Pod, cluster_domain: &str) -> Result<String> {
    let (hostname, domain) = pod_hostname_and_domain(pod, cluster_domain)?;
    let as_fqdn = pod.spec.as_ref().and_then(|s| s.set_hostname_as_fqdn).unwrap_or(false);
    match domain {
        Some(domain) if as_fqdn => {
            let fqdn = format!("{hostname}.{domain}");
            if fqdn.len() > 64 {
                return Err(Error::Invalid(format!(
                    "pod {}: FQDN {fqdn} is too long for a hostname (64 characters is the max, {} requested); \
                     shorten the pod's hostname or subdomain or unset setHostnameAsFQDN",
                    pod_name(pod)?,
                    fqdn.len()
                )));
            }
            Ok(fqdn)
        }
        _ => Ok(hostname),
    }
}

fn push_unique(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for item in items {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

/// The pod's resolv.conf per its `dnsPolicy` and `dnsConfig`, as kubelet's `GetPodDNS`:
/// `ClusterFirst` (the default; `Default` for hostNetwork pods) uses the cluster DNS and
/// the cluster search path before the node's search domains, with `ndots:5`;
/// `ClusterFirstWithHostNet` is `ClusterFirst` for every pod; `Default` is the node's
/// resolv.conf; `None` is `dnsConfig` alone. `dnsConfig` is then appended, and the result
/// cut to the resolver's limits.
pub fn resolv_conf(pod: &Pod, dns: &DnsSettings) -> Result<ResolvConf> {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec.and_then(|s| s.dns_policy.as_deref()).unwrap_or("ClusterFirst");
    let cluster = match policy {
        "None" => None,
        "ClusterFirstWithHostNet" => Some(true),
        "ClusterFirst" => Some(!host_network),
        "Default" => Some(false),
        other => {
            return Err(Error::Invalid(format!(
                "pod {}: dnsPolicy {other:?} is not one of ClusterFirst, ClusterFirstWithHostNet, Default, None",
                pod_name(pod)?
            )));
        }
    };
    let mut conf = match cluster {
        None => ResolvConf::default(),
        // Without a cluster DNS address kubelet falls back to the node's settings.
        Some(true) if !dns.cluster_dns.is_empty() => {
            let mut searches = Vec::new();
            if !dns.cluster_domain.is_empty() {
                let domain = &dns.cluster_domain;
                searches = vec![
                    format!("{}.svc.{domain}", pod_namespace(pod)),
                    format!("svc.{domain}"),
                    domain.clone(),
                ];
            }
            push_unique(&mut searches, dns.host.searches.iter().cloned());
            ResolvConf {
                nameservers: dns.cluster_dns.iter().map(ToString::to_string).collect(),
                searches,
                options: vec!["ndots:5".to_owned()],
            }
        }
        Some(_) => dns.host.clone(),
    };
    if let Some(PodDNSConfig {
        nameservers,
        searches,
        options,
    }) = spec.and_then(|s| s.dns_config.as_ref())
    {
        let mut servers = Vec::new();
        push_unique(&mut servers, conf.nameservers.drain(..));
        push_unique(&mut servers, nameservers.iter().flatten().cloned());
        conf.nameservers = servers;
        let mut merged = Vec::new();
        push_unique(&mut merged, conf.searches.drain(..));
        push_unique(&mut merged, searches.iter().flatten().cloned());
        conf.searches = merged;
        for option in options.iter().flatten() {
            let Some(name) = option.name.as_deref() else { continue };
            let option = match option.value.as_deref() {
                Some(value) if !value.is_empty() => format!("{name}:{value}"),
                _ => name.to_owned(),
            };
            merge_option(&mut conf.options, option);
        }
    }
    conf.nameservers.truncate(MAX_NAMESERVERS);
    conf.searches = fit_search_limits(std::mem::take(&mut conf.searches));
    Ok(conf)
}

/// Kubelet's `formDNSSearchFitsLimits`: at most 32 domains, none over 253 characters,
/// dropped from the end until the line fits 2048 characters.
fn fit_search_limits(mut searches: Vec<String>) -> Vec<String> {
    searches.truncate(MAX_SEARCH_PATHS);
    searches.retain(|s| s.len() <= MAX_SEARCH_DOMAIN_LEN);
    while searches.iter().map(|s| s.len() + 1).sum::<usize>().saturating_sub(1) > MAX_SEARCH_CHARS {
        searches.pop();
    }
    searches
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(name: &str, namespace: &str, spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn dns() -> DnsSettings {
        DnsSettings {
            cluster_dns: ips(&["10.96.0.10"]),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            host: ResolvConf::parse(
                "# from DHCP\nnameserver 192.0.2.53\nsearch corp.example. lab.example\noptions edns0\n",
            ),
        }
    }

    const LOCALHOST: &str = "# Kubernetes-managed hosts file.\n\
                             127.0.0.1\tlocalhost\n\
                             ::1\tlocalhost ip6-localhost ip6-loopback\n\
                             fe00::0\tip6-localnet\n\
                             fe00::0\tip6-mcastprefix\n\
                             fe00::1\tip6-allnodes\n\
                             fe00::2\tip6-allrouters\n";

    #[test]
    fn hosts_of_a_plain_pod_name_its_ip_by_pod_name() {
        let p = pod("web-7c9f-abcde", "shop", PodSpec::default());
        let hosts = hosts_file(&p, &ips(&["10.244.1.5"]), "cluster.local").unwrap();
        assert_eq!(hosts, format!("{LOCALHOST}10.244.1.5\tweb-7c9f-abcde\n"));
    }

    #[test]
    fn hosts_of_a_statefulset_pod_carry_its_fqdn_for_every_pod_ip() {
        let p = pod(
            "db-0",
            "shop",
            PodSpec {
                hostname: Some("db-0".to_owned()),
                subdomain: Some("db".to_owned()),
                ..Default::default()
            },
        );
        let hosts = hosts_file(&p, &ips(&["10.244.1.5", "fd00::5"]), "cluster.local").unwrap();
        assert_eq!(
            hosts,
            format!(
                "{LOCALHOST}10.244.1.5\tdb-0.db.shop.svc.cluster.local\tdb-0\n\
                 fd00::5\tdb-0.db.shop.svc.cluster.local\tdb-0\n"
            )
        );
    }

    #[test]
    fn host_aliases_follow_under_their_own_header() {
        let p = pod(
            "web",
            "default",
            PodSpec {
                host_aliases: Some(vec![
                    HostAlias {
                        ip: "192.0.2.10".to_owned(),
                        hostnames: Some(vec!["foo.local".to_owned(), "bar.local".to_owned()]),
                    },
                    HostAlias {
                        ip: "192.0.2.11".to_owned(),
                        hostnames: Some(vec!["baz.local".to_owned()]),
                    },
                ]),
                ..Default::default()
            },
        );
        let hosts = hosts_file(&p, &ips(&["10.244.1.5"]), "cluster.local").unwrap();
        assert_eq!(
            hosts,
            format!(
                "{LOCALHOST}10.244.1.5\tweb\n\n# Entries added by HostAliases.\n\
                 192.0.2.10\tfoo.local\tbar.local\n192.0.2.11\tbaz.local\n"
            )
        );
    }

    #[test]
    fn host_network_pods_get_the_nodes_hosts_file_and_their_aliases() {
        let p = pod(
            "agent",
            "kube-system",
            PodSpec {
                host_network: Some(true),
                host_aliases: Some(vec![HostAlias {
                    ip: "192.0.2.10".to_owned(),
                    hostnames: Some(vec!["registry.local".to_owned()]),
                }]),
                ..Default::default()
            },
        );
        assert_eq!(
            host_network_hosts_file("127.0.0.1\tlocalhost\n192.0.2.5\tnode-1\n", &p),
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1\tlocalhost\n192.0.2.5\tnode-1\n\n\
             # Entries added by HostAliases.\n192.0.2.10\tregistry.local\n"
        );
    }

    #[test]
    fn hostname_is_spec_hostname_or_the_pod_name_truncated_to_63() {
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(
            hostname_file(&pod(&long, "default", PodSpec::default()), "cluster.local").unwrap(),
            format!("{}\n", "a".repeat(62)),
            "cut to 63 characters, then the trailing '-' goes"
        );
        let p = pod(
            "web-0",
            "default",
            PodSpec {
                hostname: Some("frontend".to_owned()),
                ..Default::default()
            },
        );
        assert_eq!(hostname_file(&p, "cluster.local").unwrap(), "frontend\n");
    }

    #[test]
    fn set_hostname_as_fqdn_puts_the_fqdn_in_etc_hostname() {
        let mut spec = PodSpec {
            subdomain: Some("db".to_owned()),
            set_hostname_as_fqdn: Some(true),
            ..Default::default()
        };
        let p = pod("db-0", "shop", spec.clone());
        assert_eq!(
            hostname_file(&p, "cluster.local").unwrap(),
            "db-0.db.shop.svc.cluster.local\n"
        );
        spec.subdomain = None;
        assert_eq!(
            hostname_file(&pod("db-0", "shop", spec), "cluster.local").unwrap(),
            "db-0\n"
        );
        let too_long = pod(
            &"a".repeat(40),
            "shop",
            PodSpec {
                subdomain: Some("db".to_owned()),
                set_hostname_as_fqdn: Some(true),
                ..Default::default()
            },
        );
        let err = hostname_file(&too_long, "cluster.local").unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[test]
    fn hostname_override_wins_and_has_no_domain() {
        let p = pod(
            "db-0",
            "shop",
            PodSpec {
                hostname_override: Some("legacy.host".to_owned()),
                subdomain: Some("db".to_owned()),
                ..Default::default()
            },
        );
        assert_eq!(
            pod_hostname_and_domain(&p, "cluster.local").unwrap(),
            ("legacy.host".to_owned(), None)
        );
    }

    #[test]
    fn invalid_hostname_or_subdomain_is_refused() {
        for spec in [
            PodSpec {
                hostname: Some("Not_A_Label".to_owned()),
                ..Default::default()
            },
            PodSpec {
                subdomain: Some("a.b".to_owned()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                hosts_file(&pod("p", "default", spec), &[], "cluster.local"),
                Err(Error::Invalid(_))
            ));
        }
    }

    #[test]
    fn cluster_first_resolv_conf_is_what_kubelet_gives_a_pod() {
        let p = pod("web", "shop", PodSpec::default());
        let conf = resolv_conf(&p, &dns()).unwrap();
        assert_eq!(
            conf.render(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\n\
             nameserver 10.96.0.10\n\
             options ndots:5\n"
        );
        let explicit = pod(
            "web",
            "shop",
            PodSpec {
                dns_policy: Some("ClusterFirst".to_owned()),
                ..Default::default()
            },
        );
        assert_eq!(resolv_conf(&explicit, &dns()).unwrap(), conf);
    }

    #[test]
    fn default_policy_and_host_network_pods_get_the_nodes_resolv_conf() {
        let default = pod(
            "web",
            "shop",
            PodSpec {
                dns_policy: Some("Default".to_owned()),
                ..Default::default()
            },
        );
        let expected = "search corp.example lab.example\nnameserver 192.0.2.53\noptions edns0\n";
        assert_eq!(resolv_conf(&default, &dns()).unwrap().render(), expected);
        let host_net = pod(
            "web",
            "shop",
            PodSpec {
                host_network: Some(true),
                ..Default::default()
            },
        );
        assert_eq!(resolv_conf(&host_net, &dns()).unwrap().render(), expected);
        let with_host_net = pod(
            "web",
            "shop",
            PodSpec {
                host_network: Some(true),
                dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
                ..Default::default()
            },
        );
        assert!(
            resolv_conf(&with_host_net, &dns())
                .unwrap()
                .render()
                .contains("nameserver 10.96.0.10\n")
        );
    }

    #[test]
    fn cluster_first_without_cluster_dns_falls_back_to_the_node() {
        let mut settings = dns();
        settings.cluster_dns.clear();
        let conf = resolv_conf(&pod("web", "shop", PodSpec::default()), &settings).unwrap();
        assert_eq!(conf, settings.host);
    }

    #[test]
    fn none_policy_is_dns_config_alone() {
        let p = pod(
            "web",
            "shop",
            PodSpec {
                dns_policy: Some("None".to_owned()),
                dns_config: Some(PodDNSConfig {
                    nameservers: Some(vec!["192.0.2.1".to_owned()]),
                    searches: Some(vec![
                        "ns1.svc.cluster-domain.example".to_owned(),
                        "my.dns.search.suffix".to_owned(),
                    ]),
                    options: Some(vec![
                        PodDNSConfigOption {
                            name: Some("ndots".to_owned()),
                            value: Some("2".to_owned()),
                        },
                        PodDNSConfigOption {
                            name: Some("edns0".to_owned()),
                            value: None,
                        },
                    ]),
                }),
                ..Default::default()
            },
        );
        // The example of the Kubernetes DNS documentation, and the file it shows.
        assert_eq!(
            resolv_conf(&p, &dns()).unwrap().render(),
            "search ns1.svc.cluster-domain.example my.dns.search.suffix\n\
             nameserver 192.0.2.1\n\
             options ndots:2 edns0\n"
        );
    }

    #[test]
    fn dns_config_is_appended_without_duplicates_and_overrides_options_by_name() {
        let p = pod(
            "web",
            "shop",
            PodSpec {
                dns_config: Some(PodDNSConfig {
                    nameservers: Some(vec!["10.96.0.10".to_owned(), "192.0.2.1".to_owned()]),
                    searches: Some(vec!["cluster.local".to_owned(), "extra.example".to_owned()]),
                    options: Some(vec![
                        PodDNSConfigOption {
                            name: Some("ndots".to_owned()),
                            value: Some("1".to_owned()),
                        },
                        PodDNSConfigOption {
                            name: Some("single-request-reopen".to_owned()),
                            value: None,
                        },
                    ]),
                }),
                ..Default::default()
            },
        );
        let conf = resolv_conf(&p, &dns()).unwrap();
        assert_eq!(conf.nameservers, ["10.96.0.10", "192.0.2.1"]);
        assert_eq!(
            conf.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "lab.example",
                "extra.example"
            ]
        );
        assert_eq!(conf.options, ["ndots:1", "single-request-reopen"]);
    }

    #[test]
    fn limits_cut_nameservers_to_three_and_search_domains_to_32() {
        let p = pod(
            "web",
            "shop",
            PodSpec {
                dns_policy: Some("None".to_owned()),
                dns_config: Some(PodDNSConfig {
                    nameservers: Some((1..=5).map(|n| format!("192.0.2.{n}")).collect()),
                    searches: Some((0..40).map(|n| format!("d{n}.example")).collect()),
                    options: None,
                }),
                ..Default::default()
            },
        );
        let conf = resolv_conf(&p, &dns()).unwrap();
        assert_eq!(conf.nameservers.len(), 3);
        assert_eq!(conf.searches.len(), 32);
        let long: Vec<String> = (0..20).map(|n| format!("{n:02}{}", "x".repeat(150))).collect();
        let fitted = fit_search_limits(long);
        assert_eq!(
            fitted.len(),
            13,
            "13 domains of 152 characters and their spaces fit in 2048"
        );
        assert!(fit_search_limits(vec!["y".repeat(254), "ok".to_owned()]) == ["ok"]);
    }

    #[test]
    fn unknown_dns_policy_is_an_error() {
        let p = pod(
            "web",
            "shop",
            PodSpec {
                dns_policy: Some("Sometimes".to_owned()),
                ..Default::default()
            },
        );
        assert!(
            resolv_conf(&p, &dns())
                .unwrap_err()
                .to_string()
                .contains("dnsPolicy \"Sometimes\"")
        );
    }

    #[test]
    fn node_resolv_conf_parsing_follows_kubelet() {
        let conf = ResolvConf::parse(
            "nameserver 192.0.2.1 ; primary\n\
             nameserver 192.0.2.2\n\
             search old.example\n\
             search . new.example.\n\
             options ndots:2 timeout:1\n\
             options ndots:3\n\
             # options rotate\n",
        );
        assert_eq!(conf.nameservers, ["192.0.2.1", "192.0.2.2"]);
        assert_eq!(conf.searches, ["new.example"]);
        assert_eq!(conf.options, ["ndots:3", "timeout:1"]);
    }
}
