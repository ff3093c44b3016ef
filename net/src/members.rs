//! The cluster's membership: the `--initial-cluster` flag as etcd reads and checks it, and the
//! member table every core reads (`Shared.members`).
//!
//! The table starts from the initial membership recorded in the data dir (`member.conf`,
//! `node/recovery.rs`): ids, names and peer URLs. Client URLs are not known then: each member
//! publishes its name and client URLs through the meta log (`LogPayload::MemberPublish`, as
//! etcd's publish request goes through Raft), and the meta group applies them here.

use ferrocd_engine::mvcc::codec::MemberAttributes;
use std::collections::BTreeMap;
use std::sync::RwLock;

/// One member of `--initial-cluster`: a name and its peer URLs (sorted, as etcd sorts them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// etcd's URL checks (`types.NewURLs`): scheme, `host:port`, no path.
fn check_url(url: &str) -> Result<(), String> {
    let rest = ["http://", "https://", "unix://", "unixs://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .ok_or_else(|| format!("URL scheme must be http, https, unix, or unixs: {url}"))?;
    let (host_port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // Go's `net.SplitHostPort` wants a port separator outside IPv6 brackets.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']'));
    if !has_port {
        return Err(format!(
            "URL address does not have the form \"host:port\": {url}"
        ));
    }
    if !path.is_empty() {
        return Err(format!("URL must not contain a path: {url}"));
    }
    Ok(())
}

/// Reads `name=url[,name=url...]` as etcd's `types.NewURLsMap`: a name may appear several
/// times (one entry per peer URL); members come sorted by name, their URLs sorted.
pub fn parse_initial_cluster(text: &str) -> Result<Vec<InitialMember>, String> {
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in text.split(',').filter(|entry| !entry.is_empty()) {
        let (name, url) = entry.split_once('=').unwrap_or((entry, ""));
        check_url(url).map_err(|e| format!("error setting up initial cluster: {e}"))?;
        members
            .entry(name.to_string())
            .or_default()
            .push(url.to_string());
    }
    Ok(members
        .into_iter()
        .map(|(name, mut peer_urls)| {
            peer_urls.sort();
            InitialMember { name, peer_urls }
        })
        .collect())
}

/// The list as etcd prints a `URLsMap`: `name=url` pairs, by name then URL.
fn urls_map_string(members: &[InitialMember]) -> String {
    let pairs = members.iter().flat_map(|m| {
        m.peer_urls
            .iter()
            .map(move |url| format!("{}={url}", m.name))
    });
    pairs.collect::<Vec<_>>().join(",")
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

/// etcd's `VerifyBootstrap` for a new member (no data dir yet), with its messages: this
/// member is in the list, under exactly its advertised peer URLs, and no URL appears twice.
/// URLs are compared as written (etcd also resolves host names; we do not).
pub fn verify_bootstrap(
    name: &str,
    advertise_peer_urls: &[String],
    initial: &[InitialMember],
) -> Result<(), String> {
    let Some(local) = initial.iter().find(|m| m.name == name) else {
        return Err(format!(
            "couldn't find local name {name:?} in the initial cluster configuration"
        ));
    };
    let mut advertised = advertise_peer_urls.to_vec();
    advertised.sort();
    if advertised != local.peer_urls {
        return Err(advertise_mismatch(name, &advertised, &local.peer_urls));
    }
    let mut all: Vec<&String> = initial.iter().flat_map(|m| &m.peer_urls).collect();
    all.sort();
    if all.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(format!(
            "initial cluster {} has duplicate url",
            urls_map_string(initial)
        ));
    }
    Ok(())
}

/// etcd's `advertiseMatchesCluster` message for sorted `advertised` != sorted `listed`.
fn advertise_mismatch(name: &str, advertised: &[String], listed: &[String]) -> String {
    let reason = match advertised.iter().zip(listed).find(|(a, l)| a != l) {
        _ if advertised.len() != listed.len() => format!(
            "len({}) != len({})",
            go_quoted(advertised),
            go_quoted(listed)
        ),
        Some((a, l)) => format!("resolved urls: {a:?} != {l:?}"),
        None => unreachable!("equal lists do not mismatch"),
    };
    let joined = advertised.join(",");
    let missing: Vec<String> = listed
        .iter()
        .filter(|url| !advertised.contains(url))
        .map(|url| format!("{name}={url}"))
        .collect();
    if !missing.is_empty() {
        return format!(
            "--initial-cluster has {} but missing from --initial-advertise-peer-urls={joined} ({reason})",
            missing.join(",")
        );
    }
    let ours = InitialMember {
        name: name.to_string(),
        peer_urls: advertised.to_vec(),
    };
    let ours = urls_map_string(std::slice::from_ref(&ours));
    let extra: Vec<&String> = advertised.iter().filter(|u| !listed.contains(u)).collect();
    if !extra.is_empty() {
        let extra: Vec<&str> = extra.iter().map(|u| u.as_str()).collect();
        return format!(
            "--initial-advertise-peer-urls has {} but missing from --initial-cluster={ours}",
            extra.join(",")
        );
    }
    format!("failed to resolve {joined} to match --initial-cluster={ours} ({reason})")
}

/// One row of the member table (etcd's `membership.Member`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEntry {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    /// Empty until the member has published them.
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// The member table, readable from any core. Written only by the meta group (publish) and at
/// start-up, so a lock is no contention.
#[derive(Debug, Default)]
pub struct Members {
    by_id: RwLock<BTreeMap<u64, MemberEntry>>,
}

impl Members {
    pub fn new(entries: impl IntoIterator<Item = MemberEntry>) -> Members {
        let by_id = entries.into_iter().map(|m| (m.id, m)).collect();
        Members {
            by_id: RwLock::new(by_id),
        }
    }

    /// Every member, by id (etcd's `MembersByID` order).
    pub fn list(&self) -> Vec<MemberEntry> {
        let by_id = self.by_id.read().expect("members lock");
        by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.read().expect("members lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies a member's published name and client URLs; a record for a member not in the
    /// table (removed since) is ignored, as etcd ignores attributes of a removed member.
    pub fn publish(&self, attributes: &MemberAttributes) {
        let mut by_id = self.by_id.write().expect("members lock");
        if let Some(member) = by_id.get_mut(&attributes.member_id) {
            member.name = attributes.name.clone();
            member.client_urls = attributes.client_urls.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn initial_cluster_parses_as_etcd() {
        let members =
            parse_initial_cluster("b=http://h:2,a=http://h:9,a=http://h:1").expect("valid");
        assert_eq!(
            members,
            vec![
                InitialMember {
                    name: "a".into(),
                    peer_urls: urls(&["http://h:1", "http://h:9"])
                },
                InitialMember {
                    name: "b".into(),
                    peer_urls: urls(&["http://h:2"])
                },
            ]
        );
        let prefix = "error setting up initial cluster: ";
        let scheme = "URL scheme must be http, https, unix, or unixs: ";
        assert_eq!(
            parse_initial_cluster("a=foo"),
            Err(format!("{prefix}{scheme}foo"))
        );
        assert_eq!(
            parse_initial_cluster("a=http://h:1,b"),
            Err(format!("{prefix}{scheme}"))
        );
        assert!(parse_initial_cluster("a=http://h")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse_initial_cluster("a=http://h:1/x")
            .unwrap_err()
            .contains("must not contain a path"));
    }

    /// The messages are etcd 3.4.23's, read from the real binary.
    #[test]
    fn bootstrap_checks_give_etcds_messages() {
        let one = parse_initial_cluster("a=http://127.0.0.1:42380").unwrap();
        assert_eq!(
            verify_bootstrap("x", &urls(&["http://127.0.0.1:42380"]), &one),
            Err("couldn't find local name \"x\" in the initial cluster configuration".into())
        );
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42381"]), &one),
            Err(
                "--initial-cluster has a=http://127.0.0.1:42380 but missing from \
                 --initial-advertise-peer-urls=http://127.0.0.1:42381 (resolved urls: \
                 \"http://127.0.0.1:42381\" != \"http://127.0.0.1:42380\")"
                    .into()
            )
        );
        let dup = parse_initial_cluster("a=http://127.0.0.1:42380,b=http://127.0.0.1:42380");
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &dup.unwrap()),
            Err(
                "initial cluster a=http://127.0.0.1:42380,b=http://127.0.0.1:42380 has \
                 duplicate url"
                    .into()
            )
        );
        let twice = parse_initial_cluster("a=http://127.0.0.1:42380,a=http://127.0.0.1:42380");
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &twice.unwrap()),
            Err("failed to resolve http://127.0.0.1:42380 to match \
                 --initial-cluster=a=http://127.0.0.1:42380 (len([\"http://127.0.0.1:42380\"]) \
                 != len([\"http://127.0.0.1:42380\" \"http://127.0.0.1:42380\"]))"
                .into())
        );
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &one),
            Ok(())
        );
    }

    #[test]
    fn publish_fills_a_known_member_only() {
        let entry = |id| MemberEntry {
            id,
            name: format!("m{id}"),
            peer_urls: urls(&["http://h:1"]),
            client_urls: Vec::new(),
            is_learner: false,
        };
        let members = Members::new([entry(9), entry(3)]);
        members.publish(&MemberAttributes {
            member_id: 9,
            name: "nine".into(),
            client_urls: urls(&["http://h:2379"]),
        });
        members.publish(&MemberAttributes {
            member_id: 7,
            name: "gone".into(),
            client_urls: Vec::new(),
        });
        let list = members.list();
        assert_eq!(list.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(list[1].name, "nine");
        assert_eq!(list[1].client_urls, urls(&["http://h:2379"]));
        assert!(list[0].client_urls.is_empty());
    }
}
