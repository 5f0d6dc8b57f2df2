//! Durable per-LUN identity: the NAA designator (VPD 0x83) and unit serial number
//! (VPD 0x80). Cluster software keys disks on these, so they must never change for the
//! life of the backing file; they live in a sidecar `<backing file>.holdfast-id`. A LUN
//! on a store several gateways serve (RBD) derives them instead ([`derive`]).

use super::StoreError;
use crate::atomic_file::write_file_atomically;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// 24-bit company ID placed in generated NAA designators. It is NOT an IEEE-assigned
/// OUI: 0x02 in the first octet is the "locally administered" bit, so it cannot collide
/// with a registered OUI, and "HF" (0x48 0x46) marks holdfast.
pub const HOLDFAST_OUI: u32 = 0x02_48_46;

/// Suffix appended to the backing file's name to form the sidecar's.
pub const SIDECAR_SUFFIX: &str = ".holdfast-id";

/// Longest serial accepted (fits VPD 0x80 with room to spare).
const MAX_SERIAL_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunIdentity {
    pub serial: String,
    /// 16-byte NAA IEEE Registered Extended designator (NAA = 6).
    pub naa: [u8; 16],
}

/// On-disk form; the NAA is hex so the file can be read and diffed by people.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    version: u32,
    serial: String,
    naa: String,
}

const FILE_VERSION: u32 = 1;

/// Path of the identity sidecar of `backing_path`.
pub fn sidecar_path(backing_path: &Path) -> PathBuf {
    let mut name = OsString::from(backing_path.as_os_str());
    name.push(SIDECAR_SUFFIX);
    PathBuf::from(name)
}

/// Load the LUN's identity, creating and persisting a new one on first use.
///
/// A configured serial overrides the stored one (and is written back, keeping the NAA),
/// so an operator can pin the serial without losing the designator.
pub fn load_or_create(
    backing_path: &Path,
    configured_serial: Option<&str>,
) -> Result<LunIdentity, StoreError> {
    if let Some(s) = configured_serial {
        validate_serial(s).map_err(|reason| StoreError::InvalidSerial {
            serial: s.into(),
            reason,
        })?;
    }
    let path = sidecar_path(backing_path);
    let mut id = match std::fs::read(&path) {
        Ok(bytes) => parse(&bytes).map_err(|reason| StoreError::CorruptIdentity {
            path: path.clone(),
            reason,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = generate(configured_serial);
            store(&path, &id)?;
            return Ok(id);
        }
        Err(e) => return Err(StoreError::io(path, "read", e)),
    };
    if let Some(s) = configured_serial {
        if id.serial != s {
            id.serial = s.to_owned();
            store(&path, &id)?;
        }
    }
    Ok(id)
}

fn store(path: &Path, id: &LunIdentity) -> Result<(), StoreError> {
    let file = IdentityFile {
        version: FILE_VERSION,
        serial: id.serial.clone(),
        naa: hex::encode(id.naa),
    };
    let text = toml::to_string(&file).map_err(|e| StoreError::CorruptIdentity {
        path: path.into(),
        reason: format!("cannot serialize: {e}"),
    })?;
    let text = format!(
        "# holdfast LUN identity: do not edit or copy; initiators and clusters key the disk on it\n{text}"
    );
    write_file_atomically(path, text.as_bytes()).map_err(|e| StoreError::io(path, "write", e))
}

fn parse(bytes: &[u8]) -> Result<LunIdentity, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let file: IdentityFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.version != FILE_VERSION {
        return Err(format!("unsupported version {}", file.version));
    }
    validate_serial(&file.serial).map_err(|r| format!("serial: {r}"))?;
    let naa_bytes = hex::decode(&file.naa).map_err(|e| format!("naa: {e}"))?;
    let naa: [u8; 16] = naa_bytes
        .try_into()
        .map_err(|_| "naa: expected 16 bytes (32 hex digits)".to_string())?;
    if naa[0] >> 4 != 6 {
        return Err("naa: not an NAA IEEE Registered Extended designator (type 6)".into());
    }
    Ok(LunIdentity {
        serial: file.serial,
        naa,
    })
}

/// Serials go into VPD page 0x80 as printable ASCII.
fn validate_serial(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > MAX_SERIAL_LEN {
        return Err("longer than 64 characters");
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    Ok(())
}

/// The identity of a LUN on a shared store, derived from names the store itself holds
/// (for an RBD image: the cluster fsid, the pool id and the image's immutable id), so
/// every gateway serving it computes the same NAA and serial with no file and no
/// coordination, and a renamed image keeps them. `key` must be unique per store
/// worldwide and never change; a configured serial overrides the derived one.
pub fn derive(key: &[&str], configured_serial: Option<&str>) -> Result<LunIdentity, StoreError> {
    use md5::{Digest, Md5};
    if let Some(s) = configured_serial {
        validate_serial(s).map_err(|reason| StoreError::InvalidSerial {
            serial: s.into(),
            reason,
        })?;
    }
    // Not a security boundary: MD5 spreads the key over the designator's 100 free bits.
    let mut h = Md5::new();
    h.update(b"holdfast shared LUN identity v1");
    for part in key {
        h.update([0]);
        h.update(part.as_bytes());
    }
    Ok(with_holdfast_naa(h.finalize().into(), configured_serial))
}

/// New identity: NAA 6, [`HOLDFAST_OUI`], 100 random bits (36-bit vendor specific
/// identifier + 64-bit extension). The default serial is the extension in hex.
fn generate(configured_serial: Option<&str>) -> LunIdentity {
    with_holdfast_naa(rand::random(), configured_serial)
}

/// NAA 6 and [`HOLDFAST_OUI`] over the top 28 bits of `bits`; the serial defaults to
/// the designator's 64-bit extension in hex.
fn with_holdfast_naa(mut naa: [u8; 16], configured_serial: Option<&str>) -> LunIdentity {
    let oui = HOLDFAST_OUI;
    naa[0] = 0x60 | ((oui >> 20) & 0x0f) as u8;
    naa[1] = (oui >> 12) as u8;
    naa[2] = (oui >> 4) as u8;
    naa[3] = (((oui & 0x0f) as u8) << 4) | (naa[3] & 0x0f);
    let serial = match configured_serial {
        Some(s) => s.to_owned(),
        None => hex::encode(&naa[8..16]),
    };
    LunIdentity { serial, naa }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("disk0.img")
    }

    #[test]
    fn generated_naa_layout() {
        let id = generate(None);
        assert_eq!(id.naa[0] >> 4, 6);
        let oui = (u32::from(id.naa[0] & 0x0f) << 20)
            | (u32::from(id.naa[1]) << 12)
            | (u32::from(id.naa[2]) << 4)
            | u32::from(id.naa[3] >> 4);
        assert_eq!(oui, HOLDFAST_OUI);
        assert_eq!(id.serial.len(), 16);
        assert_eq!(id.serial, hex::encode(&id.naa[8..]));
        assert_ne!(generate(None).naa, id.naa);
    }

    #[test]
    fn derived_identity_depends_only_on_its_key() {
        let a = derive(&["fsid", "3", "10af"], None).unwrap();
        assert_eq!(a, derive(&["fsid", "3", "10af"], None).unwrap());
        assert_eq!(a.naa[0] >> 4, 6);
        assert_eq!(a.serial, hex::encode(&a.naa[8..]));
        // Each part counts, and parts do not run into each other.
        assert_ne!(a.naa, derive(&["fsid", "4", "10af"], None).unwrap().naa);
        assert_ne!(a.naa, derive(&["fsid", "31", "0af"], None).unwrap().naa);
        let pinned = derive(&["fsid", "3", "10af"], Some("SER-9")).unwrap();
        assert_eq!((pinned.serial.as_str(), pinned.naa), ("SER-9", a.naa));
        assert!(derive(&["x"], Some("bad serial")).is_err());
    }

    #[test]
    fn persisted_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let b = backing(&dir);
        let first = load_or_create(&b, None).unwrap();
        assert!(sidecar_path(&b).ends_with("disk0.img.holdfast-id"));
        assert!(sidecar_path(&b).exists());
        let again = load_or_create(&b, None).unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn configured_serial_overrides_and_keeps_naa() {
        let dir = tempfile::tempdir().unwrap();
        let b = backing(&dir);
        let first = load_or_create(&b, Some("SER-1")).unwrap();
        assert_eq!(first.serial, "SER-1");
        let changed = load_or_create(&b, Some("SER-2")).unwrap();
        assert_eq!(changed.serial, "SER-2");
        assert_eq!(changed.naa, first.naa);
        // The change was persisted.
        assert_eq!(load_or_create(&b, None).unwrap(), changed);
        assert!(matches!(
            load_or_create(&b, Some("has space")),
            Err(StoreError::InvalidSerial { .. })
        ));
    }

    #[test]
    fn corrupt_sidecar_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = backing(&dir);
        for bad in [
            &b"\xff\xfe"[..],
            b"version = 1\nserial = \"x\"\n",
            b"version = 1\nserial = \"x\"\nnaa = \"60\"\n",
            b"version = 9\nserial = \"x\"\nnaa = \"6024846000000000000000000000000a\"\n",
            b"version = 1\nserial = \"x\"\nnaa = \"5024846000000000000000000000000a\"\n",
        ] {
            std::fs::write(sidecar_path(&b), bad).unwrap();
            let e = load_or_create(&b, None).unwrap_err();
            assert!(matches!(e, StoreError::CorruptIdentity { .. }), "{e}");
            assert!(e.to_string().contains("disk0.img.holdfast-id"), "{e}");
        }
        // A good file in the same shape loads.
        std::fs::write(
            sidecar_path(&b),
            b"version = 1\nserial = \"x\"\nnaa = \"6024846000000000000000000000000a\"\n",
        )
        .unwrap();
        assert_eq!(load_or_create(&b, None).unwrap().serial, "x");
    }
}
