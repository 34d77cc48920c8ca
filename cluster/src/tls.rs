//! TLS 1.3 with mutual authentication (rustls, ring provider): a cluster's
//! certificate authority, the certificate and key this process presents,
//! and the client and server configurations built from them.
//!
//! Every peer of a TLS cluster presents a certificate signed by the
//! cluster's CA, and accepts only peers whose certificate is. As in Dask,
//! host names are not checked: the CA is the cluster's identity, and
//! scheduler and workers move between hosts and addresses. A certificate
//! from another CA, an expired one, or none at all fails the handshake.
//!
//! Processes find the files through `--tls-ca-file`, `--tls-cert`,
//! `--tls-key` or the `DASK_RS_TLS_*` variables; a process started on a host
//! that does not share our files (the ssh backend) gets the PEM text itself
//! in `DASK_RS_TLS_*_PEM` variables, written to its shell's standard input.
//! Key material never travels on a command line, and a key file must be
//! private to its owner.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::security::{is_mine, SecurityError};

/// Environment variable naming the cluster's CA certificate file.
pub const CA_ENV: &str = "DASK_RS_TLS_CA_FILE";
/// Environment variable naming this process's certificate file.
pub const CERT_ENV: &str = "DASK_RS_TLS_CERT";
/// Environment variable naming this process's private key file.
pub const KEY_ENV: &str = "DASK_RS_TLS_KEY";
/// Environment variables holding the CA certificate, this process's
/// certificate and its key as PEM text (instead of files).
pub const PEM_ENVS: [&str; 3] = ["DASK_RS_TLS_CA_PEM", "DASK_RS_TLS_CERT_PEM", "DASK_RS_TLS_KEY_PEM"];

/// Where a process's TLS material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster's CA certificate(s).
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// This process's private key; may be the certificate file itself when
    /// that holds the key too.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files named by [`CA_ENV`], [`CERT_ENV`] and [`KEY_ENV`] (the key
    /// defaulting to the certificate file), or `None` when no CA is named.
    pub fn from_env() -> Result<Option<TlsFiles>, SecurityError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let Some(ca) = var(CA_ENV) else {
            if var(CERT_ENV).is_some() || var(KEY_ENV).is_some() {
                return Err(SecurityError::Tls(format!("${CERT_ENV} or ${KEY_ENV} is set but ${CA_ENV} is not")));
            }
            return Ok(None);
        };
        let cert =
            var(CERT_ENV).ok_or_else(|| SecurityError::Tls(format!("${CA_ENV} is set but ${CERT_ENV} is not")))?;
        let key = var(KEY_ENV).unwrap_or_else(|| cert.clone());
        Ok(Some(TlsFiles { ca, cert, key }))
    }

    /// Make a fresh cluster CA and one certificate signed by it for every
    /// process of the cluster, as `ca.pem`, `cert.pem` and `key.pem` in
    /// `dir` (which must exist). The CA's own key is not kept: nothing new
    /// can be signed later, and nothing outside `dir` can impersonate the
    /// cluster. The key file is created 0600.
    pub fn generate(dir: &Path) -> Result<TlsFiles, SecurityError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let err = |e: rcgen::Error| SecurityError::Tls(format!("cannot make certificates: {e}"));
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name.push(DnType::CommonName, "dask-rs cluster CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().map_err(err)?;
        let mut leaf = CertificateParams::new(vec!["dask-rs".to_string()]).map_err(err)?;
        leaf.distinguished_name.push(DnType::CommonName, "dask-rs");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
        let files = TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        let write = |path: &Path, text: &str, mode: u32| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|source| SecurityError::Read { path: path.display().to_string(), source })
        };
        write(&files.ca, &ca_cert.pem(), 0o644)?;
        write(&files.cert, &cert.pem(), 0o644)?;
        write(&files.key, &key.serialize_pem(), 0o600)?;
        Ok(files)
    }
}

/// A process's TLS material as PEM text: the CA certificate(s), its
/// certificate (chain) and its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem").field("ca", &self.ca).field("cert", &self.cert).finish_non_exhaustive()
    }
}

impl TlsPem {
    /// Read `files`, refusing a key file that other users can read or that
    /// another user owns.
    pub fn read(files: &TlsFiles) -> Result<TlsPem, SecurityError> {
        use std::os::unix::fs::MetadataExt;
        let key_path = files.key.display().to_string();
        let meta =
            std::fs::metadata(&files.key).map_err(|source| SecurityError::Read { path: key_path.clone(), source })?;
        if !is_mine(&meta) {
            return Err(SecurityError::Owner(key_path));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(SecurityError::Exposed(key_path));
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| SecurityError::Read { path: p.display().to_string(), source })
        };
        Ok(TlsPem { ca: read(&files.ca)?, cert: read(&files.cert)?, key: read(&files.key)? })
    }

    /// The PEM text in the [`PEM_ENVS`] variables, or `None` when the CA's
    /// is not set.
    pub fn from_env() -> Result<Option<TlsPem>, SecurityError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let [ca, cert, key] = PEM_ENVS.map(var);
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsPem { ca, cert, key })),
            _ => Err(SecurityError::Tls(format!("{} must be set together", PEM_ENVS.join(", ")))),
        }
    }
}

/// Client and server configurations of one process in a TLS cluster.
pub struct Tls {
    /// Where the material came from, for messages.
    origin: String,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("origin", &self.origin).finish()
    }
}

/// ring, with AES-128-GCM preferred: TLS 1.3's mandatory suite, and a
/// third faster than AES-256 on bulk transfers (10 rounds instead of 14).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

impl Tls {
    /// Load `files` and build both configurations (TLS 1.3 only; peers must
    /// present a certificate the CA signed).
    pub fn load(files: TlsFiles) -> Result<Tls, SecurityError> {
        let pem = TlsPem::read(&files)?;
        let named = |what: &str, p: &Path| format!("{what} {}", p.display());
        Tls::build(
            &pem,
            [named("CA file", &files.ca), named("certificate file", &files.cert), named("key file", &files.key)],
        )
    }

    /// Build both configurations from PEM text (see [`Tls::load`]).
    pub fn from_pem(pem: &TlsPem) -> Result<Tls, SecurityError> {
        Tls::build(pem, PEM_ENVS.map(|v| format!("${v}")))
    }

    /// `names`: how to call the CA, certificate and key sources in messages.
    fn build(pem: &TlsPem, names: [String; 3]) -> Result<Tls, SecurityError> {
        let [ca_name, cert_name, key_name] = &names;
        let bad_pem = |name: &String| {
            let name = name.clone();
            move |e: rustls::pki_types::pem::Error| SecurityError::Tls(format!("cannot read the {name}: {e}"))
        };
        let cas: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pem.ca.as_bytes()).collect::<Result<_, _>>().map_err(bad_pem(ca_name))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(bad_pem(cert_name))?;
        if cas.is_empty() || chain.is_empty() {
            let which = if cas.is_empty() { ca_name } else { cert_name };
            return Err(SecurityError::Tls(format!("no certificate in the {which}")));
        }
        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(bad_pem(key_name))?;
        let mut roots = RootCertStore::empty();
        for c in cas {
            roots.add(c).map_err(|e| SecurityError::Tls(format!("bad CA certificate in the {ca_name}: {e}")))?;
        }
        let roots = Arc::new(roots);
        let bad = |e: rustls::Error| SecurityError::Tls(format!("TLS configuration: {e}"));
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| SecurityError::Tls(format!("TLS configuration: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad)?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| SecurityError::Tls(format!("TLS configuration: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignedByClusterCa(servers)))
            .with_client_auth_cert(chain, key)
            .map_err(bad)?;
        Ok(Tls { origin: ca_name.clone(), client: Arc::new(client), server: Arc::new(server) })
    }

    /// Connector for connections this process opens.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    /// Acceptor for connections this process accepts.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// The name a client asks for; never checked against the certificate.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from("dask-rs").expect("a valid DNS name")
    }
}

/// Accepts a server certificate signed by the cluster's CA, whatever host
/// name it was issued for (the chain, validity and signatures are checked
/// as usual).
#[derive(Debug)]
struct SignedByClusterCa(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for SignedByClusterCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // The chain checked out before the name was looked at.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_and_the_key_is_private() {
        let dir = std::env::temp_dir().join(format!("dask-rs-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles::generate(&dir).unwrap();
        let pem = TlsPem::read(&files).unwrap();
        Tls::load(files.clone()).unwrap();
        Tls::from_pem(&pem).unwrap();
        let mut broken = pem.clone();
        broken.key = "not a key".into();
        let err = Tls::from_pem(&broken).unwrap_err().to_string();
        assert!(err.contains("DASK_RS_TLS_KEY_PEM"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Tls::load(files).unwrap_err().to_string();
        assert!(err.contains("other users"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
