//! The admin socket: a Unix socket (mode 0600; a peer must be root or the target's own
//! user) taking one JSON request per line (`{"cmd":"reload"}`, `sessions`, `luns`,
//! `show`) and answering each with one JSON line (`"ok": true|false`).

use super::config::{ConfigError, ValidConfig};
use super::live::{self, ReloadError};
use super::runtime::Runtime;
use serde::Deserialize;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Longest request line accepted (requests are a few dozen bytes).
const MAX_REQUEST: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path} is in use: another target is running")]
    InUse { path: PathBuf },
}

/// One request on the admin socket.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum AdminRequest {
    /// Re-read the configuration file, plan, apply or refuse.
    Reload,
    Sessions,
    Luns,
    Show,
}

/// Re-reads the configuration the target was started with.
pub type ConfigSource = dyn Fn() -> Result<ValidConfig, ConfigError> + Send + Sync;

/// A bound admin socket.
pub struct AdminSocket {
    path: PathBuf,
    listener: UnixListener,
    /// Owner of the socket file: our own user, allowed besides root.
    owner: u32,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AdminError + '_ {
    move |source| AdminError::Io {
        path: path.into(),
        source,
    }
}

impl AdminSocket {
    /// Bind `path` (mode 0600), replacing a stale socket left by a target that died.
    pub async fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_error(path))?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(AdminError::InUse { path: path.into() });
            }
            std::fs::remove_file(path).map_err(io_error(path))?;
        }
        let listener = UnixListener::bind(path).map_err(io_error(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(path))?;
        let owner = std::fs::metadata(path).map_err(io_error(path))?.uid();
        Ok(AdminSocket {
            path: path.into(),
            listener,
            owner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer requests until `shutdown` turns true; then remove the socket file.
    pub async fn serve(
        self,
        rt: Arc<Runtime>,
        source: Arc<ConfigSource>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let stop = async move {
            let _ = shutdown.wait_for(|v| *v).await;
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = self.listener.accept() => match r {
                    Ok((s, _)) if self.allowed(&s) => {
                        tokio::spawn(answer(s, rt.clone(), source.clone()));
                    }
                    Ok(_) => tracing::warn!("admin socket: peer refused (not root, not our user)"),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn allowed(&self, s: &UnixStream) -> bool {
        s.peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == self.owner)
    }
}

/// Serve one client: a reply per request line, until it closes.
async fn answer(s: UnixStream, rt: Arc<Runtime>, source: Arc<ConfigSource>) {
    let (rd, mut wr) = s.into_split();
    let mut lines = BufReader::new(rd.take(1 << 20)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = if line.len() > MAX_REQUEST {
            failure("request too long")
        } else {
            match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => handle(&rt, &*source, req).await,
                Err(e) => failure(&format!("bad request: {e}")),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn failure(error: &str) -> Value {
    json!({ "ok": false, "error": error })
}

/// Answer one request.
pub async fn handle(rt: &Runtime, source: &ConfigSource, req: AdminRequest) -> Value {
    match req {
        AdminRequest::Reload => reload_reply(reload(rt, source).await),
        AdminRequest::Sessions => json!({ "ok": true, "sessions": sessions(rt) }),
        AdminRequest::Luns => json!({ "ok": true, "luns": luns(rt) }),
        AdminRequest::Show => show(rt),
    }
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadFailure {
    #[error("reload failed, nothing applied: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

impl ReloadFailure {
    pub fn is_refusal(&self) -> bool {
        matches!(self, ReloadFailure::Reload(ReloadError::Refused(_)))
    }
}

/// Re-read the configuration and apply it (the admin `reload` and SIGHUP), logging the
/// outcome; returns the applied changes, as text.
pub async fn reload(rt: &Runtime, source: &ConfigSource) -> Result<Vec<String>, ReloadFailure> {
    let r = match source() {
        Ok(cfg) => live::reload(rt, cfg).await.map_err(ReloadFailure::from),
        Err(e) => Err(e.into()),
    };
    match &r {
        Ok(c) if c.is_empty() => tracing::info!("reload: nothing changed"),
        Ok(c) => tracing::info!(changes = c.len(), "reload applied"),
        Err(e) => tracing::warn!(error = %e, "reload not applied"),
    }
    r.map(|c| c.iter().map(ToString::to_string).collect())
}

fn reload_reply(r: Result<Vec<String>, ReloadFailure>) -> Value {
    match r {
        Ok(changes) => json!({ "ok": true, "changes": changes }),
        Err(e) => json!({ "ok": false, "refused": e.is_refusal(), "error": e.to_string() }),
    }
}

fn sessions(rt: &Runtime) -> Vec<Value> {
    rt.live
        .sessions()
        .iter()
        .map(|s| {
            let since = s.since.duration_since(UNIX_EPOCH).unwrap_or_default();
            json!({
                "target": s.nexus.target_name,
                "initiator": s.nexus.initiator_name,
                "isid": hex::encode(s.nexus.isid),
                "tsih": s.tsih,
                "tpgt": s.nexus.tpgt,
                "luns": s.current().ids(),
                "since": since.as_secs(),
            })
        })
        .collect()
}

fn luns(rt: &Runtime) -> Vec<Value> {
    let backends = rt.live.backends();
    let mut out = Vec::new();
    for t in &rt.served().targets {
        for (id, lu) in &t.luns {
            let path = backends
                .iter()
                .find(|(n, l, _)| *n == t.name && l == id)
                .map(|(_, _, b)| b.describe());
            let s = lu.settings();
            out.push(json!({
                "target": t.name,
                "lun": id,
                "path": path,
                "size": lu.num_blocks() * u64::from(s.block_size),
                "block_size": s.block_size,
                "blocks": lu.num_blocks(),
                "serial": s.serial,
                "read_only": s.read_only,
            }));
        }
    }
    out
}

fn show(rt: &Runtime) -> Value {
    let cfg = rt.live.config();
    let served = rt.served();
    let targets: Vec<Value> = served
        .targets
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "alias": t.alias,
                "portals": t.portals.iter().map(|(a, tpgt)| format!("{a},{tpgt}")).collect::<Vec<_>>(),
                "luns": t.luns.keys().collect::<Vec<_>>(),
                "acl": t.acl.iter().map(|a| json!({ "initiator": a.initiator, "luns": a.luns, "chap": a.chap.is_some() })).collect::<Vec<_>>(),
                "chap": t.chap.is_some(),
            })
        })
        .collect();
    json!({
        "ok": true,
        "config": cfg.source,
        "data_dir": cfg.data_dir.display().to_string(),
        "admin_socket": cfg.admin_socket.display().to_string(),
        "discovery_chap": served.discovery_chap.is_some(),
        "targets": targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object_naming_the_command() {
        let parse = |s: &str| serde_json::from_str::<AdminRequest>(s);
        assert_eq!(parse(r#"{"cmd":"reload"}"#).unwrap(), AdminRequest::Reload);
        assert_eq!(parse(r#"{"cmd":"luns"}"#).unwrap(), AdminRequest::Luns);
        assert!(parse(r#"{"cmd":"shutdown"}"#).is_err());
        assert!(parse(r#"{"command":"show"}"#).is_err());
    }
}
