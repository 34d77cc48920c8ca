//! What a worker needs to join a protected cluster, and how each kind of
//! backend hands it over without putting a secret on a command line: as
//! paths in the environment for workers that share our files (local
//! processes, batch jobs on a shared file system), as text on the standard
//! input of the remote shell for ssh hosts.

use std::path::PathBuf;

use cluster::security::{TOKEN_ENV, TOKEN_FILE_ENV};
use cluster::tls::{TlsFiles, TlsPem, CA_ENV, CERT_ENV, KEY_ENV, PEM_ENVS};

use crate::BackendError;

/// The cluster's credential files (all private to their owner).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The token file.
    pub token_file: Option<PathBuf>,
    /// The CA certificate and the certificate and key every process presents.
    pub tls: Option<TlsFiles>,
}

impl Credentials {
    /// No credentials: an open cluster.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether workers are given anything.
    pub fn is_empty(&self) -> bool {
        self.token_file.is_none() && self.tls.is_none()
    }

    /// The variables naming the files, for a worker that sees them.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let mut env = Vec::new();
        if let Some(f) = &self.token_file {
            env.push((TOKEN_FILE_ENV, f.clone()));
        }
        if let Some(t) = &self.tls {
            env.extend([(CA_ENV, t.ca.clone()), (CERT_ENV, t.cert.clone()), (KEY_ENV, t.key.clone())]);
        }
        env
    }

    /// Variables that must not leak into a worker from our own environment
    /// (they would take precedence over, or contradict, [`Credentials::env`]).
    pub fn shadowed() -> [&'static str; 4] {
        [TOKEN_ENV, PEM_ENVS[0], PEM_ENVS[1], PEM_ENVS[2]]
    }

    /// The text a remote shell reads on its standard input (see
    /// [`Credentials::stdin_script`]): the token on one line, then the CA,
    /// certificate and key PEM blocks.
    pub fn stdin_text(&self) -> Result<Option<String>, BackendError> {
        if self.is_empty() {
            return Ok(None);
        }
        let fail = |e: cluster::security::SecurityError| BackendError::ScaleUp(format!("cluster credentials: {e}"));
        let mut text = String::new();
        if let Some(f) = &self.token_file {
            let s = cluster::security::Security::from_file(f).map_err(fail)?;
            text.push_str(s.token().unwrap_or_default());
            text.push('\n');
        }
        if let Some(files) = &self.tls {
            let pem = TlsPem::read(files).map_err(fail)?;
            for block in [&pem.ca, &pem.cert, &pem.key] {
                // One block each: the shell reads up to its END line.
                if block.matches("-----END").count() != 1 {
                    return Err(BackendError::ScaleUp(format!(
                        "cluster credentials in {}: the ssh backend sends one PEM block per file",
                        files.ca.display()
                    )));
                }
                text.push_str(block.trim_end());
                text.push('\n');
            }
        }
        Ok(Some(text))
    }

    /// Shell lines that read [`Credentials::stdin_text`] into the worker's
    /// environment (never onto a command line or into a file).
    pub fn stdin_script(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.token_file.is_some() {
            lines.push(format!(
                "IFS= read -r {TOKEN_ENV} || {{ echo 'no cluster token on stdin' >&2; exit 1; }}; export {TOKEN_ENV}"
            ));
        }
        if self.tls.is_some() {
            lines.push(
                r#"pem() { v=; while IFS= read -r l; do v="$v$l
"; case $l in -----END*) printf %s "$v"; return 0;; esac; done; echo 'no cluster certificate on stdin' >&2; return 1; }"#
                    .into(),
            );
            for var in PEM_ENVS {
                lines.push(format!("{var}=$(pem) || exit 1; export {var}"));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remote_shell_gets_the_credentials_from_stdin_and_nothing_on_its_command_line() {
        let dir = std::env::temp_dir().join(format!("dask-rs-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles::generate(&dir).unwrap();
        let token = cluster::security::Security::generate().unwrap();
        token.write_token_file(&dir.join("token")).unwrap();
        let creds = Credentials { token_file: Some(dir.join("token")), tls: Some(files.clone()) };
        let text = creds.stdin_text().unwrap().unwrap();
        let script = creds.stdin_script().join("; ");
        assert!(!script.contains(token.token().unwrap()));
        let pem = TlsPem::read(&files).unwrap();
        assert!(!script.contains(pem.key.trim()));
        // Run the lines in a real shell and look at what it exported.
        let show = format!(
            "{script}; printf '%s\\n--\\n' \"${TOKEN_ENV}\" \"${}\" \"${}\" \"${}\"",
            PEM_ENVS[0], PEM_ENVS[1], PEM_ENVS[2]
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &show])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let parts: Vec<&str> = out.split("\n--\n").collect();
        assert_eq!(parts[0], token.token().unwrap());
        assert_eq!(parts[1].trim(), pem.ca.trim());
        assert_eq!(parts[2].trim(), pem.cert.trim());
        assert_eq!(parts[3].trim(), pem.key.trim());
        // What the shell read loads as this cluster's TLS configuration.
        let read = TlsPem { ca: parts[1].into(), cert: parts[2].into(), key: parts[3].into() };
        cluster::tls::Tls::from_pem(&read).unwrap();
        // A shell given nothing fails instead of starting an open worker.
        let status = std::process::Command::new("sh")
            .args(["-c", &format!("{script}; echo started")])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!status.status.success());
        assert!(!String::from_utf8_lossy(&status.stdout).contains("started"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
