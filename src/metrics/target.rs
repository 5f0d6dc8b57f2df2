//! The target's series: per LUN (command time by kind, bytes, reservation conflicts,
//! offline), per session (commands, bytes, conflicts), logins, CHAP failures, sessions,
//! connections and buffer memory.
//!
//! The per-command path touches only handles resolved when the session logged in
//! ([`SessionMetrics`]): a handful of relaxed atomic increments, no label lookup.

use super::histogram::{DurationHistogram, COMMAND_BOUNDS_NS};
use super::http::Format;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a SCSI command does to the medium, by its operation code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    Read,
    Write,
    Other,
}

impl CommandKind {
    const ALL: [CommandKind; 3] = [CommandKind::Read, CommandKind::Write, CommandKind::Other];

    /// READ(6/10/12/16) read; WRITE(6/10/12/16), WRITE AND VERIFY, WRITE SAME and
    /// COMPARE AND WRITE write; everything else (inquiries, PR, flushes) is other.
    pub fn of(opcode: u8) -> CommandKind {
        match opcode {
            0x08 | 0x28 | 0xa8 | 0x88 => CommandKind::Read,
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0x8e | 0x41 | 0x93 | 0x89 => CommandKind::Write,
            _ => CommandKind::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Read => "read",
            CommandKind::Write => "write",
            CommandKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl EncodeLabelValue for CommandKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.name(), e)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LunLabels {
    target: String,
    lun: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LunKindLabels {
    target: String,
    lun: u64,
    kind: CommandKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    target: String,
    initiator: String,
    isid: String,
    /// A reinstated session (same initiator port) is a new series, so that the old
    /// session's end cannot remove the new one's.
    tsih: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionKindLabels {
    target: String,
    initiator: String,
    isid: String,
    tsih: u16,
    kind: CommandKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

impl SessionLabels {
    fn with_kind(&self, kind: CommandKind) -> SessionKindLabels {
        SessionKindLabels {
            target: self.target.clone(),
            initiator: self.initiator.clone(),
            isid: self.isid.clone(),
            tsih: self.tsih,
            kind,
        }
    }
}

/// Which session: its target, initiator port (name and ISID, hex) and TSIH.
#[derive(Debug, Clone, Copy)]
pub struct SessionId<'a> {
    pub target: &'a str,
    pub initiator: &'a str,
    pub isid: &'a str,
    pub tsih: u16,
}

type HistogramFamily<L> = Family<L, DurationHistogram, fn() -> DurationHistogram>;

fn command_histogram() -> DurationHistogram {
    DurationHistogram::new(COMMAND_BOUNDS_NS)
}

/// What is read from the running target at each scrape.
#[derive(Debug, Default, Clone)]
pub struct TargetGauges {
    pub sessions: usize,
    pub connections: u32,
    pub buffer_in_use: u64,
    pub buffer_limit: u64,
    /// Every served LUN: target, LUN id, offline.
    pub luns: Vec<(String, u64, bool)>,
}

/// Every series of one target process.
#[derive(Debug)]
pub struct TargetMetrics {
    registry: Registry,
    lun_time: HistogramFamily<LunKindLabels>,
    lun_read_bytes: Family<LunLabels, Counter>,
    lun_written_bytes: Family<LunLabels, Counter>,
    lun_conflicts: Family<LunLabels, Counter>,
    lun_offline: Family<LunLabels, Gauge>,
    session_commands: Family<SessionKindLabels, Counter>,
    session_read_bytes: Family<SessionLabels, Counter>,
    session_written_bytes: Family<SessionLabels, Counter>,
    session_conflicts: Family<SessionLabels, Counter>,
    logins: Counter,
    login_failures: Family<StatusLabel, Counter>,
    chap_failures: Family<TargetLabel, Counter>,
    sessions: Gauge,
    connections: Gauge,
    buffer_in_use: Gauge,
    buffer_limit: Gauge,
    /// Scrapes one at a time: a refresh and its encoding belong together.
    scrape: Mutex<()>,
}

impl Default for TargetMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetMetrics {
    pub fn new() -> TargetMetrics {
        let m = TargetMetrics {
            registry: Registry::default(),
            lun_time: Family::new_with_constructor(command_histogram),
            lun_read_bytes: Family::default(),
            lun_written_bytes: Family::default(),
            lun_conflicts: Family::default(),
            lun_offline: Family::default(),
            session_commands: Family::default(),
            session_read_bytes: Family::default(),
            session_written_bytes: Family::default(),
            session_conflicts: Family::default(),
            logins: Counter::default(),
            login_failures: Family::default(),
            chap_failures: Family::default(),
            sessions: Gauge::default(),
            connections: Gauge::default(),
            buffer_in_use: Gauge::default(),
            buffer_limit: Gauge::default(),
            scrape: Mutex::new(()),
        };
        m.register()
    }

    fn register(mut self) -> TargetMetrics {
        let r = &mut self.registry;
        r.register_with_unit(
            "holdfast_lun_command_duration",
            "SCSI command time on a LUN (start in its task set to outcome), by kind",
            Unit::Seconds,
            self.lun_time.clone(),
        );
        let bytes = |r: &mut Registry, n: &str, h: &str, f: &Family<LunLabels, Counter>| {
            r.register_with_unit(n, h, Unit::Bytes, f.clone())
        };
        bytes(
            r,
            "holdfast_lun_read",
            "Bytes read from a LUN",
            &self.lun_read_bytes,
        );
        bytes(
            r,
            "holdfast_lun_written",
            "Bytes written to a LUN",
            &self.lun_written_bytes,
        );
        r.register(
            "holdfast_lun_reservation_conflicts",
            "Commands on a LUN answered RESERVATION CONFLICT",
            self.lun_conflicts.clone(),
        );
        r.register(
            "holdfast_lun_offline",
            "1 while a backing store failure keeps the LUN offline (until restart)",
            self.lun_offline.clone(),
        );
        r.register(
            "holdfast_session_commands",
            "SCSI commands of a logged-in session, by kind",
            self.session_commands.clone(),
        );
        r.register_with_unit(
            "holdfast_session_read",
            "Bytes a session read",
            Unit::Bytes,
            self.session_read_bytes.clone(),
        );
        r.register_with_unit(
            "holdfast_session_written",
            "Bytes a session wrote",
            Unit::Bytes,
            self.session_written_bytes.clone(),
        );
        r.register(
            "holdfast_session_reservation_conflicts",
            "Commands of a session answered RESERVATION CONFLICT",
            self.session_conflicts.clone(),
        );
        self.register_process_wide();
        self
    }

    fn register_process_wide(&mut self) {
        let r = &mut self.registry;
        super::ceph::get().register(r);
        r.register(
            "holdfast_logins",
            "Logins that completed",
            self.logins.clone(),
        );
        r.register(
            "holdfast_login_failures",
            "Logins refused, by login status (class and detail, hex)",
            self.login_failures.clone(),
        );
        r.register(
            "holdfast_chap_failures",
            "CHAP authentications that failed, by target (discovery: empty)",
            self.chap_failures.clone(),
        );
        r.register(
            "holdfast_sessions",
            "Logged-in sessions",
            self.sessions.clone(),
        );
        r.register(
            "holdfast_connections",
            "Open TCP connections",
            self.connections.clone(),
        );
        r.register_with_unit(
            "holdfast_buffer_memory_in_use",
            "Command buffer budget in use (limits.buffer_memory)",
            Unit::Bytes,
            self.buffer_in_use.clone(),
        );
        r.register_with_unit(
            "holdfast_buffer_memory_limit",
            "Command buffer budget (limits.buffer_memory)",
            Unit::Bytes,
            self.buffer_limit.clone(),
        );
    }

    /// A login completed.
    pub fn login(&self) {
        self.logins.inc();
    }

    /// A login was refused with status `class`/`detail`.
    pub fn login_failed(&self, class: u8, detail: u8) {
        let status = format!("{class:02x}{detail:02x}");
        self.login_failures
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    /// A CHAP authentication failed for `target` (None: a discovery session).
    pub fn chap_failed(&self, target: Option<&str>) {
        let target = target.unwrap_or("").to_string();
        self.chap_failures
            .get_or_create(&TargetLabel { target })
            .inc();
    }

    /// Resolve the handles of a session logged in to `target` that sees `luns`.
    pub fn session(self: &Arc<Self>, id: &SessionId<'_>, luns: &[u64]) -> SessionMetrics {
        let labels = SessionLabels {
            target: id.target.to_string(),
            initiator: id.initiator.to_string(),
            isid: id.isid.to_string(),
            tsih: id.tsih,
        };
        let commands = CommandKind::ALL.map(|kind| {
            self.session_commands
                .get_or_create_owned(&labels.with_kind(kind))
        });
        SessionMetrics {
            commands,
            read_bytes: self.session_read_bytes.get_or_create_owned(&labels),
            written_bytes: self.session_written_bytes.get_or_create_owned(&labels),
            conflicts: self.session_conflicts.get_or_create_owned(&labels),
            luns: luns.iter().map(|&l| (l, self.lun(id.target, l))).collect(),
            labels,
            all: self.clone(),
        }
    }

    fn lun(&self, target: &str, lun: u64) -> LunHandles {
        let l = LunLabels {
            target: target.to_string(),
            lun,
        };
        let time = CommandKind::ALL.map(|kind| {
            self.lun_time.get_or_create_owned(&LunKindLabels {
                target: target.to_string(),
                lun,
                kind,
            })
        });
        LunHandles {
            time,
            read_bytes: self.lun_read_bytes.get_or_create_owned(&l),
            written_bytes: self.lun_written_bytes.get_or_create_owned(&l),
            conflicts: self.lun_conflicts.get_or_create_owned(&l),
        }
    }

    /// The series in `format`, with the gauges set from `gauges` first.
    pub fn render(&self, gauges: &TargetGauges, format: Format) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.sessions.set(gauges.sessions as i64);
        self.connections.set(i64::from(gauges.connections));
        self.buffer_in_use.set(gauges.buffer_in_use as i64);
        self.buffer_limit.set(gauges.buffer_limit as i64);
        // LUNs a reload removed drop out.
        self.lun_offline.clear();
        for (target, lun, offline) in &gauges.luns {
            let l = LunLabels {
                target: target.clone(),
                lun: *lun,
            };
            self.lun_offline.get_or_create(&l).set(i64::from(*offline));
        }
        super::encode(&self.registry, format)
    }
}

/// One LUN's handles.
#[derive(Debug, Clone)]
struct LunHandles {
    time: [DurationHistogram; 3],
    read_bytes: Counter,
    written_bytes: Counter,
    conflicts: Counter,
}

/// One outcome to account.
#[derive(Debug, Clone, Copy)]
pub struct CommandDone {
    pub lun: u64,
    pub kind: CommandKind,
    pub read: u64,
    pub written: u64,
    pub conflict: bool,
    pub took: Duration,
}

/// The handles of one logged-in session; its series go when it is dropped (logout or
/// connection end), so that ended sessions do not accumulate.
#[derive(Debug)]
pub struct SessionMetrics {
    commands: [Counter; 3],
    read_bytes: Counter,
    written_bytes: Counter,
    conflicts: Counter,
    luns: BTreeMap<u64, LunHandles>,
    labels: SessionLabels,
    all: Arc<TargetMetrics>,
}

impl SessionMetrics {
    /// Account one command: 2 relaxed increments on the LUN's histogram, 1 on the
    /// session's command count, 1 or 2 on byte counters.
    pub fn command(&self, c: CommandDone) {
        // A LUN a reload added after the login: resolved here (rare).
        let late;
        let lun = match self.luns.get(&c.lun) {
            Some(h) => h,
            None => {
                late = self.all.lun(&self.labels.target, c.lun);
                &late
            }
        };
        lun.time[c.kind.index()].observe(c.took);
        self.commands[c.kind.index()].inc();
        if c.read > 0 {
            lun.read_bytes.inc_by(c.read);
            self.read_bytes.inc_by(c.read);
        }
        if c.written > 0 {
            lun.written_bytes.inc_by(c.written);
            self.written_bytes.inc_by(c.written);
        }
        if c.conflict {
            lun.conflicts.inc();
            self.conflicts.inc();
        }
    }
}

impl Drop for SessionMetrics {
    fn drop(&mut self) {
        let m = &self.all;
        for kind in CommandKind::ALL {
            m.session_commands.remove(&self.labels.with_kind(kind));
        }
        m.session_read_bytes.remove(&self.labels);
        m.session_written_bytes.remove(&self.labels);
        m.session_conflicts.remove(&self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_accounts_commands_and_its_series_go_with_it() {
        let m = Arc::new(TargetMetrics::new());
        let id = SessionId {
            target: "iqn.t",
            initiator: "iqn.i",
            isid: "400001370000",
            tsih: 7,
        };
        let s = m.session(&id, &[0]);
        let done = |lun, kind, read, written, conflict| CommandDone {
            lun,
            kind,
            read,
            written,
            conflict,
            took: Duration::from_micros(300),
        };
        s.command(done(0, CommandKind::Read, 4096, 0, false));
        s.command(done(0, CommandKind::Write, 0, 512, true));
        // LUN 3 appeared after the login (a reload): still counted.
        s.command(done(3, CommandKind::Other, 0, 0, false));
        let text = m.render(&TargetGauges::default(), Format::Prometheus);
        for want in [
            r#"holdfast_session_commands_total{target="iqn.t",initiator="iqn.i",isid="400001370000",tsih="7",kind="read"} 1"#,
            r#"holdfast_lun_read_bytes_total{target="iqn.t",lun="0"} 4096"#,
            r#"holdfast_lun_written_bytes_total{target="iqn.t",lun="0"} 512"#,
            r#"holdfast_lun_reservation_conflicts_total{target="iqn.t",lun="0"} 1"#,
            r#"holdfast_lun_command_duration_seconds_count{target="iqn.t",lun="3",kind="other"} 1"#,
            r#"holdfast_lun_command_duration_seconds_bucket{target="iqn.t",lun="0",kind="read",le="0.0005"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        drop(s);
        let text = m.render(&TargetGauges::default(), Format::Prometheus);
        assert!(!text.contains("initiator=\"iqn.i\""), "{text}");
        assert!(text.contains(r#"holdfast_lun_read_bytes_total{target="iqn.t",lun="0"} 4096"#));
    }

    #[test]
    fn opcodes_have_their_kind() {
        assert_eq!(CommandKind::of(0x28), CommandKind::Read);
        assert_eq!(CommandKind::of(0x8a), CommandKind::Write);
        assert_eq!(CommandKind::of(0x5f), CommandKind::Other);
    }
}
