//! Certificates made in the test, written as PEM files: a CA, the controller's server
//! certificate, kubelet-style node certificates and operator certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA that signs certificates into files.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// The files of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate a key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-sign the CA"),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.pem()).expect("write the CA");
        path.to_owned()
    }

    fn sign(
        &self,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// The controller's certificate for 127.0.0.1 and localhost, into `dir/name.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> CertFiles {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, "switchyard-controller");
        let sans = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        let (cert, key) = self.sign(subject, sans, ExtendedKeyUsagePurpose::ServerAuth);
        write(dir, name, &cert, &key)
    }

    /// A client certificate with this common name, groups (`O=`; rcgen keeps one) and
    /// DNS names, into `dir/name.{crt,key}`.
    pub fn client(
        &self,
        dir: &Path,
        name: &str,
        common_name: &str,
        group: Option<&str>,
        dns_names: &[&str],
    ) -> CertFiles {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name);
        if let Some(group) = group {
            subject.push(DnType::OrganizationName, group);
        }
        let sans = dns_names
            .iter()
            .map(|d| SanType::DnsName((*d).try_into().expect("a DNS name")))
            .collect();
        let (cert, key) = self.sign(subject, sans, ExtendedKeyUsagePurpose::ClientAuth);
        write(dir, name, &cert, &key)
    }

    /// kubelet's client certificate for `node`: `CN=system:node:<node>`, `O=system:nodes`.
    pub fn node(&self, dir: &Path, node: &str) -> CertFiles {
        self.client(
            dir,
            node,
            &format!("system:node:{node}"),
            Some("system:nodes"),
            &[],
        )
    }

    /// An operator's certificate: `O=switchyard:operators`.
    pub fn operator(&self, dir: &Path, name: &str) -> CertFiles {
        self.client(dir, name, name, Some("switchyard:operators"), &[])
    }
}

fn write(dir: &Path, name: &str, cert: &str, key: &str) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert).expect("write a certificate");
    std::fs::write(&files.key, key).expect("write a key");
    files
}

impl CertFiles {
    /// The certificate and key as a tonic client identity.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(
            std::fs::read(&self.cert).expect("read the certificate"),
            std::fs::read(&self.key).expect("read the key"),
        )
    }
}
