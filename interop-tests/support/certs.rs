//! Test credentials in QEMU's `tls-creds-x509` layout, made with rcgen: a CA, server and
//! client certificates with the extensions QEMU's GnuTLS checks insist on (basic
//! constraints, key usage with digital signature and key encipherment, the TLS server or
//! client purpose), and the impostors a hostile network brings (another CA, an expired
//! certificate, a name that is not allowed).

#![allow(dead_code)]

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority that signs the others.
pub struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

fn name(params: &mut CertificateParams, o: &str, cn: &str) {
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, o);
    params.distinguished_name.push(DnType::CommonName, cn);
}

impl Ca {
    /// A new CA named `CN={cn},O=Lab`.
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        name(&mut p, "Lab", cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    fn leaf(&self, cn: &str, sans: &[&str], server: bool, expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        // An address is an IP SAN (QEMU checks `tls-hostname` or the URI's host).
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.to_string().try_into().unwrap()),
            })
            .collect();
        name(&mut p, "Lab", cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            p.not_before = rcgen::date_time_ymd(2024, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate valid for `sans` (DNS names or addresses).
    pub fn server(&self, cn: &str, sans: &[&str]) -> Leaf {
        self.leaf(cn, sans, true, false)
    }

    /// A client certificate named `CN={cn},O=Lab`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], false, false)
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], false, true)
    }

    /// Writes a credentials directory as QEMU's `tls-creds-x509` reads it:
    /// `ca-cert.pem`, plus `server-*.pem` and/or `client-*.pem`.
    pub fn write_dir(&self, dir: &Path, server: Option<&Leaf>, client: Option<&Leaf>) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), &self.pem).unwrap();
        if let Some(s) = server {
            std::fs::write(dir.join("server-cert.pem"), &s.cert).unwrap();
            std::fs::write(dir.join("server-key.pem"), &s.key).unwrap();
        }
        if let Some(c) = client {
            std::fs::write(dir.join("client-cert.pem"), &c.cert).unwrap();
            std::fs::write(dir.join("client-key.pem"), &c.key).unwrap();
        }
    }
}
