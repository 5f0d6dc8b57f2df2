//! `holdfast target reload|sessions|luns|show`: one request on the running target's admin
//! socket, its answer printed for people (or as JSON with `--json`).
use super::target::{socket_path, TargetAction};
use anyhow::{bail, Context as _};
use serde_json::Value;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Run one admin client command; returns the exit status (1: refused or failed).
pub fn main(action: &TargetAction) -> anyhow::Result<i32> {
    let (cmd, args) = match action {
        TargetAction::Reload(a) => ("reload", a),
        TargetAction::Sessions(a) => ("sessions", a),
        TargetAction::Luns(a) => ("luns", a),
        TargetAction::Show(a) => ("show", a),
    };
    let path = socket_path(args)?;
    let reply = request(&path, cmd)?;
    if args.json {
        println!("{reply}");
    }
    if reply["ok"] != Value::Bool(true) {
        let error = reply["error"]
            .as_str()
            .unwrap_or("the target gave no reason");
        eprintln!("holdfast target {cmd}: {error}");
        return Ok(1);
    }
    if !args.json {
        print_reply(cmd, &reply);
    }
    Ok(0)
}

/// Send `{"cmd": cmd}` and read the one-line answer.
fn request(path: &Path, cmd: &str) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the admin socket {}: is the target running? \
             (give its socket with --socket, or its configuration with --config)",
            path.display()
        )
    })?;
    writeln!(s, "{}", serde_json::json!({ "cmd": cmd }))
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .with_context(|| format!("reading from {}", path.display()))?;
    if line.is_empty() {
        bail!("{}: the target closed the connection", path.display());
    }
    serde_json::from_str(&line).with_context(|| format!("{}: not a JSON answer", path.display()))
}

fn print_reply(cmd: &str, reply: &Value) {
    let list = |k: &str| reply[k].as_array().cloned().unwrap_or_default();
    match cmd {
        "reload" => {
            let changes = list("changes");
            if changes.is_empty() {
                println!("reload: nothing changed");
            }
            for c in changes {
                println!("applied: {}", c.as_str().unwrap_or_default());
            }
        }
        "sessions" => {
            for s in list("sessions") {
                println!(
                    "{} {} isid={} tsih={} tpgt={} luns={}",
                    s["target"].as_str().unwrap_or_default(),
                    s["initiator"].as_str().unwrap_or_default(),
                    s["isid"].as_str().unwrap_or_default(),
                    s["tsih"],
                    s["tpgt"],
                    s["luns"]
                );
            }
        }
        "luns" => {
            for l in list("luns") {
                println!(
                    "{} LUN {}: {} bytes ({} blocks of {}) {}",
                    l["target"].as_str().unwrap_or_default(),
                    l["lun"],
                    l["size"],
                    l["blocks"],
                    l["block_size"],
                    l["path"].as_str().unwrap_or_default()
                );
            }
        }
        _ => println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        ),
    }
}
