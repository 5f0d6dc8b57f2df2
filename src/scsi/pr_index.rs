//! The registrations of one LU, indexed by initiator name so the per-command access check
//! does not scan them all.
//!
//! Every media command asks "which registration covers this nexus?". A registration's
//! initiator name must equal the nexus's (case-insensitively), so a hash of the lower-cased
//! name narrows the candidates to that initiator's few registrations; each candidate is
//! then checked in full with [`RegId::matches`], so a hash collision costs time, never a
//! wrong answer. The list keeps its order (READ KEYS and READ FULL STATUS report it, and
//! the first match wins) and serializes exactly as the plain list it replaced, so the
//! APTPL file's format is unchanged.

use super::pr::{RegId, Registration};
use super::ItNexus;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;

/// The registrations in order, plus positions by initiator-name hash.
#[derive(Clone, Default)]
pub struct Registrations {
    list: Vec<Registration>,
    /// Name hash → positions in `list`, ascending.
    by_name: HashMap<u64, Vec<u32>>,
}

/// FNV-1a over the ASCII-lower-cased name: case-insensitive like iSCSI names, and
/// computed from the nexus's name without allocating a lower-cased copy.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Registrations {
    /// Position of the registration covering `n`: an exact (ISID) one first, else one that
    /// covers every ISID of the name; the earliest of each kind, as a scan would find.
    pub fn find(&self, n: &ItNexus) -> Option<usize> {
        let candidates = self.by_name.get(&name_hash(&n.initiator_name))?;
        let covering = || {
            candidates
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| self.list[i].id.matches(n))
        };
        covering()
            .find(|&i| self.list[i].id.isid.is_some())
            .or_else(|| covering().next())
    }

    pub fn push(&mut self, r: Registration) {
        let at = self.list.len() as u32;
        self.by_name
            .entry(name_hash(&r.id.initiator))
            .or_default()
            .push(at);
        self.list.push(r);
    }

    /// Remove and return the registration at `i` (PR OUT only: reindexes).
    pub fn remove(&mut self, i: usize) -> Registration {
        let gone = self.list.remove(i);
        self.reindex();
        gone
    }

    pub fn retain(&mut self, keep: impl FnMut(&Registration) -> bool) {
        self.list.retain(keep);
        self.reindex();
    }

    pub fn clear(&mut self) {
        self.list.clear();
        self.by_name.clear();
    }

    /// Change the key of registration `i` (the id, and so the index, stays).
    pub fn set_key(&mut self, i: usize, key: u64) {
        self.list[i].key = key;
    }

    /// Whether a registration with exactly this id exists.
    pub fn contains_id(&self, id: &RegId) -> bool {
        self.by_name
            .get(&name_hash(&id.initiator))
            .is_some_and(|c| c.iter().any(|&i| self.list[i as usize].id == *id))
    }

    fn reindex(&mut self) {
        self.by_name.clear();
        for (at, r) in (0u32..).zip(&self.list) {
            self.by_name
                .entry(name_hash(&r.id.initiator))
                .or_default()
                .push(at);
        }
    }
}

impl From<Vec<Registration>> for Registrations {
    fn from(list: Vec<Registration>) -> Self {
        let mut r = Registrations {
            list,
            by_name: HashMap::new(),
        };
        r.reindex();
        r
    }
}

impl Deref for Registrations {
    type Target = [Registration];
    fn deref(&self) -> &[Registration] {
        &self.list
    }
}

impl<'a> IntoIterator for &'a Registrations {
    type Item = &'a Registration;
    type IntoIter = std::slice::Iter<'a, Registration>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

/// Equal when the lists are (the index follows from the list).
impl PartialEq for Registrations {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Eq for Registrations {}

impl fmt::Debug for Registrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

/// Serialized as the plain list: the APTPL file format predates the index.
impl Serialize for Registrations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Registrations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Registration>::deserialize(d).map(Registrations::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::pr::TargetPort;

    fn nexus(name: &str, isid: u8) -> ItNexus {
        ItNexus {
            initiator_name: name.into(),
            isid: [0x80, 0, 0, 0, 0, isid],
            target_name: "iqn.2026-11.org.holdfast:t".into(),
            tpgt: 1,
            relative_port_id: 1,
        }
    }

    fn reg(name: &str, isid: Option<u8>, key: u64) -> Registration {
        Registration {
            id: RegId {
                initiator: name.to_ascii_lowercase(),
                isid: isid.map(|i| [0x80, 0, 0, 0, 0, i]),
                target: Some(TargetPort {
                    name: "iqn.2026-11.org.holdfast:t".into(),
                    tpgt: 1,
                }),
            },
            key,
        }
    }

    /// What the index replaced: a scan for an exact match, then any match.
    fn scan(list: &[Registration], n: &ItNexus) -> Option<usize> {
        list.iter()
            .position(|r| r.id.isid.is_some() && r.id.matches(n))
            .or_else(|| list.iter().position(|r| r.id.matches(n)))
    }

    fn sample() -> Registrations {
        let mut r = Registrations::default();
        r.push(reg("iqn.a", None, 1));
        r.push(reg("iqn.b", Some(1), 2));
        r.push(reg("iqn.a", Some(2), 3));
        r.push(reg("iqn.c", Some(3), 4));
        r.push(reg("iqn.a", Some(2), 5));
        r
    }

    fn probes() -> Vec<ItNexus> {
        let names = ["iqn.a", "IQN.A", "iqn.b", "iqn.c", "iqn.d"];
        names
            .iter()
            .flat_map(|n| (0..5).map(move |i| nexus(n, i)))
            .collect()
    }

    #[test]
    fn find_agrees_with_a_scan_after_every_change() {
        let mut r = sample();
        let check = |r: &Registrations| {
            for n in probes() {
                assert_eq!(r.find(&n), scan(r, &n), "{} {:?}", n.initiator_name, n.isid);
            }
        };
        check(&r);
        // The exact registration wins over the earlier name-only one.
        assert_eq!(r.find(&nexus("IQN.A", 2)), Some(2));
        assert_eq!(r.find(&nexus("iqn.a", 4)), Some(0));
        r.remove(0);
        check(&r);
        assert_eq!(r.find(&nexus("iqn.a", 4)), None);
        r.retain(|x| x.key != 3);
        check(&r);
        assert_eq!(r.find(&nexus("iqn.a", 2)).map(|i| r[i].key), Some(5));
        r.set_key(0, 9);
        check(&r);
        r.clear();
        check(&r);
        assert!(r.is_empty());
    }

    #[test]
    fn serializes_as_the_plain_list_and_reindexes_on_load() {
        let r = sample();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, serde_json::to_string(&r.list).unwrap());
        let back: Registrations = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        for n in probes() {
            assert_eq!(back.find(&n), scan(&back, &n));
        }
        assert!(back.contains_id(&reg("iqn.c", Some(3), 0).id));
        assert!(!back.contains_id(&reg("iqn.c", Some(4), 0).id));
    }
}
