//! Persistent reservation codes (SPC-4 §6.15, §6.16): the six reservation types and the
//! PR IN and PR OUT service actions, with their wire values and user-facing names.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A TYPE code, service action or name that is not one of SPC-4's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrCodeError {
    #[error("unknown reservation type {0:?} (write-exclusive|we|1, exclusive-access|ea|3, write-exclusive-registrants-only|we-ro|5, exclusive-access-registrants-only|ea-ro|6, write-exclusive-all-registrants|we-ar|7, exclusive-access-all-registrants|ea-ar|8)")]
    TypeName(String),
    #[error("unknown reservation type code {0}")]
    TypeCode(u8),
    #[error("unknown PERSISTENT RESERVE IN service action {0:#04x}")]
    InAction(u8),
    #[error("unknown PERSISTENT RESERVE OUT service action {0:#04x}")]
    OutAction(u8),
}

/// `TryFrom<u8>` for a code enum: the member of `ALL` whose `code()` it is, else the
/// given [`PrCodeError`] variant.
macro_rules! try_from_code {
    ($ty:ident, $err:ident) => {
        impl TryFrom<u8> for $ty {
            type Error = PrCodeError;

            fn try_from(code: u8) -> Result<$ty, PrCodeError> {
                $ty::ALL
                    .into_iter()
                    .find(|c| c.code() == code)
                    .ok_or(PrCodeError::$err(code))
            }
        }
    };
}

/// Persistent reservation type (SPC-4 table 185). The serde form (variant names) is what
/// the APTPL state file stores; keep it stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// This type's bit in REPORT CAPABILITIES' type mask (SPC-4 table 192).
    pub fn mask_bit(self) -> u16 {
        match self {
            PrType::WriteExclusiveAllRegistrants => 0x8000,
            PrType::ExclusiveAccessRegistrantsOnly => 0x4000,
            PrType::WriteExclusiveRegistrantsOnly => 0x2000,
            PrType::ExclusiveAccess => 0x0800,
            PrType::WriteExclusive => 0x0200,
            PrType::ExclusiveAccessAllRegistrants => 0x0001,
        }
    }

    /// Long name, e.g. `write-exclusive-registrants-only`.
    pub fn name(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "write-exclusive",
            PrType::ExclusiveAccess => "exclusive-access",
            PrType::WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
            PrType::ExclusiveAccessRegistrantsOnly => "exclusive-access-registrants-only",
            PrType::WriteExclusiveAllRegistrants => "write-exclusive-all-registrants",
            PrType::ExclusiveAccessAllRegistrants => "exclusive-access-all-registrants",
        }
    }

    /// Short alias, e.g. `we-ro`.
    pub fn short_name(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "we",
            PrType::ExclusiveAccess => "ea",
            PrType::WriteExclusiveRegistrantsOnly => "we-ro",
            PrType::ExclusiveAccessRegistrantsOnly => "ea-ro",
            PrType::WriteExclusiveAllRegistrants => "we-ar",
            PrType::ExclusiveAccessAllRegistrants => "ea-ar",
        }
    }

    /// sg_persist's wording, e.g. "Write Exclusive, registrants only".
    pub fn description(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "Write Exclusive",
            PrType::ExclusiveAccess => "Exclusive Access",
            PrType::WriteExclusiveRegistrantsOnly => "Write Exclusive, registrants only",
            PrType::ExclusiveAccessRegistrantsOnly => "Exclusive Access, registrants only",
            PrType::WriteExclusiveAllRegistrants => "Write Exclusive, all registrants",
            PrType::ExclusiveAccessAllRegistrants => "Exclusive Access, all registrants",
        }
    }

    /// Every registrant is a reservation holder (READ RESERVATION then reports key 0).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants-only or all-registrants: registered nexuses get access.
    pub fn registrants_share(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Non-holders may not even read.
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

try_from_code!(PrType, TypeCode);

impl fmt::Display for PrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PrType {
    type Err = PrCodeError;

    /// The long name, the short alias or the TYPE code, case-insensitively.
    fn from_str(s: &str) -> Result<PrType, PrCodeError> {
        let l = s.trim().to_ascii_lowercase();
        PrType::ALL
            .into_iter()
            .find(|t| l == t.name() || l == t.short_name() || l == t.code().to_string())
            .ok_or_else(|| PrCodeError::TypeName(s.to_string()))
    }
}

/// Service-action enums: the codes, `ALL`, `code()` and `TryFrom<u8>` (an unknown code
/// is the named [`PrCodeError`] variant).
macro_rules! service_actions {
    ($($(#[$doc:meta])* $ty:ident / $err:ident { $($v:ident = $c:literal,)* })*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $ty {
            $($v = $c,)*
        }

        impl $ty {
            pub const ALL: [$ty; [$($c),*].len()] = [$($ty::$v),*];

            /// The SERVICE ACTION field value.
            pub fn code(self) -> u8 {
                self as u8
            }
        }

        try_from_code!($ty, $err);
    )*};
}

service_actions! {
    /// PERSISTENT RESERVE IN service actions (SPC-4 table 178).
    PrInAction / InAction {
        ReadKeys = 0,
        ReadReservation = 1,
        ReportCapabilities = 2,
        ReadFullStatus = 3,
    }
    /// PERSISTENT RESERVE OUT service actions (SPC-4 table 188; REPLACE LOST from SPC-5).
    PrOutAction / OutAction {
        Register = 0,
        Reserve = 1,
        Release = 2,
        Clear = 3,
        Preempt = 4,
        PreemptAndAbort = 5,
        RegisterAndIgnoreExistingKey = 6,
        RegisterAndMove = 7,
        ReplaceLostReservation = 8,
    }
}

impl PrOutAction {
    /// Uses the CDB's SCOPE and TYPE fields.
    pub fn is_scoped(self) -> bool {
        matches!(
            self,
            PrOutAction::Reserve
                | PrOutAction::Release
                | PrOutAction::Preempt
                | PrOutAction::PreemptAndAbort
                | PrOutAction::ReplaceLostReservation
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_by_name_alias_and_number() {
        for t in PrType::ALL {
            assert_eq!(t.name().parse::<PrType>(), Ok(t));
            assert_eq!(t.short_name().parse::<PrType>(), Ok(t));
            assert_eq!(t.code().to_string().parse::<PrType>(), Ok(t));
            assert_eq!(PrType::try_from(t.code()), Ok(t));
        }
        assert_eq!(
            "WE-RO".parse::<PrType>(),
            Ok(PrType::WriteExclusiveRegistrantsOnly)
        );
        assert!("2".parse::<PrType>().is_err());
        assert!("write".parse::<PrType>().is_err());
        assert_eq!(PrType::try_from(0), Err(PrCodeError::TypeCode(0)));
        assert_eq!(PrType::try_from(2), Err(PrCodeError::TypeCode(2)));
    }

    #[test]
    fn type_serde_form_is_the_state_file_form() {
        let json = serde_json::to_string(&PrType::WriteExclusiveRegistrantsOnly).unwrap();
        assert_eq!(json, "\"WriteExclusiveRegistrantsOnly\"");
    }

    #[test]
    fn service_actions_round_trip_and_stay_apart() {
        for a in PrInAction::ALL {
            assert_eq!(PrInAction::try_from(a.code()), Ok(a));
        }
        for a in PrOutAction::ALL {
            assert_eq!(PrOutAction::try_from(a.code()), Ok(a));
        }
        assert_eq!(PrInAction::try_from(4), Err(PrCodeError::InAction(4)));
        assert_eq!(PrOutAction::try_from(9), Err(PrCodeError::OutAction(9)));
        assert_eq!(PrOutAction::ReplaceLostReservation.code(), 8);
        assert_eq!(PrInAction::ReadFullStatus.code(), 3);
    }
}
