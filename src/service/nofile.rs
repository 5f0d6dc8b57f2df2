//! The open-file limit (RLIMIT_NOFILE) of a daemon. Every LUN holds its backing file open
//! and every connection a socket, so 1,000 sessions over 4,096 LUNs need far more than
//! the 1,024 descriptors a systemd service or login shell starts with as its soft limit.
//! The soft limit is raised to the hard one at start-up (nothing else restrains it), and
//! a limit that still cannot hold what the configuration asks for is reported up front
//! rather than as accept() or open() failing under load.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for everything besides LUN files and connections: stdio, the
/// runtime's epoll and event fds, listening sockets, the admin socket, the lock file, logs.
pub const RESERVED_FDS: u64 = 64;

/// What start-up did about the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileReport {
    /// Soft limit before and after.
    pub before: u64,
    pub now: u64,
    /// Descriptors the configuration may need at once.
    pub needed: u64,
}

impl NofileReport {
    /// Whether the limit holds what the configuration may need.
    pub fn enough(&self) -> bool {
        self.now >= self.needed
    }
}

/// Descriptors needed for `luns` open LUN files and `connections` connections.
pub fn needed(luns: u64, connections: u64) -> u64 {
    luns.saturating_add(connections)
        .saturating_add(RESERVED_FDS)
}

/// The soft limit to ask for: the hard limit, unless the soft one is already higher
/// (it cannot be) or equal.
pub fn target_soft(soft: u64, hard: u64) -> u64 {
    soft.max(hard)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; `needed` is what the configuration may
/// use. Errors only when the limit cannot be read or set.
pub fn raise(needed: u64) -> nix::Result<NofileReport> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = target_soft(soft, hard);
    if want != soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(NofileReport {
        before: soft,
        now,
        needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_counts_luns_connections_and_the_reserve() {
        assert_eq!(needed(4096, 1024), 4096 + 1024 + RESERVED_FDS);
        assert_eq!(needed(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn soft_goes_to_hard() {
        assert_eq!(target_soft(1024, 524_288), 524_288);
        assert_eq!(target_soft(20_000, 20_000), 20_000);
    }

    /// The real call on this process: the soft limit ends at the hard one, a need beyond
    /// the hard limit is reported as not enough, a small one as enough.
    #[test]
    fn raise_lifts_the_soft_limit_of_this_process() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // One below the hard limit: low enough to need raising, too high to starve the
        // tests running beside this one of descriptors.
        let lower = soft.min(hard.saturating_sub(1));
        setrlimit(Resource::RLIMIT_NOFILE, lower, hard).unwrap();
        let r = raise(hard.saturating_add(1)).unwrap();
        assert_eq!(r.before, lower);
        assert_eq!(r.now, hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        assert_eq!(r.enough(), hard == u64::MAX);
        assert!(raise(needed(8, 8)).unwrap().enough(), "hard limit {hard}");
    }
}
