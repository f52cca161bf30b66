//! Who is on the other end of a connection, as its client certificate says, and what
//! that identity may do. Pure: certificates in, decisions out.
//!
//! A node's identity is kubelet's: subject `CN=system:node:NAME` in group
//! `O=system:nodes`; a certificate of that group may also name its node by a DNS SAN
//! equal to the node's name. Operators are the certificates of one configurable group
//! ([`DEFAULT_OPERATOR_GROUP`]). Entry points: [`PeerIdentity::from_der`] and [`Access`].

use switchyard_proto::names::quote_bounded;
use tonic::Status;
use x509_cert::der::{self, Decode, asn1::ObjectIdentifier};
use x509_cert::{Certificate, ext::pkix::SubjectAltName, ext::pkix::name::GeneralName};

/// The group (`O=`) of every node certificate, as kubelet's client certificates carry it.
pub const NODE_GROUP: &str = "system:nodes";
/// How a node certificate's common name starts: `system:node:NAME`.
pub const NODE_CN_PREFIX: &str = "system:node:";
/// The group whose certificates may call every query method.
pub const DEFAULT_OPERATOR_GROUP: &str = "switchyard:operators";

const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

/// Why a verified certificate could not be read. Not retryable: the same certificate
/// fails the same way.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The certificate (or its subject-alternative-name extension) is not valid DER.
    #[error("cannot decode the client certificate: {0}")]
    Decode(String),
}

/// What a client certificate says about its holder: the subject's common name and
/// organizations (groups) and its DNS subject alternative names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: Option<String>,
    pub groups: Vec<String>,
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity of a certificate the TLS layer has already verified.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let certificate =
            Certificate::from_der(der).map_err(|e| IdentityError::Decode(e.to_string()))?;
        let tbs = &certificate.tbs_certificate;
        let mut identity = Self::default();
        for rdn in &tbs.subject.0 {
            for attribute in rdn.0.iter() {
                let Some(text) = directory_string(&attribute.value) else {
                    continue;
                };
                if attribute.oid == COMMON_NAME {
                    identity.common_name.get_or_insert(text);
                } else if attribute.oid == ORGANIZATION {
                    identity.groups.push(text);
                }
            }
        }
        for extension in tbs.extensions.iter().flatten() {
            if extension.extn_id != SUBJECT_ALT_NAME {
                continue;
            }
            let names = SubjectAltName::from_der(extension.extn_value.as_bytes())
                .map_err(|e| IdentityError::Decode(e.to_string()))?;
            for name in names.0 {
                if let GeneralName::DnsName(dns) = name {
                    identity.dns_names.push(dns.as_str().to_owned());
                }
            }
        }
        Ok(identity)
    }

    /// Whether the certificate belongs to `group` (an `O=` of its subject).
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// Whether this is a node certificate for `node`: in [`NODE_GROUP`], with
    /// `CN=system:node:<node>` or a DNS SAN equal to `node`.
    pub fn is_node(&self, node: &str) -> bool {
        self.in_group(NODE_GROUP)
            && (self
                .common_name
                .as_deref()
                .and_then(|cn| cn.strip_prefix(NODE_CN_PREFIX))
                == Some(node)
                || self.dns_names.iter().any(|n| n == node))
    }

    /// `CN=…, O=…` for messages and logs, each value bounded and escaped.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cn) = &self.common_name {
            parts.push(format!("CN={}", quote_bounded(cn)));
        }
        for group in self.groups.iter().take(4) {
            parts.push(format!("O={}", quote_bounded(group)));
        }
        if parts.is_empty() {
            parts.push("a certificate without CN or O".into());
        }
        parts.join(", ")
    }
}

/// The text of a DirectoryString attribute value (UTF8String, PrintableString, IA5String).
fn directory_string(value: &der::Any) -> Option<String> {
    use der::{
        Tagged,
        asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef},
    };
    match value.tag() {
        der::Tag::Utf8String => Utf8StringRef::try_from(value).ok().map(|s| s.to_string()),
        der::Tag::PrintableString => PrintableStringRef::try_from(value)
            .ok()
            .map(|s| s.to_string()),
        der::Tag::Ia5String => Ia5StringRef::try_from(value).ok().map(|s| s.to_string()),
        _ => None,
    }
}

/// Who may do what. With client certificates off (no `--client-ca`), nobody is
/// identified and everything is allowed, as without TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// Whether every connection carries a verified client certificate.
    pub identified: bool,
    /// The group whose certificates may call every query method.
    pub operator_group: String,
}

impl Default for Access {
    fn default() -> Self {
        Self::open()
    }
}

impl Access {
    /// Everything allowed: no client certificates.
    pub fn open() -> Self {
        Self {
            identified: false,
            operator_group: DEFAULT_OPERATOR_GROUP.into(),
        }
    }

    /// Client certificates required; `operator_group` may query everything.
    pub fn identified(operator_group: impl Into<String>) -> Self {
        Self {
            identified: true,
            operator_group: operator_group.into(),
        }
    }

    fn caller<'a>(
        &self,
        peer: Option<&'a PeerIdentity>,
    ) -> Result<Option<&'a PeerIdentity>, Status> {
        match (self.identified, peer) {
            (false, _) => Ok(None),
            (true, Some(peer)) => Ok(Some(peer)),
            (true, None) => Err(Status::permission_denied(
                "this controller requires a client certificate",
            )),
        }
    }

    /// May `peer` stream the state of `node`? `node` must already be validated.
    pub fn stream(&self, peer: Option<&PeerIdentity>, node: &str) -> Result<(), Status> {
        match self.caller(peer)? {
            None => Ok(()),
            Some(peer) if peer.is_node(node) => Ok(()),
            Some(peer) if peer.in_group(NODE_GROUP) => Err(Status::permission_denied(format!(
                "certificate {} may not stream the state of node {node}: a node certificate \
                 streams only for its own node (CN=system:node:{node} or a DNS SAN {node})",
                peer.describe()
            ))),
            Some(peer) => Err(Status::permission_denied(format!(
                "certificate {} may not stream the state of node {node}: only node certificates \
                 (O={NODE_GROUP}, CN=system:node:{node}) may",
                peer.describe()
            ))),
        }
    }

    /// May `peer` call `method`, which reads the whole cluster?
    pub fn query(&self, peer: Option<&PeerIdentity>, method: &str) -> Result<(), Status> {
        match self.caller(peer)? {
            None => Ok(()),
            Some(peer) if peer.in_group(&self.operator_group) => Ok(()),
            Some(peer) => Err(Status::permission_denied(format!(
                "certificate {} may not call {method}: it needs a certificate of group O={}",
                peer.describe(),
                quote_bounded(&self.operator_group)
            ))),
        }
    }

    /// May `peer` read the state of `node` (`GetNodeState`)? Operators may read any node,
    /// a node only its own. `node` must already be validated.
    pub fn query_node(&self, peer: Option<&PeerIdentity>, node: &str) -> Result<(), Status> {
        match self.caller(peer)? {
            None => Ok(()),
            Some(peer) if peer.in_group(&self.operator_group) || peer.is_node(node) => Ok(()),
            Some(peer) => Err(Status::permission_denied(format!(
                "certificate {} may not read the state of node {node}: a node reads only its \
                 own state, operators (O={}) any",
                peer.describe(),
                quote_bounded(&self.operator_group)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    use tonic::Code;

    use super::*;

    fn certificate(cn: Option<&str>, groups: &[&str], dns: &[&str]) -> PeerIdentity {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        if let Some(cn) = cn {
            name.push(DnType::CommonName, cn);
        }
        for group in groups {
            name.push(DnType::OrganizationName, *group);
        }
        params.distinguished_name = name;
        params.subject_alt_names = dns
            .iter()
            .map(|d| SanType::DnsName((*d).try_into().unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        PeerIdentity::from_der(cert.der()).unwrap()
    }

    #[test]
    fn a_kubelet_style_certificate_reads_as_its_common_name_groups_and_dns_names() {
        let identity = certificate(
            Some("system:node:node-a"),
            &["system:nodes"],
            &["node-a.example.com", "node-a"],
        );
        assert_eq!(
            identity,
            PeerIdentity {
                common_name: Some("system:node:node-a".into()),
                groups: vec!["system:nodes".into()],
                dns_names: vec!["node-a.example.com".into(), "node-a".into()],
            }
        );
        assert_eq!(
            identity.describe(),
            r#"CN="system:node:node-a", O="system:nodes""#
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(PeerIdentity::from_der(b"\x30\x03\x02\x01").is_err());
    }

    #[test]
    fn a_node_certificate_names_its_node_by_common_name_or_dns_san_and_only_in_its_group() {
        let cases = [
            (
                certificate(Some("system:node:node-a"), &[NODE_GROUP], &[]),
                "node-a",
                true,
            ),
            (
                certificate(Some("system:node:node-a"), &[NODE_GROUP], &[]),
                "node-b",
                false,
            ),
            (
                certificate(Some("node-a"), &[NODE_GROUP], &["node-a"]),
                "node-a",
                true,
            ),
            (
                certificate(None, &[NODE_GROUP], &["node-a"]),
                "node-a",
                true,
            ),
            (
                certificate(Some("system:node:node-a"), &[], &[]),
                "node-a",
                false,
            ),
            (
                certificate(Some("system:node:node-a"), &["system:masters"], &["node-a"]),
                "node-a",
                false,
            ),
            (
                certificate(Some("system:node:node-a"), &[NODE_GROUP], &["node-b"]),
                "node-b",
                true,
            ),
            (
                certificate(Some("system:node:"), &[NODE_GROUP], &[]),
                "",
                true,
            ),
        ];
        for (identity, node, expected) in cases {
            assert_eq!(identity.is_node(node), expected, "{identity:?} as {node:?}");
        }
    }

    #[test]
    fn a_node_streams_and_reads_only_its_own_node_and_operators_read_everything() {
        let access = Access::identified(DEFAULT_OPERATOR_GROUP);
        let node_a = certificate(Some("system:node:node-a"), &[NODE_GROUP], &[]);
        let operator = certificate(Some("alice"), &[DEFAULT_OPERATOR_GROUP], &[]);
        let stranger = certificate(Some("mallory"), &["devs"], &[]);

        assert!(access.stream(Some(&node_a), "node-a").is_ok());
        let denied = access.stream(Some(&node_a), "node-b").unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            r#"certificate CN="system:node:node-a", O="system:nodes" may not stream the state of node node-b: a node certificate streams only for its own node (CN=system:node:node-b or a DNS SAN node-b)"#
        );
        let denied = access.stream(Some(&operator), "node-a").unwrap_err();
        assert!(
            denied.message().contains(r#"CN="alice""#),
            "{}",
            denied.message()
        );

        assert!(access.query(Some(&operator), "ListNodes").is_ok());
        for peer in [&node_a, &stranger] {
            let denied = access.query(Some(peer), "ListNodes").unwrap_err();
            assert_eq!(denied.code(), Code::PermissionDenied);
            assert!(
                denied.message().contains("ListNodes"),
                "{}",
                denied.message()
            );
        }
        assert!(access.query_node(Some(&node_a), "node-a").is_ok());
        assert!(access.query_node(Some(&operator), "node-b").is_ok());
        assert_eq!(
            access
                .query_node(Some(&node_a), "node-b")
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            access.query_node(None, "node-a").unwrap_err().code(),
            Code::PermissionDenied,
            "identified access without a certificate is refused"
        );
    }

    #[test]
    fn the_operator_group_is_configurable() {
        let access = Access::identified("platform-team");
        let operator = certificate(Some("alice"), &["platform-team"], &[]);
        let old = certificate(Some("bob"), &[DEFAULT_OPERATOR_GROUP], &[]);
        assert!(access.query(Some(&operator), "GetService").is_ok());
        assert!(access.query(Some(&old), "GetService").is_err());
    }

    #[test]
    fn open_access_allows_everything_without_a_certificate() {
        let access = Access::open();
        assert!(access.stream(None, "node-a").is_ok());
        assert!(access.query(None, "ListNodes").is_ok());
        assert!(access.query_node(None, "node-b").is_ok());
    }

    #[test]
    fn a_hostile_subject_is_described_bounded_and_on_one_line() {
        let long = format!("system:node:x\n{}", "y".repeat(2000));
        let identity = certificate(Some(&long), &["g\"\n"], &[]);
        let text = identity.describe();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.len() < 200, "{text}");
    }
}
