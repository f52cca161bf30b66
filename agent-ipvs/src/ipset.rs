//! switchyard's ipsets in `ipset` notation: the `create` lines (run once at setup with
//! `ipset -exist restore`), the comments elements carry, and the parser of `ipset save`
//! output (read-back). Pure. Elements themselves are added and deleted in process
//! ([`crate::ipset_netlink`]).
//!
//! Elements carry their Service's name as a comment (see [`crate::render`]); the version
//! record of a Service is an element of `SWY-VERSIONS` keyed by a 128-bit hash of its
//! name, written as an IPv6 address, commented `namespace/name version=<hex>`.

use std::{fmt::Write as _, net::Ipv6Addr, str::FromStr};

use sha2::{Digest, Sha256};
use switchyard_agent_core::{
    netfilter::Family,
    state::{format_version, parse_version},
};

use crate::render::{SetElement, SetKind};

/// Largest number of elements a set may hold (`maxelem`): far above what 10,000 Services
/// need (the hairpin set holds one element per endpoint).
pub const MAX_ELEMENTS: u32 = 1 << 20;

/// `create` lines (for `ipset -exist restore`) for every set of `families` (the versions set always).
pub fn create_lines(families: &[Family]) -> String {
    let mut text = String::new();
    for kind in SetKind::ALL {
        for family in kind.families() {
            if kind != SetKind::Versions && !families.contains(family) {
                continue;
            }
            let inet = match family {
                Family::V4 => "inet",
                Family::V6 => "inet6",
            };
            let _ = writeln!(
                text,
                "create {} {} family {inet} hashsize 1024 maxelem {MAX_ELEMENTS} comment",
                kind.name(*family),
                kind.set_type()
            );
        }
    }
    text
}

/// The `SWY-VERSIONS` element of a Service: its name's hash as an IPv6 address.
pub fn version_key(service: &str) -> Ipv6Addr {
    let digest = Sha256::digest(service.as_bytes());
    let bytes: [u8; 16] = digest[..16]
        .try_into()
        .expect("a SHA-256 digest has 32 bytes");
    Ipv6Addr::from(bytes)
}

/// The comment of a version element.
pub fn version_comment(service: &str, version: u64) -> String {
    format!("{service} version={}", format_version(version))
}

/// A comment as switchyard writes it. Names are validated before they get here, but
/// `ipset save` prints comments in double quotes for read-back to parse: anything that
/// could end the quotes or the line is replaced, and the kernel's 255-byte limit kept.
pub fn safe_comment(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ./:_-=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(255)
        .collect()
}

/// One element as `ipset save` printed it, attributed to a Service by its comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedElement {
    pub element: SetElement,
    /// The comment, if any (a Service's name; for versions, `name version=…`).
    pub comment: Option<String>,
}

/// A version record read back from `SWY-VERSIONS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedVersion {
    pub service: String,
    pub version: u64,
}

/// Everything of switchyard's sets that `ipset save` printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Names of switchyard's sets that exist.
    pub sets: Vec<String>,
    pub elements: Vec<SavedElement>,
    pub versions: Vec<SavedVersion>,
    /// Version elements whose comment could not be read (to delete).
    pub stray_versions: Vec<String>,
}

/// Reads `ipset save` output, keeping only switchyard's sets. Elements are normalized to
/// the notation [`crate::render`] produces (IPv6 addresses as Rust prints them), so the
/// two compare equal whatever spelling `ipset` chose.
pub fn parse_save(text: &str) -> Result<Saved, String> {
    let mut saved = Saved::default();
    for line in text.lines() {
        let mut words = line.splitn(3, ' ');
        let (verb, set, rest) = (words.next(), words.next(), words.next().unwrap_or(""));
        let Some((kind, family)) = set.and_then(SetKind::parse_name) else {
            continue;
        };
        match verb {
            Some("create") => saved.sets.push(kind.name(family)),
            Some("add") => {
                let (element, comment) = match rest.split_once(" comment ") {
                    Some((element, comment)) => (
                        element.trim(),
                        Some(comment.trim().trim_matches('"').to_string()),
                    ),
                    None => (rest.trim(), None),
                };
                if kind == SetKind::Versions {
                    let parsed = comment.as_deref().and_then(|c| {
                        let (service, version) = c.split_once(" version=")?;
                        Some(SavedVersion {
                            service: service.to_string(),
                            version: parse_version(version)?,
                        })
                    });
                    match parsed {
                        Some(version) => saved.versions.push(version),
                        None => saved.stray_versions.push(element.to_string()),
                    }
                    continue;
                }
                let element = normalize(element)
                    .ok_or_else(|| format!("ipset save: cannot read element {line:?}"))?;
                saved.elements.push(SavedElement {
                    element: SetElement {
                        kind,
                        family,
                        element,
                    },
                    comment,
                });
            }
            _ => {}
        }
    }
    Ok(saved)
}

/// An element's parts (`ip`, `proto:port`, `ip` or `net`) in canonical spelling.
fn normalize(element: &str) -> Option<String> {
    let parts: Vec<String> = element
        .split(',')
        .map(|part| {
            if let Some((proto, port)) = part.split_once(':')
                && ["tcp", "udp", "sctp"].contains(&proto)
            {
                return Some(format!("{proto}:{}", u16::from_str(port).ok()?));
            }
            if let Ok(ip) = part.parse::<std::net::IpAddr>() {
                return Some(ip.to_string());
            }
            let net: ipnet::IpNet = part.parse().ok()?;
            Some(net.to_string())
        })
        .collect::<Option<_>>()?;
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(kind: SetKind, family: Family, element: &str) -> SetElement {
        SetElement {
            kind,
            family,
            element: element.into(),
        }
    }

    #[test]
    fn saved_sets_parse_into_elements_versions_and_strays_ignoring_other_sets() {
        let key = version_key("default/web");
        let text = format!(
            "create SWY-REJECT hash:ip,port family inet hashsize 1024 maxelem 1048576 comment bucketsize 12 initval 0x1\n\
             add SWY-REJECT 10.96.0.12,tcp:80 comment \"default/empty\"\n\
             create KUBE-CLUSTER-IP hash:ip,port family inet\n\
             add KUBE-CLUSTER-IP 10.96.0.1,tcp:443\n\
             create SWY-LOOP-BACK6 hash:ip,port,ip family inet6\n\
             add SWY-LOOP-BACK6 fd00:0:0:0::5,tcp:8080,fd00::5 comment \"default/web\"\n\
             add SWY-LB-SOURCE 10.96.0.13,tcp:80,203.0.113.0/24 comment \"default/edge\"\n\
             add SWY-VERSIONS {key} comment \"default/web version=0123456789abcdef\"\n\
             add SWY-VERSIONS ::1 comment \"garbage\"\n"
        );
        let saved = parse_save(&text).unwrap();
        assert_eq!(saved.sets, ["SWY-REJECT", "SWY-LOOP-BACK6"]);
        assert_eq!(
            saved.elements,
            [
                SavedElement {
                    element: element(SetKind::Reject, Family::V4, "10.96.0.12,tcp:80"),
                    comment: Some("default/empty".into()),
                },
                SavedElement {
                    element: element(SetKind::LoopBack, Family::V6, "fd00::5,tcp:8080,fd00::5"),
                    comment: Some("default/web".into()),
                },
                SavedElement {
                    element: element(
                        SetKind::LbSource,
                        Family::V4,
                        "10.96.0.13,tcp:80,203.0.113.0/24"
                    ),
                    comment: Some("default/edge".into()),
                },
            ]
        );
        assert_eq!(
            saved.versions,
            [SavedVersion {
                service: "default/web".into(),
                version: 0x0123_4567_89ab_cdef
            }]
        );
        assert_eq!(saved.stray_versions, ["::1"]);
    }

    #[test]
    fn create_lines_name_every_set_of_the_families_asked_for() {
        let v4 = create_lines(&[Family::V4]);
        assert!(v4.contains("create SWY-LOOP-BACK hash:ip,port,ip family inet "));
        assert!(v4.contains("create SWY-VERSIONS hash:ip family inet6 "));
        assert!(!v4.contains("SWY-REJECT6"));
        let both = create_lines(&Family::ALL);
        assert!(both.contains("create SWY-REJECT6 hash:ip,port family inet6 "));
        assert_eq!(both.lines().count(), 17);
        assert!(both.lines().all(|l| l.ends_with(" comment")));
    }
}
