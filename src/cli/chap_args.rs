//! The CHAP options of the commands that log in themselves (`pr`, `ctl init-quorum`,
//! `guest run|check`): one definition, so each takes the secret the same three ways.

use crate::secret::{read_secret_file, Secret};
use std::path::Path;

/// `--chap-user` with a secret from `--chap-secret-file`, `--chap-secret` or
/// `HOLDFAST_CHAP_SECRET`, in that order of precedence.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChapArgs {
    /// CHAP user name (with a secret from --chap-secret-file, --chap-secret or
    /// HOLDFAST_CHAP_SECRET)
    #[arg(long)]
    pub chap_user: Option<String>,
    /// CHAP secret; visible in `ps` on the command line: prefer --chap-secret-file or the
    /// environment (its value is never shown in --help)
    #[arg(long, env = "HOLDFAST_CHAP_SECRET", hide_env_values = true)]
    pub chap_secret: Option<Secret>,
    /// Read the CHAP secret from FILE (mode 0600 or stricter; one trailing newline is
    /// dropped); wins over --chap-secret and HOLDFAST_CHAP_SECRET
    #[arg(long, value_name = "FILE", value_parser = parse_secret_file)]
    pub chap_secret_file: Option<Secret>,
}

impl ChapArgs {
    /// The user and secret to log in with; none without --chap-user (a secret alone, e.g.
    /// from an environment shared with other tools, is not used).
    pub fn credentials(&self) -> Result<Option<(&str, &Secret)>, String> {
        let Some(user) = self.chap_user.as_deref() else {
            return Ok(None);
        };
        match self.chap_secret_file.as_ref().or(self.chap_secret.as_ref()) {
            Some(secret) => Ok(Some((user, secret))),
            None => Err(
                "--chap-user needs a secret: --chap-secret-file FILE, --chap-secret or \
                 HOLDFAST_CHAP_SECRET"
                    .into(),
            ),
        }
    }
}

/// clap's parser for `--chap-secret-file`: the file's secret, or why it is refused
/// (unreadable, or readable by group or others, with the chmod that fixes it).
fn parse_secret_file(path: &str) -> Result<Secret, String> {
    read_secret_file(Path::new(path)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        chap: ChapArgs,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
    }

    #[test]
    fn the_file_wins_and_a_user_without_a_secret_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s");
        std::fs::write(&f, "from-the-file-123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = f.to_str().unwrap();
        let cli = parse(&[
            "--chap-user",
            "u",
            "--chap-secret",
            "flag-secret-12",
            "--chap-secret-file",
            file,
        ])
        .unwrap();
        let (user, secret) = cli.chap.credentials().unwrap().unwrap();
        assert_eq!((user, secret.expose()), ("u", "from-the-file-123"));
        let cli = parse(&["--chap-user", "u", "--chap-secret", "flag-secret-12"]).unwrap();
        assert_eq!(
            cli.chap.credentials().unwrap().unwrap().1.expose(),
            "flag-secret-12"
        );
        let cli = parse(&["--chap-secret", "alone-secret-12"]).unwrap();
        assert!(cli.chap.credentials().unwrap().is_none());
        if std::env::var_os("HOLDFAST_CHAP_SECRET").is_none() {
            let e = parse(&["--chap-user", "u"])
                .unwrap()
                .chap
                .credentials()
                .unwrap_err();
            assert!(e.contains("--chap-secret-file"), "{e}");
        }
    }

    #[test]
    fn a_readable_secret_file_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s");
        std::fs::write(&f, "readable-secret-1").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = parse(&[
            "--chap-user",
            "u",
            "--chap-secret-file",
            f.to_str().unwrap(),
        ])
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("readable-secret-1"), "{e}");
    }
}
