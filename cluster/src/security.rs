//! Cluster credentials: the shared secret every connection of a cluster
//! must prove it knows, and the mutual challenge-response that proves it.
//!
//! A cluster's token is 32 random bytes, written as 64 hex digits. It never
//! travels on the wire: in the handshake each side sends a fresh nonce and
//! answers the other's with an HMAC-SHA256 keyed by the token, so a peer that
//! does not hold the token learns nothing it could replay, and a client or
//! worker that reaches an impostor (a process that took a dead scheduler's
//! port) notices before it sends anything else.
//!
//! Processes find the token in `DASK_RS_TOKEN` (the value) or
//! `DASK_RS_TOKEN_FILE` (a file holding it; must not be readable by others).
//! It is never put on a command line, where every user of the machine can
//! read it.

use std::path::Path;
use std::sync::Arc;

use crate::tls::{Tls, TlsFiles, TlsPem};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Environment variable holding a cluster's token.
pub const TOKEN_ENV: &str = "DASK_RS_TOKEN";
/// Environment variable naming a file that holds a cluster's token.
pub const TOKEN_FILE_ENV: &str = "DASK_RS_TOKEN_FILE";
/// Length of a nonce in the handshake.
pub const NONCE_LEN: usize = 16;

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read the token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0} can be read by other users; make it private (chmod 600)")]
    Exposed(String),
    #[error("{0} belongs to another user")]
    Owner(String),
    #[error("invalid token{0}: expected 64 hex digits")]
    Invalid(String),
    #[error("no randomness available from the operating system")]
    Random,
    #[error("{0}")]
    Tls(String),
}

/// The credential a process presents on every connection it opens and
/// demands on every connection it accepts. `Security::default()` is an open
/// cluster: no credential asked, none given.
#[derive(Clone, Default)]
pub struct Security {
    token: Option<Arc<Token>>,
    tls: Option<Arc<Tls>>,
    require_encryption: bool,
}

struct Token {
    text: String,
    key: hmac::Key,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .field("require_encryption", &self.require_encryption)
            .finish()
    }
}

impl Security {
    /// An open cluster (no credential).
    pub fn open() -> Self {
        Security::default()
    }

    /// A fresh random token.
    pub fn generate() -> Result<Self, SecurityError> {
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).map_err(|_| SecurityError::Random)?;
        let text: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self::with_token(&text)
    }

    /// The credential holding `token` (64 hex digits).
    pub fn with_token(token: &str) -> Result<Self, SecurityError> {
        let token = token.trim();
        if token.len() != 64 || !token.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SecurityError::Invalid(String::new()));
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
        Ok(Security { token: Some(Arc::new(Token { text: token.to_ascii_lowercase(), key })), ..Security::default() })
    }

    /// Read a token file, refusing one that other users could read or that
    /// another user owns.
    pub fn from_file(path: &Path) -> Result<Self, SecurityError> {
        use std::os::unix::fs::MetadataExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecurityError::Read { path: shown.clone(), source })?;
        if !is_mine(&meta) {
            return Err(SecurityError::Owner(shown));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(SecurityError::Exposed(shown));
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| SecurityError::Read { path: shown.clone(), source })?;
        Self::with_token(&text).map_err(|_| SecurityError::Invalid(format!(" in {shown}")))
    }

    /// The credentials in the environment: the token ([`TOKEN_ENV`], else
    /// [`TOKEN_FILE_ENV`]) and TLS material ([`crate::tls::PEM_ENVS`], else
    /// the files named by [`crate::tls::CA_ENV`] and its
    /// siblings); an open cluster when none is set.
    pub fn from_env() -> Result<Self, SecurityError> {
        let mut s = if let Some(t) = std::env::var_os(TOKEN_ENV).filter(|v| !v.is_empty()) {
            Self::with_token(&t.to_string_lossy()).map_err(|_| SecurityError::Invalid(format!(" in ${TOKEN_ENV}")))?
        } else if let Some(p) = std::env::var_os(TOKEN_FILE_ENV).filter(|v| !v.is_empty()) {
            Self::from_file(Path::new(&p))?
        } else {
            Self::open()
        };
        if let Some(pem) = TlsPem::from_env()? {
            s = s.with_tls(Tls::from_pem(&pem)?);
        } else if let Some(files) = TlsFiles::from_env()? {
            s = s.with_tls(Tls::load(files)?);
        }
        Ok(s)
    }

    /// These credentials, and TLS with `tls`: this process listens on
    /// `tls://` addresses and opens only encrypted connections.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(Arc::new(tls));
        self.require_encryption = true;
        self
    }

    /// The TLS configuration, when this process speaks TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_deref()
    }

    /// Whether plain `tcp://` connections are refused.
    pub fn requires_encryption(&self) -> bool {
        self.require_encryption
    }

    /// Refuse (`true`) or allow plain `tcp://` connections. Without TLS,
    /// requiring encryption means no connection can be made at all, which
    /// is what a user who asked for it should find out.
    pub fn require_encryption(mut self, require: bool) -> Self {
        self.require_encryption = require;
        self
    }

    /// The scheme of the addresses this process listens on.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "tls"
        } else {
            "tcp"
        }
    }

    /// Write the token to `path`, readable by its owner only.
    pub fn write_token_file(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(t) = &self.token else {
            return Err(std::io::Error::other("an open cluster has no token to write"));
        };
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(t.text.as_bytes())?;
        f.write_all(b"\n")
    }

    /// Whether connections must prove the token.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// The token itself, to hand to a process this one starts (through its
    /// environment, never its command line).
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.text.as_str())
    }

    /// A fresh nonce for the handshake.
    pub fn nonce() -> Vec<u8> {
        let mut n = vec![0u8; NONCE_LEN];
        // The OS random source failing is not something to recover from;
        // fall back to a time-derived nonce, which still differs per call.
        if SystemRandom::new().fill(&mut n).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            n[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
        }
        n
    }

    /// The proof that `side` ("server" or "client") holds the token, bound to
    /// both nonces of this handshake. `None` for an open cluster.
    pub fn prove(&self, side: Side, client_nonce: &[u8], server_nonce: &[u8]) -> Option<Vec<u8>> {
        let t = self.token.as_ref()?;
        Some(hmac::sign(&t.key, &transcript(side, client_nonce, server_nonce)).as_ref().to_vec())
    }

    /// Check `proof` from `side` in constant time.
    pub fn verify(&self, side: Side, client_nonce: &[u8], server_nonce: &[u8], proof: &[u8]) -> bool {
        match &self.token {
            Some(t) => hmac::verify(&t.key, &transcript(side, client_nonce, server_nonce), proof).is_ok(),
            None => false,
        }
    }
}

/// This process's user id.
pub fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Whether the file described by `meta` belongs to this process's user.
pub fn is_mine(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.uid() == my_uid()
}

/// Which side of a handshake a proof comes from (so one side's proof cannot
/// be reflected back as the other's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

fn transcript(side: Side, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    let label: &[u8] = match side {
        Side::Server => b"dask-rs handshake v1 server",
        Side::Client => b"dask-rs handshake v1 client",
    };
    let mut m = Vec::with_capacity(label.len() + 2 + client_nonce.len() + server_nonce.len());
    m.extend_from_slice(label);
    m.push(client_nonce.len() as u8);
    m.extend_from_slice(client_nonce);
    m.push(server_nonce.len() as u8);
    m.extend_from_slice(server_nonce);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_token_side_and_nonces() {
        let a = Security::generate().unwrap();
        let b = Security::generate().unwrap();
        let (cn, sn) = (Security::nonce(), Security::nonce());
        assert_ne!(cn, sn);
        let p = a.prove(Side::Client, &cn, &sn).unwrap();
        assert!(a.verify(Side::Client, &cn, &sn, &p));
        assert!(!a.verify(Side::Server, &cn, &sn, &p), "a client proof is no server proof");
        assert!(!b.verify(Side::Client, &cn, &sn, &p), "another cluster's token");
        assert!(!a.verify(Side::Client, &sn, &cn, &p), "nonces swapped");
        assert!(!Security::open().verify(Side::Client, &cn, &sn, &p));
        assert!(Security::open().prove(Side::Client, &cn, &sn).is_none());
    }

    #[test]
    fn tokens_are_validated_and_hidden() {
        assert!(Security::with_token("abc").is_err());
        assert!(Security::with_token(&"g".repeat(64)).is_err());
        let s = Security::generate().unwrap();
        let t = s.token().unwrap().to_string();
        assert_eq!(t.len(), 64);
        assert!(!format!("{s:?}").contains(&t));
        assert_eq!(Security::with_token(&format!(" {t}\n")).unwrap().token(), Some(t.as_str()));
    }

    #[test]
    fn token_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dask-rs-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let s = Security::generate().unwrap();
        s.write_token_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Security::from_file(&path).unwrap().token(), s.token());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Security::from_file(&path), Err(SecurityError::Exposed(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
