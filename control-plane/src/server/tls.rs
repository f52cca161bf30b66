//! The controller's TLS configuration: certificate, key and client CA read from PEM
//! files, and read again whenever they change, so certificates rotate without a restart.
//!
//! Entry point: [`ServerTls::load`], then [`ServerTls::watch`]. Each new connection
//! takes the configuration in force when it arrives; connections already open keep
//! theirs. A change that does not load (a file caught half-written, a key that does not
//! match its certificate) is logged and the previous configuration stays until the
//! files load again.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::files::{self, ReadError};

/// Largest certificate, key or CA bundle file read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Where the controller's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates; with it, every client must
    /// present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS material did not load. Retryable in the sense that a later change of the
/// files may fix it; at start it is fatal.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: ReadError,
    },
    /// A file holds no usable PEM block of the kind expected.
    #[error("the {what} {path} holds no {expected}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// The certificate and key do not make a server configuration (e.g. they do not match).
    #[error("the certificate {cert} and key {key} are not a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// A certificate of the client CA bundle cannot be a trust anchor.
    #[error("the client CA {path} holds a certificate that cannot be a CA: {source}")]
    CaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The client CA bundle does not make a verifier.
    #[error("the client CA {path} cannot verify client certificates: {source}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    files::read_regular(path, MAX_PEM_BYTES).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "valid PEM certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The contents of every file, read once, so that what is checked for change is what
/// is loaded.
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read("certificate", &files.cert)?,
            key: read("key", &files.key)?,
            client_ca: files
                .client_ca
                .as_deref()
                .map(|path| read("client CA", path))
                .transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [&self.cert, &self.key]
            .into_iter()
            .chain(self.client_ca.as_ref())
        {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    fn config(&self, files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates("certificate", &files.cert, &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|_| TlsError::Pem {
            what: "key",
            path: files.key.clone(),
            expected: "private key (PKCS#8, PKCS#1 or SEC1 PEM)",
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match (&files.client_ca, &self.client_ca) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates("client CA", path, pem)? {
                    roots.add(ca).map_err(|source| TlsError::CaCertificate {
                        path: path.clone(),
                        source,
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|source| TlsError::ClientCa {
                            path: path.clone(),
                            source,
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::Pair {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

#[derive(Debug)]
struct Current {
    config: Arc<ServerConfig>,
    /// Digest of the files the configuration was built from.
    loaded: [u8; 32],
    /// Digest of the last files that failed to load, so one bad state is logged once.
    failed: Option<[u8; 32]>,
}

/// The server configuration in force; cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerTls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Current>>,
}

/// What [`ServerTls::reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as last loaded.
    Unchanged,
    /// The files changed and the new configuration is in force.
    Replaced,
}

impl ServerTls {
    /// Reads the files; fails if they do not make a configuration.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let material = Material::read(&files)?;
        let config = material.config(&files)?;
        Ok(Self {
            current: Arc::new(RwLock::new(Current {
                config,
                loaded: material.digest(),
                failed: None,
            })),
            files: Arc::new(files),
        })
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    /// Reads the files again and puts a changed configuration in force. Blocking (file
    /// reads). On error the previous configuration stays.
    pub fn reload(&self) -> Result<Reload, TlsError> {
        let material = Material::read(&self.files)?;
        let digest = material.digest();
        if self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .loaded
            == digest
        {
            return Ok(Reload::Unchanged);
        }
        let result = material.config(&self.files);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(config) => {
                *current = Current {
                    config,
                    loaded: digest,
                    failed: None,
                };
                Ok(Reload::Replaced)
            }
            Err(error) => {
                current.failed = Some(digest);
                Err(error)
            }
        }
    }

    /// Reloads (off the executor) and logs the outcome: a failure once per content.
    async fn reload_and_log(&self) {
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let before = this
                .current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .failed;
            let result = this.reload();
            let after = this
                .current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .failed;
            (result, before != after)
        })
        .await;
        match outcome {
            Ok((Ok(Reload::Replaced), _)) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate, key or client CA changed; new connections use them")
            }
            Ok((Ok(Reload::Unchanged), _)) => {}
            Ok((Err(error), newly_failed)) => {
                // A file caught half-written or missing between two events fails the same
                // way until it is whole again: say it once.
                if newly_failed || !matches!(error, TlsError::Read { .. }) {
                    tracing::warn!(%error, "TLS files changed but do not load; the previous ones stay in force");
                }
            }
            Err(error) => tracing::error!(%error, "TLS reload panicked"),
        }
    }

    /// Watches the files' folders and reloads after each change (Kubernetes updates a
    /// mounted Secret by swapping a symlink in its folder), and every `poll` in case an
    /// event was missed. Runs until the returned task is aborted.
    pub fn watch(&self, poll: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let (events_tx, mut events) = mpsc::channel::<()>(1);
            let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
                // Full means a reload is already due.
                let _ = events_tx.try_send(());
            });
            let mut watcher = match watcher {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(%error, ?poll, "cannot watch the TLS files; polling them only");
                    None
                }
            };
            let files = [
                Some(&this.files.cert),
                Some(&this.files.key),
                this.files.client_ca.as_ref(),
            ];
            for path in files.into_iter().flatten() {
                let folder = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if let Some(w) = watcher.as_mut()
                    && let Err(error) = w.watch(folder, RecursiveMode::NonRecursive)
                {
                    tracing::warn!(%error, folder = %folder.display(), ?poll, "cannot watch a TLS folder; polling it");
                }
            }
            let mut ticks = tokio::time::interval(poll);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    event = events.recv() => {
                        if event.is_none() {
                            break;
                        }
                        // Let a writer finish a burst (key and certificate written in turn).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while events.try_recv().is_ok() {}
                    }
                    _ = ticks.tick() => {}
                }
                this.reload_and_log().await;
            }
            drop(watcher);
        })
    }
}
