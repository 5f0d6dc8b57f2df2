//! `holdfast pr URL ACTION`: persistent reservations from the command line, in the
//! manner of sg_persist, over holdfast's own initiator (no kernel initiator needed).
//!
//! Each invocation logs in, runs one PR command and logs out. The I_T nexus is
//! (initiator name, ISID); both default to fixed values (see [`DEFAULT_ISID`]) so that
//! a REGISTER from one invocation and a RESERVE from the next come from the same nexus,
//! as a fencing script expects.
//!
//! RESERVATION CONFLICT is an expected outcome in fencing and cluster validation, so it
//! has its own exit status, [`EXIT_RESERVATION_CONFLICT`] (24, as sg_persist).

use super::SessionError;
use crate::initiator::pr::{parse_isid, Capabilities, FullStatus, Reservation};
pub use crate::initiator::url::{IscsiUrl, UrlError};
use crate::initiator::{
    connect, random_isid, ConnectError, ConnectOptions, InitiatorConfig, InitiatorError, PrType,
    RegisterFlags, Session, TransportId,
};
use crate::iscsi::name::parse_iscsi_name;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Exit status for RESERVATION CONFLICT (sg_persist's SG_LIB_CAT_RES_CONFLICT).
pub const EXIT_RESERVATION_CONFLICT: i32 = 24;
/// Exit status for every other failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for a bad command line (URL, missing or conflicting options).
pub const EXIT_USAGE: i32 = 2;
/// The ISID used unless `--isid` says otherwise: "random" format (T=10b) bytes spelling
/// "hfpr", fixed so that consecutive invocations are one I_T nexus.
pub const DEFAULT_ISID: [u8; 6] = [0x80, 0x68, 0x66, 0x70, 0x72, 0x01];

/// A PR action (sg_persist's --in/--out service actions, plus a write probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrAction {
    /// PR IN READ KEYS
    ReadKeys,
    /// PR IN READ RESERVATION (with --key: says whether that key holds it)
    ReadReservation,
    /// PR IN READ FULL STATUS
    ReadFullStatus,
    /// PR IN REPORT CAPABILITIES
    Capabilities,
    /// REGISTER --key OLD (0 if unregistered) --sa-key NEW (0 unregisters)
    Register,
    /// REGISTER AND IGNORE EXISTING KEY --sa-key NEW (0 unregisters)
    RegisterIgnore,
    /// RESERVE --key K --type T
    Reserve,
    /// RELEASE --key K --type T
    Release,
    /// CLEAR --key K
    Clear,
    /// PREEMPT --key K --sa-key VICTIM --type T
    Preempt,
    /// PREEMPT AND ABORT --key K --sa-key VICTIM --type T
    PreemptAbort,
    /// REGISTER AND MOVE --key K --sa-key NEW --type T --rel-tgt-port P --transport-id ID
    RegisterMove,
    /// REPLACE LOST RESERVATION --key K --type T
    ReplaceLost,
    /// Write one block at --lba (test helper: shows whether this nexus may write)
    #[value(hide = true)]
    WriteTest,
}

impl PrAction {
    /// Whether the action's parameters include a reservation type (`--type`).
    fn needs_type(self) -> bool {
        use PrAction::*;
        matches!(
            self,
            Reserve | Release | Preempt | PreemptAbort | RegisterMove | ReplaceLost
        )
    }

    /// Whether the action's parameters include a service action key (`--sa-key`).
    fn needs_sa_key(self) -> bool {
        use PrAction::*;
        matches!(
            self,
            Register | RegisterIgnore | Preempt | PreemptAbort | RegisterMove
        )
    }

    /// The name on the command line, e.g. `preempt-abort`.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    fn command_name(self) -> &'static str {
        match self {
            PrAction::ReadKeys => "Read keys",
            PrAction::ReadReservation => "Read reservation",
            PrAction::ReadFullStatus => "Read full status",
            PrAction::Capabilities => "Report capabilities",
            PrAction::Register => "Register",
            PrAction::RegisterIgnore => "Register and ignore existing key",
            PrAction::Reserve => "Reserve",
            PrAction::Release => "Release",
            PrAction::Clear => "Clear",
            PrAction::Preempt => "Preempt",
            PrAction::PreemptAbort => "Preempt and abort",
            PrAction::RegisterMove => "Register and move",
            PrAction::ReplaceLost => "Replace lost reservation",
            PrAction::WriteTest => "Write test",
        }
    }
}

/// Arguments of `holdfast pr`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Keys are hexadecimal as in sg_persist (0x optional: 3abe0001 = 0x3abe0001); write \
dec:NUMBER for decimal.\n\
Exit status: 0 success, 24 RESERVATION CONFLICT (an expected answer when fencing), \
1 any other error, 2 bad usage.")]
pub struct PrArgs {
    /// iscsi://HOST[:PORT]/TARGET-IQN/LUN (PORT defaults to 3260; IPv6 as [ADDR])
    pub url: String,
    /// What to do
    #[arg(value_enum)]
    pub action: PrAction,
    /// Reservation type: write-exclusive|we|1, exclusive-access|ea|3,
    /// write-exclusive-registrants-only|we-ro|5, exclusive-access-registrants-only|ea-ro|6,
    /// write-exclusive-all-registrants|we-ar|7, exclusive-access-all-registrants|ea-ar|8
    #[arg(long = "type", short = 'T', value_parser = parse_type)]
    pub type_: Option<PrType>,
    /// This nexus's reservation key (RESERVATION KEY field; 0 when unregistered)
    #[arg(long, short = 'K', value_parser = parse_key, default_value = "0")]
    pub key: u64,
    /// SERVICE ACTION RESERVATION KEY: the new key (register) or the victim (preempt)
    #[arg(long, short = 'S', value_parser = parse_key)]
    pub sa_key: Option<u64>,
    /// Activate persist through power loss (register, register-ignore, register-move)
    #[arg(long)]
    pub aptpl: bool,
    /// Register on every target port (register, register-ignore)
    #[arg(long)]
    pub all_tg_pt: bool,
    /// Also register this initiator: NAME (every ISID) or NAME,i,0xISID (register only;
    /// repeatable)
    #[arg(long, value_parser = parse_transport_id)]
    pub spec_i_pt: Vec<TransportId>,
    /// Relative target port (= TPGT) to move the reservation to (register-move)
    #[arg(long)]
    pub rel_tgt_port: Option<u16>,
    /// Destination initiator port NAME,i,0xISID (register-move)
    #[arg(long, value_parser = parse_transport_id)]
    pub transport_id: Option<TransportId>,
    /// Unregister this nexus after moving the reservation (register-move)
    #[arg(long)]
    pub unreg: bool,
    /// Logical block to write (write-test)
    #[arg(long, default_value_t = 0, hide = true)]
    pub lba: u64,
    /// Our iSCSI initiator name [default: iqn.2026-11.org.holdfast:pr-HOSTNAME]
    #[arg(long, value_parser = parse_iscsi_name)]
    pub initiator_name: Option<String>,
    /// ISID in hex (12 digits, 0x optional), or "random"; with the initiator name it
    /// identifies the I_T nexus, so keep it fixed across invocations [default: 0x806866707201]
    #[arg(long)]
    pub isid: Option<String>,
    #[command(flatten)]
    pub chap: crate::cli::chap_args::ChapArgs,
    /// Seconds the whole command (connect, login, command, logout) may take
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Machine-readable output (JSON on stdout, also for errors)
    #[arg(long)]
    pub json: bool,
}

/// `--key`/`--sa-key` values: hex (sg_persist's convention, `0x` optional) or `dec:N`.
pub fn parse_key(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(d) = t.strip_prefix("dec:") {
        return d
            .parse::<u64>()
            .map_err(|e| format!("{s:?} is not a decimal key: {e}"));
    }
    let h = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if h.is_empty() || h.len() > 16 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a key: up to 16 hex digits (0x optional), or dec:NUMBER"
        ));
    }
    u64::from_str_radix(h, 16).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_type(s: &str) -> Result<PrType, String> {
    s.parse::<PrType>().map_err(|e| e.to_string())
}

fn parse_transport_id(s: &str) -> Result<TransportId, String> {
    s.parse::<TransportId>().map_err(|e| e.to_string())
}

/// What went wrong; [`PrCommandError::exit_code`] maps it to the exit status.
#[derive(Debug, thiserror::Error)]
pub enum PrCommandError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("timed out after {0} s")]
    Timeout(u64),
}

session_error_sources!(PrCommandError);

impl PrCommandError {
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, PrCommandError::Session(e) if e.is_reservation_conflict())
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            _ if self.is_reservation_conflict() => EXIT_RESERVATION_CONFLICT,
            // The same status clap uses for a bad command line.
            PrCommandError::Session(e) if e.is_usage() => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// The JSON printed for this error with `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": false,
            "error": self.to_string(),
            "reservation_conflict": self.is_reservation_conflict(),
            "exit_code": self.exit_code(),
        })
    }
}

/// A reservation key, shown and serialised as hex (JSON numbers lose precision above
/// 2^53, and sg_persist users read keys in hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(pub u64);

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// The result of a successful action; `Display` is the human (sg_persist-like) form,
/// `Serialize` the `--json` form.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PrOutcome {
    ReadKeys {
        generation: u32,
        keys: Vec<Key>,
    },
    ReadReservation {
        generation: u32,
        reservation: Option<Reservation>,
        /// With `--key`: whether the reservation is held by that key.
        #[serde(skip_serializing_if = "Option::is_none")]
        held_by_key: Option<bool>,
    },
    ReadFullStatus {
        generation: u32,
        registrations: Vec<FullStatus>,
    },
    Capabilities {
        capabilities: Capabilities,
    },
    Prout {
        service_action: &'static str,
    },
    WriteTest {
        lba: u64,
        block_size: u32,
    },
}

impl PrOutcome {
    /// The `--json` form: `{"ok": true, "action": "read-keys", ...fields}`.
    pub fn to_json(&self, action: PrAction) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("ok".into(), true.into());
            o.insert("action".into(), action.name().into());
        }
        v
    }
}

impl fmt::Display for PrOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrOutcome::ReadKeys { generation, keys } => fmt_keys(f, *generation, keys),
            PrOutcome::ReadReservation {
                generation,
                reservation,
                held_by_key,
            } => fmt_reservation(f, *generation, reservation.as_ref(), *held_by_key),
            PrOutcome::ReadFullStatus {
                generation,
                registrations,
            } => {
                writeln!(f, "  PR generation={generation:#x}")?;
                if registrations.is_empty() {
                    writeln!(f, "    No full status descriptors")?;
                }
                registrations
                    .iter()
                    .try_for_each(|r| fmt_registration(f, r))
            }
            PrOutcome::Capabilities { capabilities: c } => fmt_capabilities(f, c),
            PrOutcome::Prout { service_action } => {
                writeln!(f, "PR out: command ({service_action}) successful")
            }
            PrOutcome::WriteTest { lba, block_size } => {
                writeln!(f, "wrote 1 block ({block_size} bytes) at LBA {lba}")
            }
        }
    }
}

// The human forms follow sg_persist's, so that scripts and eyes used to it read them.

fn fmt_keys(f: &mut fmt::Formatter<'_>, generation: u32, keys: &[Key]) -> fmt::Result {
    if keys.is_empty() {
        return writeln!(
            f,
            "  PR generation={generation:#x}, there are NO registered reservation keys"
        );
    }
    writeln!(
        f,
        "  PR generation={generation:#x}, {} registered reservation key{} follow{}:",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" },
        if keys.len() == 1 { "s" } else { "" },
    )?;
    keys.iter().try_for_each(|k| writeln!(f, "    {:#x}", k.0))
}

fn fmt_reservation(
    f: &mut fmt::Formatter<'_>,
    generation: u32,
    reservation: Option<&Reservation>,
    held_by_key: Option<bool>,
) -> fmt::Result {
    let Some(r) = reservation else {
        return writeln!(
            f,
            "  PR generation={generation:#x}, there is NO reservation held"
        );
    };
    writeln!(f, "  PR generation={generation:#x}, Reservation follows:")?;
    writeln!(f, "    Key={:#x}", r.key)?;
    writeln!(
        f,
        "    scope: {},  type: {}",
        scope_name(r.scope),
        r.type_.description()
    )?;
    match held_by_key {
        Some(true) => writeln!(f, "    held by this key"),
        Some(false) => writeln!(f, "    held by another key"),
        None => Ok(()),
    }
}

/// One descriptor of READ FULL STATUS.
fn fmt_registration(f: &mut fmt::Formatter<'_>, r: &FullStatus) -> fmt::Result {
    writeln!(f, "    Key={:#x}", r.key)?;
    writeln!(
        f,
        "      All target ports bit {}",
        if r.all_tg_pt { "set" } else { "clear" }
    )?;
    writeln!(
        f,
        "      Relative port address: {:#x}",
        r.relative_target_port
    )?;
    match (r.holder, r.type_) {
        (true, Some(t)) => {
            writeln!(f, "      << Reservation holder >>")?;
            writeln!(
                f,
                "      scope: {},  type: {}",
                scope_name(r.scope),
                t.description()
            )?;
        }
        (true, None) => writeln!(f, "      << Reservation holder >>")?,
        (false, _) => writeln!(f, "      not reservation holder")?,
    }
    writeln!(f, "      Transport Id of initiator:")?;
    match r.transport_id.isid {
        Some(_) => writeln!(f, "        iSCSI name and session id: {}", r.transport_id),
        None => writeln!(f, "        iSCSI name: {}", r.transport_id),
    }
}

fn fmt_capabilities(f: &mut fmt::Formatter<'_>, c: &Capabilities) -> fmt::Result {
    let b = u8::from;
    writeln!(f, "Report capabilities response:")?;
    let bits = [
        ("Replace Lost Reservation Capable(RLR_C)", c.rlr_c),
        ("Compatible Reservation Handling(CRH)", c.crh),
        ("Specify Initiator Ports Capable(SIP_C)", c.sip_c),
        ("All Target Ports Capable(ATP_C)", c.atp_c),
        ("Persist Through Power Loss Capable(PTPL_C)", c.ptpl_c),
        ("Type Mask Valid(TMV)", c.tmv),
    ];
    for (name, bit) in bits {
        writeln!(f, "  {name}: {}", b(bit))?;
    }
    writeln!(f, "  Allow Commands: {}", c.allow_commands)?;
    writeln!(
        f,
        "  Persist Through Power Loss Active(PTPL_A): {}",
        b(c.ptpl_a)
    )?;
    if c.tmv {
        writeln!(f, "    Support indicated in Type mask:")?;
        for t in PrType::ALL {
            writeln!(f, "      {}: {}", t.description(), b(c.types.contains(&t)))?;
        }
    }
    Ok(())
}

fn scope_name(scope: u8) -> String {
    match scope {
        0 => "LU_SCOPE".to_string(),
        s => format!("scope {s:#x}"),
    }
}

/// `iqn.2026-11.org.holdfast:pr-<hostname>`, the hostname reduced to what an iSCSI
/// name may contain.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let host: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .collect();
    let host = if host.is_empty() {
        "localhost".into()
    } else {
        host
    };
    format!("iqn.2026-11.org.holdfast:pr-{host}")
}

/// The options each action needs, checked before anything touches the network.
fn validate(a: &PrArgs) -> Result<(), PrCommandError> {
    let usage = |m: String| Err(SessionError::Usage(m).into());
    let act = a.action;
    for (needed, given, option) in [
        (act.needs_type(), a.type_.is_some(), "--type"),
        (act.needs_sa_key(), a.sa_key.is_some(), "--sa-key"),
    ] {
        if needed && !given {
            return usage(format!("{} needs {option}", act.name()));
        }
    }
    if !a.spec_i_pt.is_empty() && act != PrAction::Register {
        return usage("--spec-i-pt is only allowed with register".into());
    }
    if (a.all_tg_pt || a.aptpl)
        && !matches!(
            act,
            PrAction::Register | PrAction::RegisterIgnore | PrAction::RegisterMove
        )
    {
        return usage("--aptpl/--all-tg-pt go with register, register-ignore (and --aptpl with register-move)".into());
    }
    if act == PrAction::RegisterMove {
        if a.rel_tgt_port.is_none() || a.transport_id.is_none() {
            return usage(
                "register-move needs --rel-tgt-port and --transport-id NAME,i,0xISID".into(),
            );
        }
        if a.all_tg_pt {
            return usage("--all-tg-pt is not allowed with register-move".into());
        }
    } else if a.unreg || a.rel_tgt_port.is_some() || a.transport_id.is_some() {
        return usage("--unreg, --rel-tgt-port and --transport-id go with register-move".into());
    }
    Ok(())
}

/// Build the login configuration from the arguments.
pub fn initiator_config(a: &PrArgs, url: &IscsiUrl) -> Result<InitiatorConfig, PrCommandError> {
    let chap = a.chap.credentials().map_err(SessionError::Usage)?;
    let (user, secret) = (chap.map(|c| c.0), chap.map(|c| c.1));
    let mut opts = ConnectOptions::new(
        a.initiator_name
            .clone()
            .unwrap_or_else(default_initiator_name),
    )
    .with_chap(user, secret.map(crate::secret::Secret::expose));
    opts.isid = Some(match a.isid.as_deref() {
        None => DEFAULT_ISID,
        Some("random") => random_isid(),
        Some(s) => parse_isid(s).ok_or_else(|| {
            SessionError::Usage(format!(
                "--isid {s:?}: expected up to 12 hex digits or \"random\""
            ))
        })?,
    });
    opts.login_timeout = Some(Duration::from_secs(a.timeout.max(1)));
    Ok(connect::resolve_url(url, &opts)?)
}

/// Run one `holdfast pr` invocation.
pub async fn run(a: &PrArgs) -> Result<PrOutcome, PrCommandError> {
    let url: IscsiUrl = a.url.parse()?;
    validate(a)?;
    let cfg = initiator_config(a, &url)?;
    let limit = Duration::from_secs(a.timeout.max(1));
    tokio::time::timeout(limit, run_session(a, &url, cfg))
        .await
        .map_err(|_| PrCommandError::Timeout(a.timeout))?
}

async fn run_session(
    a: &PrArgs,
    url: &IscsiUrl,
    cfg: InitiatorConfig,
) -> Result<PrOutcome, PrCommandError> {
    let addr = cfg.addr;
    tracing::debug!(initiator = %cfg.initiator_name, isid = ?cfg.isid, %addr, target = %url.target, "logging in");
    let session = Session::login(cfg)
        .await
        .map_err(|source| ConnectError::Login {
            target: url.target.clone(),
            addr,
            source,
        })?;
    let result = execute(&session, a, url.lun).await;
    // A clean logout ends the nexus's session; the next invocation with the same
    // ISID would reinstate it anyway, so a failed logout is only worth a warning.
    if let Err(e) = session.logout().await {
        tracing::warn!(error = %e, "logout failed");
    }
    result.map_err(|source| {
        SessionError::Scsi {
            what: a.action.command_name(),
            source,
        }
        .into()
    })
}

async fn execute(s: &Session, a: &PrArgs, lun: u64) -> Result<PrOutcome, InitiatorError> {
    Ok(match a.action {
        PrAction::ReadKeys => {
            let (generation, keys) = s.read_keys(lun).await?;
            PrOutcome::ReadKeys {
                generation,
                keys: keys.into_iter().map(Key).collect(),
            }
        }
        PrAction::ReadReservation => read_reservation(s, lun, a.key).await?,
        PrAction::ReadFullStatus => {
            let (generation, registrations) = s.read_full_status(lun).await?;
            PrOutcome::ReadFullStatus {
                generation,
                registrations,
            }
        }
        PrAction::Capabilities => PrOutcome::Capabilities {
            capabilities: s.report_capabilities(lun).await?,
        },
        PrAction::WriteTest => write_test(s, lun, a.lba).await?,
        _ => {
            pr_out(s, a, lun).await?;
            PrOutcome::Prout {
                service_action: a.action.command_name(),
            }
        }
    })
}

async fn read_reservation(s: &Session, lun: u64, key: u64) -> Result<PrOutcome, InitiatorError> {
    let (generation, reservation) = s.read_reservation(lun).await?;
    // "Held by me" needs a key to compare with; with an all-registrants type the
    // reported key is 0 and every registrant holds it, so only a registered
    // caller could tell, and READ RESERVATION cannot say who is registered.
    let held_by_key = (key != 0).then(|| {
        reservation
            .as_ref()
            .is_some_and(|r| r.key == key && !r.type_.all_registrants())
    });
    Ok(PrOutcome::ReadReservation {
        generation,
        reservation,
        held_by_key,
    })
}

/// The PERSISTENT RESERVE OUT actions.
async fn pr_out(s: &Session, a: &PrArgs, lun: u64) -> Result<(), InitiatorError> {
    // validate() has checked that the options each action reads are present.
    let ty = a.type_.unwrap_or(PrType::WriteExclusive);
    let sa_key = a.sa_key.unwrap_or(0);
    let flags = RegisterFlags {
        aptpl: a.aptpl,
        all_tg_pt: a.all_tg_pt,
        spec_i_pt: a.spec_i_pt.clone(),
    };
    match a.action {
        PrAction::Register => s.register(lun, a.key, sa_key, &flags).await,
        PrAction::RegisterIgnore => s.register_ignore(lun, sa_key, &flags).await,
        PrAction::Reserve => s.reserve(lun, a.key, ty).await,
        PrAction::Release => s.release(lun, a.key, ty).await,
        PrAction::Clear => s.clear(lun, a.key).await,
        PrAction::Preempt => s.preempt(lun, a.key, sa_key, ty).await,
        PrAction::PreemptAbort => s.preempt_and_abort(lun, a.key, sa_key, ty).await,
        PrAction::RegisterMove => {
            let tid = a
                .transport_id
                .as_ref()
                .ok_or_else(|| InitiatorError::InvalidRequest("no --transport-id".into()))?;
            s.register_and_move(
                lun,
                a.key,
                sa_key,
                ty,
                a.rel_tgt_port.unwrap_or(0),
                a.unreg,
                a.aptpl,
                tid,
            )
            .await
        }
        PrAction::ReplaceLost => s.replace_lost_reservation(lun, a.key, ty).await,
        PrAction::ReadKeys
        | PrAction::ReadReservation
        | PrAction::ReadFullStatus
        | PrAction::Capabilities
        | PrAction::WriteTest => Err(InitiatorError::InvalidRequest(format!(
            "{} is not a PERSISTENT RESERVE OUT action",
            a.action.name()
        ))),
    }
}

/// Write one recognisable block (who wrote it, padded with zeros) at `lba`.
async fn write_test(s: &Session, lun: u64, lba: u64) -> Result<PrOutcome, InitiatorError> {
    let (_, block_size) = s.read_capacity16(lun).await?;
    let mut block = vec![0u8; block_size as usize];
    let tag = format!("holdfast pr write-test from {}\n", s.initiator_name());
    let n = tag.len().min(block.len());
    block[..n].copy_from_slice(&tag.as_bytes()[..n]);
    s.write16(lun, lba, block.into(), block_size, true).await?;
    Ok(PrOutcome::WriteTest { lba, block_size })
}

/// One `holdfast pr` invocation: prints the outcome (or the error) and returns the exit
/// status, 24 for RESERVATION CONFLICT so that fencing scripts can tell it apart.
pub fn main(args: &PrArgs) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(run(args)) {
        Ok(outcome) => {
            if args.json {
                println!("{}", outcome.to_json(args.action));
            } else {
                print!("{outcome}");
            }
            Ok(0)
        }
        Err(e) => {
            if args.json {
                println!("{}", e.to_json());
            }
            eprintln!("holdfast pr: {e}");
            Ok(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_key("0x3abe0001"), Ok(0x3abe0001));
        assert_eq!(parse_key("3abe0001"), Ok(0x3abe0001));
        assert_eq!(parse_key("10"), Ok(0x10)); // hex, as sg_persist
        assert_eq!(parse_key("dec:10"), Ok(10));
        assert_eq!(parse_key("0"), Ok(0));
        assert_eq!(parse_key("ffffffffffffffff"), Ok(u64::MAX));
        for bad in ["", "0x", "1ffffffffffffffff", "xyz", "dec:", "dec:-1", "-1"] {
            assert!(parse_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn human_output() {
        let o = PrOutcome::ReadKeys {
            generation: 3,
            keys: vec![Key(0x1), Key(0xabc)],
        };
        assert_eq!(
            o.to_string(),
            "  PR generation=0x3, 2 registered reservation keys follow:\n    0x1\n    0xabc\n"
        );
        assert_eq!(
            o.to_json(PrAction::ReadKeys),
            serde_json::json!({"ok": true, "action": "read-keys", "generation": 3, "keys": ["0x1", "0xabc"]})
        );
        let o = PrOutcome::ReadReservation {
            generation: 4,
            reservation: Some(Reservation {
                key: 0x11,
                scope: 0,
                type_: PrType::WriteExclusiveRegistrantsOnly,
            }),
            held_by_key: Some(true),
        };
        assert!(o
            .to_string()
            .contains("scope: LU_SCOPE,  type: Write Exclusive, registrants only"));
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["reservation"]["type"], "write-exclusive-registrants-only");
        assert_eq!(j["reservation"]["key"], "0x11");
        assert_eq!(j["held_by_key"], true);
    }
}
