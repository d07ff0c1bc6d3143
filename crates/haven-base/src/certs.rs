//! A quick-start certificate authority for a cluster (`haven cert init|issue`, the demo
//! with `--tls`, the TLS benchmarks): a CA and node certificates valid as both TLS
//! server and client, as `[tls]` wants them. Production may use any CA instead.
//!
//! The CA's subject is fixed, so `issue` rebuilds the issuer from the CA's key alone
//! (rcgen cannot parse a certificate without x509-parser); the issued certificate names
//! that subject and the key's identifier, which is all a verifier matches.

use std::io;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;

use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::DistinguishedName;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;

/// The CA's files in its directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
const CA_SUBJECT: &str = "Haven cluster CA";
/// Longest a certificate name may be: it names two files.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} exists already: remove it first, or choose another directory")]
    Exists { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What one `issue` wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates `dir/ca.pem` and `dir/ca.key` (mode 0600); refuses to overwrite either.
pub fn init(dir: &Path) -> Result<Issued, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    let issued = Issued {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write_new(&issued.key, key.serialize_pem().as_bytes())?;
    write_new(&issued.cert, cert.pem().as_bytes())?;
    Ok(issued)
}

/// Issues `dir/<name>.pem` and `dir/<name>.key` (mode 0600) for `hosts` (IP addresses or
/// DNS names: every host peers and clients reach the node by), signed by the CA in `dir`.
pub fn issue(dir: &Path, name: &str, hosts: &[String]) -> Result<Issued, CertError> {
    check_name(name)?;
    if hosts.is_empty() {
        return Err(CertError::Invalid(
            "name at least one host (--host) the node is reached by".into(),
        ));
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_key_pem =
        std::fs::read_to_string(&ca_key_path).map_err(|e| io_error(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| {
        CertError::Invalid(format!("{}: not a PEM private key", ca_key_path.display()))
    })?;
    let ca = ca_params().self_signed(&ca_key)?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name = subject(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let issued = Issued {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    write_new(&issued.key, key.serialize_pem().as_bytes())?;
    write_new(&issued.cert, cert.pem().as_bytes())?;
    Ok(issued)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = subject(CA_SUBJECT);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn check_name(name: &str) -> Result<(), CertError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(allowed) || name == "ca" {
        return Err(CertError::Invalid(format!(
            "certificate name `{name}`: must be 1-{MAX_NAME_LEN} of [A-Za-z0-9_-] and not `ca`"
        )));
    }
    Ok(())
}

/// Keys and certificates are never overwritten: a second `init` would orphan every
/// certificate the first CA signed.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => CertError::Exists {
                path: path.to_path_buf(),
            },
            _ => io_error(path, source),
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> CertError {
    CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsSection;
    use crate::tls::Tls;

    fn section(dir: &Path, ca_dir: &Path, name: &str) -> TlsSection {
        TlsSection {
            ca: ca_dir.join(CA_CERT),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            client: false,
            admin: false,
        }
    }

    #[test]
    fn an_issued_certificate_loads_with_its_ca_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let hosts = ["127.0.0.1".to_string(), "haven-0.haven".to_string()];
        let issued = issue(dir.path(), "node1", &hosts).unwrap();
        Tls::load(&section(dir.path(), dir.path(), "node1")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn nothing_is_overwritten_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let err = init(dir.path()).unwrap_err().to_string();
        let key = dir.path().join(CA_KEY);
        assert_eq!(
            err,
            format!(
                "{} exists already: remove it first, or choose another directory",
                key.display()
            )
        );
        let err = issue(dir.path(), "../x", &["h".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate name `../x`: must be 1-64 of [A-Za-z0-9_-] and not `ca`"
        );
        let err = issue(dir.path(), "n", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "name at least one host (--host) the node is reached by"
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        issue(dir.path(), "a", &["127.0.0.1".into()]).unwrap();
        issue(dir.path(), "b", &["127.0.0.1".into()]).unwrap();
        let mut mixed = section(dir.path(), dir.path(), "a");
        mixed.key = dir.path().join("b.key");
        let err = Tls::load(&mixed).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "tls.key: {}: does not go with tls.cert",
                mixed.key.display()
            )),
            "{err}"
        );
    }
}
