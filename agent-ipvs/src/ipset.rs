//! switchyard's ipsets in `ipset` notation: the `create` lines (run once at setup with
//! `ipset -exist restore`), the comments elements carry, and what a listing of the sets
//! holds ([`Saved`], normalized to [`crate::render`]'s notation). Pure. Elements are
//! added, deleted and listed in process ([`crate::ipset_netlink`]).
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
                "create {} {} family {inet} hashsize 4096 maxelem {MAX_ELEMENTS} comment",
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

impl Saved {
    /// Records one element of switchyard's set `kind` of `family` as a listing showed
    /// it: a version record, or an element normalized to [`crate::render`]'s notation.
    pub fn record(
        &mut self,
        kind: SetKind,
        family: Family,
        element: &str,
        comment: Option<String>,
    ) -> Result<(), String> {
        if kind == SetKind::Versions {
            let parsed = comment.as_deref().and_then(|c| {
                let (service, version) = c.split_once(" version=")?;
                Some(SavedVersion {
                    service: service.to_string(),
                    version: parse_version(version)?,
                })
            });
            match parsed {
                Some(version) => self.versions.push(version),
                None => self.stray_versions.push(element.to_string()),
            }
            return Ok(());
        }
        let element =
            normalize(element).ok_or_else(|| format!("cannot read element {element:?}"))?;
        self.elements.push(SavedElement {
            element: SetElement {
                kind,
                family,
                element,
            },
            comment,
        });
        Ok(())
    }
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
    fn listed_elements_are_normalized_and_versions_told_from_strays() {
        let mut saved = Saved::default();
        let key = version_key("default/web").to_string();
        let rows: [(SetKind, Family, &str, Option<&str>); 5] = [
            (
                SetKind::Reject,
                Family::V4,
                "10.96.0.12,tcp:80",
                Some("default/empty"),
            ),
            (
                SetKind::LoopBack,
                Family::V6,
                "fd00:0:0:0::5,tcp:8080,fd00::5",
                Some("default/web"),
            ),
            (
                SetKind::LbSource,
                Family::V4,
                "10.96.0.13,tcp:80,203.0.113.0/24",
                Some("default/edge"),
            ),
            (
                SetKind::Versions,
                Family::V6,
                &key,
                Some("default/web version=0123456789abcdef"),
            ),
            (SetKind::Versions, Family::V6, "::1", Some("garbage")),
        ];
        for (kind, family, text, comment) in rows {
            saved
                .record(kind, family, text, comment.map(String::from))
                .unwrap();
        }
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
        assert!(
            saved
                .record(SetKind::Reject, Family::V4, "10.0.0.1,icmp:1", None)
                .is_err()
        );
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
