//! The one-line states the daemons show in `systemctl status` (STATUS=). Pure: the
//! callers gather the facts.
use std::net::SocketAddr;

/// The target: "serving 2 LUNs on 127.0.0.1:3260, [::1]:3260".
pub fn target_line(luns: usize, portals: &[SocketAddr]) -> String {
    let portals: Vec<String> = portals.iter().map(ToString::to_string).collect();
    let s = if luns == 1 { "" } else { "s" };
    format!("serving {luns} LUN{s} on {}", portals.join(", "))
}

/// What an agent knows of itself and the cluster at one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFacts {
    /// Logged in to the target with the quorum LUN open.
    pub connected: bool,
    /// Nodes whose slot is beating / that have not left the cluster.
    pub alive: usize,
    pub members: usize,
    /// Groups running here, and paused here by a storage outage.
    pub owned: Vec<String>,
    pub paused: Vec<String>,
}

/// The agent: "3/3 nodes alive, owns g1,g2" or "paused: storage unreachable (g1)".
pub fn agent_line(f: &AgentFacts) -> String {
    if !f.paused.is_empty() {
        return format!("paused: storage unreachable ({})", f.paused.join(","));
    }
    if !f.connected {
        return "storage unreachable: logging in to the target".to_string();
    }
    let owns = if f.owned.is_empty() {
        "owns no group".to_string()
    } else {
        format!("owns {}", f.owned.join(","))
    };
    format!("{}/{} nodes alive, {owns}", f.alive, f.members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let a: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        assert_eq!(target_line(2, &[a]), "serving 2 LUNs on 127.0.0.1:3260");
        assert_eq!(
            target_line(1, &[a, a]),
            "serving 1 LUN on 127.0.0.1:3260, 127.0.0.1:3260"
        );
        let mut f = AgentFacts {
            connected: true,
            alive: 3,
            members: 3,
            owned: vec!["g1".into(), "g2".into()],
            paused: vec![],
        };
        assert_eq!(agent_line(&f), "3/3 nodes alive, owns g1,g2");
        f.owned.clear();
        assert_eq!(agent_line(&f), "3/3 nodes alive, owns no group");
        f.connected = false;
        assert!(agent_line(&f).starts_with("storage unreachable"));
        f.paused = vec!["g1".into()];
        assert_eq!(agent_line(&f), "paused: storage unreachable (g1)");
    }
}
