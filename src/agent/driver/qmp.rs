//! A small synchronous client for QEMU's monitor protocol (QMP) over a unix socket: the
//! greeting, `qmp_capabilities`, then commands, each answered within a timeout.
//!
//! QMP sends one JSON object per line: a greeting (`{"QMP": …}`), replies (`{"return": …}`
//! or `{"error": {"class", "desc"}}`, echoing the command's `id`) and asynchronous events
//! (`{"event": …}`), which may come at any time and are skipped here.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest message accepted: QMP replies to the commands used here are small, and a
/// peer sending an endless line must not grow the agent's memory.
const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {after:?} while waiting for {waiting_for}")]
    Timeout {
        after: Duration,
        waiting_for: String,
    },
    #[error("QEMU closed the connection")]
    Closed,
    #[error("a message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("not a QMP message: {line:?}")]
    NotQmp { line: String },
    #[error("expected the QMP greeting, got {line:?}")]
    NoGreeting { line: String },
    #[error("{command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting,
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event {
        name: String,
    },
}

/// Parse one line QEMU sent.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let not_qmp = || QmpError::NotQmp {
        line: line.chars().take(200).collect(),
    };
    let v: Value = serde_json::from_str(line).map_err(|_| not_qmp())?;
    let obj = v.as_object().ok_or_else(not_qmp)?;
    let id = obj.get("id").cloned();
    if obj.contains_key("QMP") {
        Ok(Message::Greeting)
    } else if let Some(value) = obj.get("return") {
        Ok(Message::Return {
            id,
            value: value.clone(),
        })
    } else if let Some(err) = obj.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        })
    } else if let Some(name) = obj.get("event").and_then(Value::as_str) {
        Ok(Message::Event { name: name.into() })
    } else {
        Err(not_qmp())
    }
}

/// A QMP connection in command mode.
pub struct Qmp {
    stream: BufReader<UnixStream>,
    timeout: Duration,
    next_id: u64,
}

impl Qmp {
    /// Connect, read the greeting and enter command mode; `timeout` bounds the whole
    /// handshake, and later each command.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut q = Qmp {
            stream: BufReader::new(stream),
            timeout,
            next_id: 0,
        };
        let deadline = Instant::now() + timeout;
        let line = q.read_line(deadline, "the greeting")?;
        if parse_message(&line)? != Message::Greeting {
            return Err(QmpError::NoGreeting { line });
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Connect to the socket of a QEMU that may still be creating it (just started),
    /// trying every 20 ms until `ready` has passed or `alive` says QEMU is gone;
    /// `timeout` as for [`Qmp::connect`].
    pub fn connect_when_up(
        path: &Path,
        ready: Duration,
        timeout: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + ready;
        loop {
            match Qmp::connect(path, timeout) {
                Err(QmpError::Connect { .. }) if Instant::now() < deadline && alive() => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// Run `command` and return its `return` value; QEMU's refusal is
    /// [`QmpError::Command`]. Events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        self.next_id += 1;
        let id = json!(self.next_id);
        let mut req = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.stream
            .get_ref()
            .set_write_timeout(Some(self.timeout))?;
        self.stream
            .get_mut()
            .write_all(text.as_bytes())
            .map_err(|e| self.timed_out(e, command))?;
        loop {
            let line = self.read_line(deadline, command)?;
            match parse_message(&line)? {
                Message::Return { id: Some(i), value } if i == id => return Ok(value),
                Message::Error {
                    id: Some(i),
                    class,
                    desc,
                } if i == id => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                // Events, and answers to nothing we are waiting for.
                _ => {}
            }
        }
    }

    /// One line, without its line end, read before `deadline`.
    fn read_line(&mut self, deadline: Instant, waiting_for: &str) -> Result<String, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout_error(waiting_for));
        }
        self.stream.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        let n = (&mut self.stream)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| self.timed_out(e, waiting_for))?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(if n as u64 >= MAX_LINE {
                QmpError::TooLong
            } else {
                QmpError::Closed
            });
        }
        Ok(line.trim_end().to_string())
    }

    fn timeout_error(&self, waiting_for: &str) -> QmpError {
        QmpError::Timeout {
            after: self.timeout,
            waiting_for: waiting_for.into(),
        }
    }

    /// A socket timeout as [`QmpError::Timeout`], other errors as they are.
    fn timed_out(&self, e: std::io::Error, waiting_for: &str) -> QmpError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                self.timeout_error(waiting_for)
            }
            _ => QmpError::Io(e),
        }
    }
}

/// `query-status`'s `status`: "running", "paused", "shutdown", …
pub fn run_state(q: &mut Qmp) -> Result<String, QmpError> {
    let v = q.execute("query-status", None)?;
    match v.get("status").and_then(Value::as_str) {
        Some(s) => Ok(s.to_string()),
        None => Err(QmpError::NotQmp {
            line: v.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse_message(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#).unwrap(),
            Message::Greeting
        );
        assert_eq!(
            parse_message(r#"{"return": {"status": "paused"}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(json!(3)),
                value: json!({"status": "paused"})
            }
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            Message::Error {
                id: None,
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert_eq!(
            parse_message(r#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
            Message::Event {
                name: "STOP".into()
            }
        );
        for bad in ["", "[1]", "{\"x\": 1}", "{\"return\""] {
            assert!(
                matches!(parse_message(bad), Err(QmpError::NotQmp { .. })),
                "{bad}"
            );
        }
    }

    /// A scripted QMP peer: sends `greeting`, then answers each request line with the
    /// lines `answer` gives for it (`ID` replaced by the request's id).
    fn peer(
        greeting: &'static str,
        answer: fn(&str) -> Vec<&'static str>,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, "{greeting}").unwrap();
            for line in BufReader::new(s).lines() {
                let line = line.unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].to_string();
                for a in answer(v["execute"].as_str().unwrap()) {
                    writeln!(w, "{}", a.replace("ID", &id)).unwrap();
                }
            }
        });
        (dir, path)
    }

    const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;

    #[test]
    fn events_are_skipped_and_errors_typed() {
        let (_d, path) = peer(GREETING, |cmd| match cmd {
            "qmp_capabilities" => vec![r#"{"return": {}, "id": ID}"#],
            "stop" => vec![
                r#"{"event": "STOP", "timestamp": {"seconds": 1}}"#,
                r#"{"return": {}, "id": 999}"#,
                r#"{"return": {}, "id": ID}"#,
            ],
            "query-status" => {
                vec![r#"{"return": {"status": "paused", "running": false}, "id": ID}"#]
            }
            _ => vec![r#"{"error": {"class": "CommandNotFound", "desc": "nope"}, "id": ID}"#],
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.execute("stop", None).unwrap(), json!({}));
        assert_eq!(run_state(&mut q).unwrap(), "paused");
        match q.execute("frobnicate", Some(json!({"a": 1}))) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => assert_eq!(
                (&*command, &*class, &*desc),
                ("frobnicate", "CommandNotFound", "nope")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_peer_times_out_and_a_stranger_is_refused() {
        let (_d, path) = peer(GREETING, |_| vec![]);
        let t = Instant::now();
        match Qmp::connect(&path, Duration::from_millis(200)) {
            Err(QmpError::Timeout { waiting_for, .. }) => {
                assert_eq!(waiting_for, "qmp_capabilities")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let (_d, path) = peer(r#"{"return": {}}"#, |_| vec![]);
        assert!(matches!(
            Qmp::connect(&path, Duration::from_secs(5)),
            Err(QmpError::NoGreeting { .. })
        ));
        let missing = path.with_file_name("missing");
        assert!(matches!(
            Qmp::connect(&missing, Duration::from_secs(5)),
            Err(QmpError::Connect { .. })
        ));
    }
}
