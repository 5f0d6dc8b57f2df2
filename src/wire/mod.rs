//! Wire layer: PDU codec (BHS, AHS, data segment, padding, digests) and the text
//! key=value codec. Pure functions over bytes; no I/O.

mod bhs;
pub mod codec;
pub mod pdu;
pub mod stream;
pub mod text;

pub use codec::{encode, DigestConfig, PduDecoder, WireError};
pub use pdu::*;
pub use stream::{read_pdu, PduWriter, ReadError};
