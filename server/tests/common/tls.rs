//! Test certificates: a throwaway CA and a `localhost`/`127.0.0.1` server
//! certificate it signs, written as PEM files for `HERALD_TLS_CERT`/`KEY`.
//! (rustls does not accept a self-signed leaf as its own trust anchor, so
//! clients trust the CA.)

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCerts {
    /// The CA a client trusts, PEM.
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCerts {
    /// Writes `server.pem` (leaf then CA) and `server.key` into `dir`.
    pub fn create(dir: &Path) -> TestCerts {
        Self::create_named(dir, "server", "Herald test")
    }

    /// Like [`create`](Self::create) with file stem `name` and organisation `org`
    /// (a renewal can be told apart by it).
    pub fn create_named(dir: &Path, name: &str, org: &str) -> TestCerts {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("{org} CA"));
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        leaf.distinguished_name.push(DnType::OrganizationName, org);
        let key = KeyPair::generate().unwrap();
        let leaf = leaf.signed_by(&key, &ca).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        TestCerts { ca_pem: ca.pem(), cert, key: key_path }
    }

    /// Writes the CA (PEM) to `<dir>/<name>`, for a setting that names a
    /// CA file; returns the path.
    pub fn ca_file(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// `HERALD_TLS_CERT` / `HERALD_TLS_KEY` pairs for [`super::TestServer::start_in`].
    pub fn vars(&self) -> [(&'static str, String); 2] {
        [("HERALD_TLS_CERT", self.cert.display().to_string()), ("HERALD_TLS_KEY", self.key.display().to_string())]
    }
}
