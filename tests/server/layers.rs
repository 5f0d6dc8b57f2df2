//! The layering of `src/lib.rs`, checked on the source text: a layer that reaches up or
//! sideways (scsi importing iSCSI, the protocol core importing tokio, the agent going
//! around the initiator) fails here, with the file and line.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of `src/<layer>` (comments left out) that mention any of `forbidden`.
fn violations(layer: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(layer);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for bad in forbidden {
                if code.contains(bad) {
                    found.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn wire_knows_only_bytes() {
    let v = violations(
        "wire",
        &[
            "crate::iscsi",
            "crate::scsi",
            "crate::server",
            "crate::initiator",
            "crate::agent",
        ],
    );
    assert!(v.is_empty(), "wire reaches up:\n{}", v.join("\n"));
}

#[test]
fn iscsi_is_sans_io_and_knows_no_scsi() {
    let v = violations(
        "iscsi",
        &[
            "tokio",
            "crate::scsi",
            "crate::server",
            "crate::initiator",
            "crate::agent",
            "std::net::TcpStream",
        ],
    );
    assert!(
        v.is_empty(),
        "iscsi reaches up or does I/O:\n{}",
        v.join("\n")
    );
}

#[test]
fn scsi_knows_no_transport() {
    let v = violations(
        "scsi",
        &[
            "crate::iscsi",
            "crate::wire",
            "crate::server",
            "crate::initiator",
            "tokio",
        ],
    );
    assert!(v.is_empty(), "scsi knows a transport:\n{}", v.join("\n"));
}

#[test]
fn agent_reaches_storage_only_through_the_initiator() {
    let v = violations(
        "agent",
        &[
            "crate::server",
            "crate::store",
            "crate::wire",
            "crate::cli",
            "crate::iscsi::target_conn",
        ],
    );
    assert!(
        v.is_empty(),
        "the agent goes around the initiator:\n{}",
        v.join("\n")
    );
}
