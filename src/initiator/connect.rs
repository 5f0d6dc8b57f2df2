//! The initiator's front door: resolve a URL or a list of portals and log in, with the
//! same options (name, ISID, CHAP, login timeout) for every caller: `holdfast pr`,
//! `ctl`, the agent, the test guest and the demo.
use super::url::IscsiUrl;
use super::{InitiatorConfig, InitiatorError, Session};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Who logs in and how: everything of a login but the target and its address. `Debug`
/// leaves the CHAP secret out.
#[derive(Clone)]
pub struct ConnectOptions {
    pub initiator_name: String,
    /// A fixed ISID makes every login the same I_T nexus (reservations stay with it);
    /// None picks a random one per login.
    pub isid: Option<[u8; 6]>,
    /// One-way CHAP: user name and secret.
    pub chap: Option<(String, Vec<u8>)>,
    /// None keeps [`InitiatorConfig`]'s default.
    pub login_timeout: Option<Duration>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("initiator_name", &self.initiator_name)
            .field("isid", &self.isid)
            .field("chap_user", &self.chap.as_ref().map(|(u, _)| u))
            .field("login_timeout", &self.login_timeout)
            .finish()
    }
}

impl ConnectOptions {
    pub fn new(initiator_name: impl Into<String>) -> Self {
        ConnectOptions {
            initiator_name: initiator_name.into(),
            isid: None,
            chap: None,
            login_timeout: None,
        }
    }

    /// CHAP from a user name and a secret given as text (config files, the command line).
    pub fn with_chap(mut self, user: Option<&str>, secret: Option<&str>) -> Self {
        if let (Some(u), Some(s)) = (user, secret) {
            self.chap = Some((u.to_string(), s.as_bytes().to_vec()));
        }
        self
    }

    /// The login configuration for `target` at `addr`.
    pub fn config(&self, target: &str, addr: SocketAddr) -> InitiatorConfig {
        let mut cfg = InitiatorConfig::new(self.initiator_name.clone(), target, addr);
        cfg.isid = self.isid;
        cfg.chap = self.chap.clone();
        if let Some(t) = self.login_timeout {
            cfg.login_timeout = t;
        }
        cfg
    }
}

/// Why no session could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}:{port}: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("login to {target} at {addr} failed: {source}")]
    Login {
        target: String,
        addr: SocketAddr,
        source: InitiatorError,
    },
    #[error("no portal to log in to {target}")]
    NoPortal { target: String },
}

impl ConnectError {
    /// The initiator's error, when the failure was the login itself.
    pub fn initiator_error(&self) -> Option<&InitiatorError> {
        match self {
            ConnectError::Login { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The first address `host:port` resolves to (blocking: for command-line set-up).
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, ConnectError> {
    let err = |source| ConnectError::Resolve {
        host: host.to_string(),
        port,
        source,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })
}

/// The login configuration for the URL's target at the first address of its host.
pub fn resolve_url(url: &IscsiUrl, opts: &ConnectOptions) -> Result<InitiatorConfig, ConnectError> {
    let addr = resolve(&url.host, url.port)?;
    Ok(opts.config(&url.target, addr))
}

/// Log in to the URL's target (the LUN is the caller's business).
pub async fn connect(url: &IscsiUrl, opts: &ConnectOptions) -> Result<Session, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: url.host.clone(),
            port: url.port,
            source,
        })?
        .collect();
    connect_portals(&url.target, &addrs, opts)
        .await
        .map(|(s, _)| s)
}

/// Log in through the first portal that accepts, trying them in order; the error of
/// the last attempt when none does.
pub async fn connect_portals(
    target: &str,
    portals: &[SocketAddr],
    opts: &ConnectOptions,
) -> Result<(Session, SocketAddr), ConnectError> {
    let mut last = ConnectError::NoPortal {
        target: target.to_string(),
    };
    for &addr in portals {
        match Session::login(opts.config(target, addr)).await {
            Ok(s) => return Ok((s, addr)),
            Err(source) => {
                tracing::debug!(%addr, error = %source, "login failed");
                last = ConnectError::Login {
                    target: target.to_string(),
                    addr,
                    source,
                };
            }
        }
    }
    Err(last)
}
