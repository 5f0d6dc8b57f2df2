//! The login phase of one connection: the login machine fed from the socket, with the
//! runtime (targets, ACLs, CHAP, the session registry) as its authority.

use super::ConnError;
use crate::iscsi::login::{
    ChapCredentials, Leading, LoginAuthority, LoginMachine, LoginOutcome, LoginStatus, LoginStep,
    TargetPolicy,
};
use crate::server::limits::SessionSlot;
use crate::server::runtime::Runtime;
use crate::server::session::SessionRegistry;
use crate::wire::{self, DigestConfig, PduDecoder, PduWriter, ReadError};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tracing::warn;

/// Login checks against the runtime, for a connection that arrived on `listen`.
struct Authority<'a> {
    rt: &'a Runtime,
    reg: &'a SessionRegistry,
    listen: SocketAddr,
    /// The session slot reserved when the login completes.
    slot: Option<SessionSlot>,
}

impl Authority<'_> {
    /// The policy of the target `lead` names (its alias, CHAP secrets, key policy), and
    /// whether CHAP is demanded (for the CHAP failure count, even when locked out).
    fn choose(&self, lead: &Leading) -> (Result<TargetPolicy, LoginStatus>, bool) {
        let chap = match lead.authorize(self) {
            Ok(chap) => chap,
            Err(s) => return (Err(s), false),
        };
        let demanded = chap.is_some();
        if demanded
            && self
                .rt
                .limits
                .chap_locked(&lead.initiator_name, Instant::now())
        {
            warn!(
                initiator = %lead.initiator_name,
                "login refused: CHAP locked out after repeated failures"
            );
            return (Err(LoginStatus::AUTH_FAILURE), demanded);
        }
        let mut keys = self.rt.key_policy.clone();
        // The alias is per target.
        if let Some(node) = lead.target_name.as_deref().and_then(|t| self.rt.target(t)) {
            keys.target_alias = node.alias.clone();
        }
        (Ok(TargetPolicy { keys, chap }), demanded)
    }
}

impl LoginAuthority for Authority<'_> {
    fn normal_session(
        &self,
        target: &str,
        initiator: &str,
    ) -> Result<Option<ChapCredentials>, LoginStatus> {
        self.rt.authorize_normal(self.listen, target, initiator)
    }
    fn discovery_session(&self, _initiator: &str) -> Result<Option<ChapCredentials>, LoginStatus> {
        Ok(self.rt.served().discovery_chap.clone())
    }
    fn resolve_tsih(&mut self, lead: &Leading) -> Result<u16, LoginStatus> {
        // Called once, just before the login succeeds: the place to take a session slot.
        let initiator = lead.initiator_name.as_str();
        let slot = self
            .rt
            .limits
            .session(initiator, lead.isid, lead.target_name.as_deref())?;
        self.slot = Some(slot);
        if lead.tsih == 0 {
            Ok(self.reg.allocate_tsih())
        } else if self.reg.has_tsih(initiator, lead.isid, lead.tsih) {
            Ok(lead.tsih)
        } else {
            Err(LoginStatus::SESSION_DOES_NOT_EXIST)
        }
    }
    fn tpgt(&self) -> u16 {
        self.rt
            .served()
            .targets
            .iter()
            .find_map(|t| t.tpgt_on(self.listen))
            .unwrap_or(1)
    }
}

pub(super) async fn login_phase(
    rt: &Runtime,
    reg: &SessionRegistry,
    listen: SocketAddr,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    dec: &mut PduDecoder,
) -> Result<(LoginOutcome, Option<SessionSlot>), ConnError> {
    let mut auth = Authority {
        rt,
        reg,
        listen,
        slot: None,
    };
    let mut machine = LoginMachine::new();
    // Login PDUs carry no digests (RFC 7143 §13.1).
    let mut out = PduWriter::new(DigestConfig::default());
    // Initiator of the leading request and whether its target demanded CHAP.
    let mut who: Option<(String, bool)> = None;
    // The target it names (None: discovery), for the CHAP failure count.
    let mut target: Option<String> = None;
    loop {
        let pdu = match wire::read_pdu(rd, buf, dec).await {
            Ok(p) => p,
            Err(ReadError::Wire(e)) => {
                warn!(error = %e, "malformed PDU during login; dropping connection");
                return Err(ReadError::Wire(e).into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut step = machine.on_pdu(&pdu, &mut auth);
        if let LoginStep::ChooseTarget(lead) = &step {
            let (policy, chap) = auth.choose(lead);
            if policy.is_ok() || chap {
                who = Some((lead.initiator_name.clone(), chap));
                target = lead.target_name.clone();
            }
            step = machine.choose(policy, &mut auth);
        }
        match step {
            LoginStep::Continue(resp) => out.send(wr, resp).await?,
            LoginStep::ChooseTarget(_) => unreachable!("the target was just chosen"),
            LoginStep::Complete(resp, outcome) => {
                out.send(wr, resp).await?;
                return Ok((*outcome, auth.slot.take()));
            }
            LoginStep::Fail(resp, error) => {
                let initiator = who.as_ref().map_or("?", |w| w.0.as_str()).to_string();
                let status = error.status();
                warn!(
                    initiator,
                    status_class = status.class,
                    status_detail = status.detail,
                    reason = %error,
                    "login refused"
                );
                let chap = who.as_ref().is_some_and(|w| w.1);
                if let Some(m) = &rt.metrics {
                    m.login_failed(status.class, status.detail);
                    if chap && status == LoginStatus::AUTH_FAILURE {
                        m.chap_failed(target.as_deref());
                    }
                }
                if chap
                    && status == LoginStatus::AUTH_FAILURE
                    && rt.limits.chap_failed(&initiator, Instant::now())
                {
                    warn!(
                        initiator,
                        failures = rt.limits.settings.chap_max_failures,
                        lockout_secs = rt.limits.settings.chap_lockout_secs,
                        "repeated CHAP failures: initiator locked out"
                    );
                }
                out.send(wr, resp).await?;
                let _ = wr.shutdown().await;
                return Err(ConnError::LoginFailed);
            }
        }
    }
}
