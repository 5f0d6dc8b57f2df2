//! `holdfast generate`: man pages and shell completions rendered from the clap
//! definitions of the binary itself, so that the package's pages cannot drift from
//! `--help` (tools/package.sh runs it on the release binary). Also the check that every
//! argument and subcommand has help text.
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// What `holdfast generate` writes.
#[derive(clap::Subcommand, Debug)]
pub enum GenerateCommand {
    /// One man page per command and subcommand (holdfast.1, holdfast-target.1, ...) in DIR.
    Man {
        /// Directory to write the pages to (created if missing).
        dir: PathBuf,
    },
    /// The completion script for SHELL in DIR (bash: holdfast.bash, zsh: _holdfast,
    /// fish: holdfast.fish).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
        /// Directory to write the script to (created if missing).
        dir: PathBuf,
    },
}

/// Run `holdfast generate …` over `cmd` (the binary's whole command tree); prints each
/// file written.
pub fn main(cmd: clap::Command, what: &GenerateCommand) -> anyhow::Result<i32> {
    let written = match what {
        GenerateCommand::Man { dir } => man_pages(cmd, dir)?,
        GenerateCommand::Completions { shell, dir } => vec![completions(cmd, *shell, dir)?],
    };
    for p in written {
        println!("{}", p.display());
    }
    Ok(0)
}

/// Write a man page for `cmd` and each of its visible subcommands, nested ones
/// included; returns the section-1 pages now in `dir`, sorted.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    man_files(dir)
}

fn man_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "1") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Write the completion script of `cmd` for `shell` into `dir`; returns its path.
/// Hidden subcommands of `cmd` (this one) are left out.
pub fn completions(cmd: clap::Command, shell: Shell, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = without_hidden_subcommands(&cmd);
    let name = cmd.get_name().to_string();
    clap_complete::generate_to(shell, &mut cmd, name, dir)
}

/// `cmd` rebuilt with its visible subcommands only: clap_complete completes hidden
/// ones too, and clap cannot remove a subcommand.
fn without_hidden_subcommands(cmd: &clap::Command) -> clap::Command {
    // Without clap's "string" feature names are &'static str; this runs once per
    // process, so leaking the two short strings is harmless.
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    let mut c = clap::Command::new(leak(cmd.get_name()))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(v) = cmd.get_version() {
        c = c.version(leak(v));
    }
    if let Some(a) = cmd.get_about() {
        c = c.about(a.clone());
    }
    c
}

/// Every argument and subcommand under `cmd` that has no help text, as
/// "holdfast ctl move <group>" or "holdfast ctl move --wait"; empty when all have some.
pub fn missing_help(cmd: &clap::Command) -> Vec<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut missing = vec![];
    walk(&cmd, cmd.get_name(), &mut missing);
    missing
}

fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        if a.get_help().is_none() && a.get_long_help().is_none() {
            let name = match a.get_long() {
                Some(l) => format!("--{l}"),
                None => format!("<{}>", a.get_id()),
            };
            missing.push(format!("{path} {name}"));
        }
    }
    // clap's own `help` subcommand mirrors the others: each is checked once, itself.
    for s in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub = format!("{path} {}", s.get_name());
        if s.get_about().is_none() && s.get_long_about().is_none() {
            missing.push(sub.clone());
        }
        walk(s, &sub, missing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn sample() -> Command {
        Command::new("tool")
            .about("a tool")
            .arg(Arg::new("verbose").long("verbose").help("say more"))
            .subcommand(
                Command::new("go")
                    .about("go somewhere")
                    .arg(Arg::new("where"))
                    .arg(Arg::new("fast").long("fast")),
            )
            .subcommand(Command::new("stop"))
            .subcommand(Command::new("secret").about("internal").hide(true))
    }

    #[test]
    fn missing_help_names_each_undocumented_argument_and_subcommand() {
        let m = missing_help(&sample());
        assert_eq!(m, vec!["tool go <where>", "tool go --fast", "tool stop"]);
    }

    #[test]
    fn man_pages_are_one_per_command_and_carry_the_help_text() {
        let dir = tempfile::tempdir().unwrap();
        let files = man_pages(sample(), dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["tool-go.1", "tool-stop.1", "tool.1"]);
        let page = std::fs::read_to_string(dir.path().join("tool-go.1")).unwrap();
        assert!(page.contains("go somewhere"), "{page}");
        assert!(page.contains("fast"), "{page}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        for (shell, file) in [
            (Shell::Bash, "tool.bash"),
            (Shell::Zsh, "_tool"),
            (Shell::Fish, "tool.fish"),
        ] {
            let p = completions(sample(), shell, dir.path()).unwrap();
            assert_eq!(p, dir.path().join(file));
            let s = std::fs::read_to_string(&p).unwrap();
            assert!(s.contains("go") && s.contains("fast"), "{shell}: {s}");
            assert!(
                !s.contains("secret"),
                "{shell} completes a hidden command: {s}"
            );
        }
    }
}
