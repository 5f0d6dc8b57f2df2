//! Secrets and safe defaults, through the real `holdfast` binary:
//! - `target --check`, `agent --check` and `--help` of every subcommand (with
//!   HOLDFAST_CHAP_SECRET set) never show a configured secret;
//! - a config file holding a secret inline, or a secret file, readable by group or
//!   others is refused with `chmod 600 FILE` named;
//! - a target whose secrets come from `secret_file` authenticates a real CHAP login
//!   (and refuses a wrong secret), and neither its debug log nor its JSON answers
//!   (`target show/sessions --json`, `pr --json`) contain a secret;
//! - `--log-format json` writes one JSON object per line, among them the warning about
//!   a portal open to other hosts without ACL or CHAP.

use holdfast::initiator::{InitiatorConfig, Session};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.holdfast:secrets";
const INITIATOR: &str = "iqn.2026-11.org.holdfast:secrets-init";
/// Each configured once; none may show up in any output.
const SECRETS: [&str; 5] = [
    "TargetSecret-0001",
    "MutualSecret-0002",
    "AclSecret-000003",
    "DiscoverySecret-4",
    "EnvSecret-0000005",
];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_holdfast")
}

fn write_mode(p: &Path, text: &str, mode: u32) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn run(args: &[&str]) -> Output {
    run_with(args, SECRETS[4])
}

/// `holdfast ARGS` with HOLDFAST_CHAP_SECRET=`secret`.
fn run_with(args: &[&str], secret: &str) -> Output {
    Command::new(bin())
        .args(args)
        .env("HOLDFAST_CHAP_SECRET", secret)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_no_secret(what: &str, shown: &str) {
    for s in SECRETS {
        assert!(!shown.contains(s), "{what} shows secret {s}:\n{shown}");
    }
}

fn free_port() -> u16 {
    holdfast::cli::cluster_kit::free_port().unwrap()
}

/// A target with CHAP for discovery, for the target (mutual too) and for one ACL entry.
fn target_toml(port: u16, chap: &str) -> String {
    format!(
        "data_dir = \"data\"\n{chap}[[target]]\nname = \"{TARGET}\"\n\
         [[target.portal]]\nlisten = \"127.0.0.1:{port}\"\n\
         [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"1MiB\"\n"
    )
}

fn inline_chap() -> String {
    let [t, m, a, d, _] = SECRETS;
    format!(
        "[discovery_chap]\nusername = \"disc\"\nsecret = \"{d}\"\n\
         [[target]]\nname = \"iqn.2026-11.org.holdfast:other\"\n\
         [[target.portal]]\nlisten = \"127.0.0.1:1\"\n\
         [[target.lun]]\nid = 0\npath = \"other.img\"\nsize = \"1MiB\"\n\
         [target.chap]\nusername = \"u\"\nsecret = \"{t}\"\n\
         mutual_username = \"tgt\"\nmutual_secret = \"{m}\"\n\
         [[target.acl]]\ninitiator = \"{INITIATOR}\"\n\
         [target.acl.chap]\nusername = \"a\"\nsecret = \"{a}\"\n"
    )
}

fn node_toml(chap: &str) -> String {
    format!(
        "[node]\nname = \"n1\"\nid = 1\ncluster = \"lab\"\nstate_dir = \"state\"\n\
         [target]\nportals = [\"127.0.0.1:3260\"]\nname = \"{TARGET}\"\nquorum_lun = 0\n\
         [target.chap]\nusername = \"u\"\n{chap}\n"
    )
}

#[test]
fn check_output_never_shows_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    write_mode(&cfg, &target_toml(free_port(), &inline_chap()), 0o600);
    let out = run(&["target", "--check", "--config", cfg.to_str().unwrap()]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    // The config is printed, its secrets as "<redacted>".
    assert_eq!(shown.matches("<redacted>").count(), 4, "{shown}");
    assert_no_secret("target --check", &shown);

    let node = dir.path().join("n.toml");
    write_mode(
        &node,
        &node_toml(&format!("secret = \"{}\"", SECRETS[0])),
        0o600,
    );
    let out = run(&["agent", "--check", "--config", node.to_str().unwrap()]);
    let shown = text(&out);
    assert!(
        out.status.success() && shown.contains("<redacted>"),
        "{shown}"
    );
    assert_no_secret("agent --check", &shown);
}

/// The subcommands `holdfast ARGS --help` lists.
fn subcommands(help: &str) -> Vec<String> {
    let Some(section) = help.split("Commands:\n").nth(1) else {
        return vec![];
    };
    section
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn help_of_every_subcommand_hides_the_secret_from_the_environment() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = run(&args);
        let help = text(&out);
        assert!(out.status.success(), "holdfast {args:?}: {help}");
        assert_no_secret(&format!("holdfast {}", args.join(" ")), &help);
        for c in subcommands(&help) {
            let mut p = path.clone();
            p.push(c);
            todo.push(p);
        }
        seen += 1;
    }
    // holdfast, its subcommands and theirs (target reload…, guest run…, ctl status…).
    assert!(seen >= 20, "only {seen} help pages walked");
    let out = run(&["ctl", "init-quorum", "--help"]);
    assert!(
        text(&out).contains("HOLDFAST_CHAP_SECRET"),
        "the variable is still named"
    );
}

#[test]
fn readable_secret_holding_configs_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    write_mode(&cfg, &target_toml(free_port(), &inline_chap()), 0o644);
    let out = run(&["target", "--check", "--config", cfg.to_str().unwrap()]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("chmod 600 {}", cfg.display())),
        "{shown}"
    );
    assert_no_secret("the refusal", &shown);

    let secret = dir.path().join("chap.secret");
    write_mode(&secret, SECRETS[0], 0o640);
    let chap = "[discovery_chap]\nusername = \"d\"\nsecret_file = \"chap.secret\"\n";
    write_mode(&cfg, &target_toml(free_port(), chap), 0o644);
    let out = run(&["target", "--check", "--config", cfg.to_str().unwrap()]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("chmod 600 {}", secret.display())),
        "{shown}"
    );

    let node = dir.path().join("n.toml");
    write_mode(
        &node,
        &node_toml(&format!("secret = \"{}\"", SECRETS[0])),
        0o604,
    );
    let out = run(&["agent", "--check", "--config", node.to_str().unwrap()]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("chmod 600 {}", node.display())),
        "{shown}"
    );
}

/// A running `holdfast target`, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_target(extra: &[&str], cfg: &Path, log: &Path) -> Running {
    start_target_env(extra, cfg, log, &[])
}

fn start_target_env(extra: &[&str], cfg: &Path, log: &Path, env: &[(&str, &str)]) -> Running {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["target", "--config", cfg.to_str().unwrap()]);
    let child = Command::new(bin())
        .args(&args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Running(child)
}

async fn wait_login(cfg: InitiatorConfig, log: &Path) -> Session {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match Session::login(cfg.clone()).await {
            Ok(s) => return s,
            Err(e) if Instant::now() > end => panic!(
                "no login: {e}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn secret_file_chap_logs_in_and_nothing_shows_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let [t, m, ..] = SECRETS;
    write_mode(&dir.path().join("t.secret"), &format!("{t}\n"), 0o600);
    write_mode(&dir.path().join("m.secret"), m, 0o400);
    let chap = "[target.chap]\nusername = \"u\"\nsecret_file = \"t.secret\"\n\
                mutual_username = \"tgt\"\nmutual_secret_file = \"m.secret\"\n";
    let port = free_port();
    // No secret inline: the config file itself may be readable.
    let text_cfg =
        target_toml(port, "").replace("size = \"1MiB\"\n", &format!("size = \"1MiB\"\n{chap}"));
    let cfg = dir.path().join("t.toml");
    write_mode(&cfg, &text_cfg, 0o644);
    let log = dir.path().join("target.log");
    let _target = start_target(&["--log", "debug"], &cfg, &log);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ic = InitiatorConfig::new(INITIATOR, TARGET, addr);
    ic.chap = Some(("u".into(), t.as_bytes().to_vec()));
    ic.mutual_chap = Some(("tgt".into(), m.as_bytes().to_vec()));
    let s = wait_login(ic.clone(), &log).await;
    s.nop().await.unwrap();
    // The trailing newline of t.secret is not part of the secret.
    let mut wrong = ic.clone();
    wrong.chap = Some(("u".into(), format!("{t}\n").into_bytes()));
    let e = Session::login(wrong).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");

    let c = cfg.to_str().unwrap();
    let url = format!("iscsi://127.0.0.1:{port}/{TARGET}/0");
    let mut shown = vec![];
    for args in [
        vec!["target", "show", "--json", "--config", c],
        vec!["target", "sessions", "--json", "--config", c],
        vec!["pr", &url, "read-keys", "--json", "--chap-user", "u"],
    ] {
        let out = run_with(&args, t);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<serde_json::Value>(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out)));
        shown.push((format!("{args:?}"), text(&out)));
    }
    // `pr --chap-secret-file`: the file wins over a wrong secret in the environment, and
    // a copy readable by others is refused with the fix named.
    let file = dir.path().join("t.secret");
    let f = file.to_str().unwrap();
    let args = [
        "pr",
        &url,
        "read-keys",
        "--json",
        "--chap-user",
        "u",
        "--chap-secret-file",
        f,
    ];
    let out = run_with(&args, SECRETS[4]);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    shown.push((format!("{args:?}"), text(&out)));
    let open = dir.path().join("open.secret");
    write_mode(&open, t, 0o644);
    let args = [
        "pr",
        &url,
        "read-keys",
        "--chap-user",
        "u",
        "--chap-secret-file",
        open.to_str().unwrap(),
    ];
    let out = run_with(&args, t);
    assert!(
        !out.status.success() && text(&out).contains("chmod 600"),
        "{}",
        text(&out)
    );
    s.logout().await.ok();
    drop(_target);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("DEBUG"), "{log_text}");
    assert!(!log_text.contains("neither an ACL nor CHAP"), "{log_text}");
    shown.push(("the target's debug log".into(), log_text));
    for (what, t) in &shown {
        assert_no_secret(what, t);
    }
}

#[tokio::test]
async fn json_log_format_and_the_open_portal_warning() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg: PathBuf = dir.path().join("t.toml");
    let open = target_toml(port, "").replace("127.0.0.1:", "0.0.0.0:");
    write_mode(&cfg, &open, 0o644);
    let log = dir.path().join("target.log");
    let target = start_target(&["--log-format", "json", "--log", "debug"], &cfg, &log);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = wait_login(InitiatorConfig::new(INITIATOR, TARGET, addr), &log).await;
    s.logout().await.ok();
    drop(target);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(
        lines.len() > 3 && lines.iter().all(|v| v.is_object()),
        "{text}"
    );
    let warning = lines
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("neither an ACL nor CHAP"))
        })
        .unwrap_or_else(|| panic!("no open-portal warning:\n{text}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["portal"], format!("0.0.0.0:{port}"), "{warning}");
}

/// Under systemd (JOURNAL_STREAM set, stderr not a terminal) text lines start with the
/// level: journald stamps them itself. Without it, with a timestamp.
#[tokio::test]
async fn journald_lines_carry_no_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    for journal in [true, false] {
        let port = free_port();
        let cfg = dir.path().join("t.toml");
        write_mode(&cfg, &target_toml(port, ""), 0o644);
        let log = dir.path().join(format!("target-{journal}.log"));
        let env: &[(&str, &str)] = if journal {
            &[("JOURNAL_STREAM", "8:1234")]
        } else {
            &[]
        };
        let target = start_target_env(&[], &cfg, &log, env);
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let s = wait_login(InitiatorConfig::new(INITIATOR, TARGET, addr), &log).await;
        s.logout().await.ok();
        drop(target);
        let text = std::fs::read_to_string(&log).unwrap();
        let ready = text
            .lines()
            .find(|l| l.contains("holdfast target ready"))
            .unwrap_or_else(|| panic!("no ready line:\n{text}"));
        let stamped = ready.starts_with("20");
        assert_eq!(stamped, !journal, "JOURNAL_STREAM {journal}: {ready:?}");
        assert!(!ready.contains('\x1b'), "colours in a file: {ready:?}");
    }
}
