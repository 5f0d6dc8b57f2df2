//! Data transfer planning for one task (RFC 7143 §4.2.4, §11.7, §11.8):
//! collecting Data-Out (immediate, unsolicited, solicited by R2T) into one buffer, and
//! cutting Data-In into PDUs and sequences with status collapse and residuals.

use bytes::{Bytes, BytesMut};

/// Why a Data-Out PDU was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("Data-Out beyond the expected data transfer length (offset {offset}, len {len}, edtl {edtl})")]
    BeyondEdtl { offset: u32, len: u32, edtl: u32 },
    #[error("unsolicited data exceeds FirstBurstLength")]
    FirstBurstExceeded,
    #[error("unsolicited Data-Out after the unsolicited burst ended")]
    UnsolicitedAfterFinal,
    #[error("unsolicited Data-Out is not allowed (InitialR2T=Yes)")]
    UnsolicitedNotAllowed,
    #[error("Data-Out names unknown target transfer tag {0:#x}")]
    UnknownTtt(u32),
    #[error("Data-Out exceeds the R2T's desired length")]
    BeyondR2t,
    #[error("DataSN {got} out of order (expected {expected})")]
    DataSn { expected: u32, got: u32 },
}

/// An R2T to send: (TTT, R2TSN, offset, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tRequest {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub offset: u32,
    pub length: u32,
}

#[derive(Debug, Clone, Copy)]
struct OpenR2t {
    req: R2tRequest,
    received: u32,
    next_data_sn: u32,
}

/// Negotiated limits that shape a write's data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteLimits {
    pub initial_r2t: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
}

impl WriteLimits {
    /// The limits a login agreed. FirstBurstLength applies only when some data may come
    /// unsolicited (immediate data, or InitialR2T=No).
    pub fn negotiated(s: &super::login::SessionParams) -> Self {
        Self {
            initial_r2t: s.initial_r2t,
            first_burst_length: if s.immediate_data || !s.initial_r2t {
                s.first_burst_length
            } else {
                0
            },
            max_burst_length: s.max_burst_length,
            max_outstanding_r2t: s.max_outstanding_r2t,
        }
    }
}

/// Data-Out collection for one write task.
#[derive(Debug)]
pub struct WriteTransfer {
    edtl: u32,
    /// Bytes the device server wants (≤ edtl); data past it is accepted and dropped.
    wanted: u32,
    buf: BytesMut,
    /// All of the command's data when it came as immediate data (see
    /// [`WriteTransfer::from_immediate`]); `buf` is then empty.
    whole: Option<Bytes>,
    limits: WriteLimits,
    unsolicited_open: bool,
    unsolicited_received: u32,
    unsolicited_next_data_sn: u32,
    /// Next offset (within `wanted`) not yet covered by an R2T or unsolicited data.
    solicit_from: u32,
    open: Vec<OpenR2t>,
    next_r2t_sn: u32,
    ttt_base: u32,
    next_ttt: u32,
    received_total: u32,
}

impl WriteTransfer {
    /// `immediate` is the data segment of the SCSI Command; `final_` its F bit (no
    /// unsolicited Data-Out follows). `ttt_base` makes TTTs unique per connection.
    pub fn new(
        edtl: u32,
        wanted: u32,
        immediate: &[u8],
        final_: bool,
        limits: WriteLimits,
        ttt_base: u32,
    ) -> Result<Self, DataOutError> {
        let wanted = wanted.min(edtl);
        let mut t = Self {
            edtl,
            wanted,
            buf: BytesMut::zeroed(wanted as usize),
            whole: None,
            limits,
            unsolicited_open: !final_,
            unsolicited_received: 0,
            unsolicited_next_data_sn: 0,
            solicit_from: 0,
            open: Vec::new(),
            next_r2t_sn: 0,
            ttt_base,
            next_ttt: 0,
            received_total: 0,
        };
        if !final_ && limits.initial_r2t {
            return Err(DataOutError::UnsolicitedNotAllowed);
        }
        if !immediate.is_empty() {
            t.accept_unsolicited_bytes(0, immediate)?;
        }
        Ok(t)
    }

    /// As [`WriteTransfer::new`], but when the immediate data is all the command's data
    /// (F bit, exactly the bytes wanted) the transfer keeps that buffer (a slice of the
    /// receive buffer) instead of copying it into a zeroed one of its own.
    pub fn from_immediate(
        edtl: u32,
        wanted: u32,
        immediate: &Bytes,
        final_: bool,
        limits: WriteLimits,
        ttt_base: u32,
    ) -> Result<Self, DataOutError> {
        let len = immediate.len();
        let whole = final_ && len > 0 && len == wanted.min(edtl) as usize;
        if !whole {
            return Self::new(edtl, wanted, immediate, final_, limits, ttt_base);
        }
        if len as u32 > limits.first_burst_length {
            return Err(DataOutError::FirstBurstExceeded);
        }
        let mut t = Self::new(edtl, 0, &[], final_, limits, ttt_base)?;
        t.wanted = len as u32;
        t.unsolicited_received = len as u32;
        t.received_total = len as u32;
        t.whole = Some(immediate.clone());
        Ok(t)
    }

    fn accept_unsolicited_bytes(&mut self, offset: u32, data: &[u8]) -> Result<(), DataOutError> {
        let len = data.len() as u32;
        let end = offset.checked_add(len).ok_or(DataOutError::BeyondEdtl {
            offset,
            len,
            edtl: self.edtl,
        })?;
        if end > self.edtl {
            return Err(DataOutError::BeyondEdtl {
                offset,
                len,
                edtl: self.edtl,
            });
        }
        if end > self.limits.first_burst_length {
            return Err(DataOutError::FirstBurstExceeded);
        }
        self.copy_in(offset, data);
        self.unsolicited_received = self.unsolicited_received.max(end);
        Ok(())
    }

    fn copy_in(&mut self, offset: u32, data: &[u8]) {
        let start = offset as usize;
        let end = (start + data.len()).min(self.wanted as usize);
        if start < end {
            self.buf[start..end].copy_from_slice(&data[..end - start]);
        }
        self.received_total = self.received_total.saturating_add(data.len() as u32);
    }

    /// Accept one Data-Out PDU. Returns true when it ended a sequence (F bit), after
    /// which [`WriteTransfer::next_r2ts`] may have more to ask for.
    pub fn on_data_out(
        &mut self,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        data: &[u8],
        final_: bool,
    ) -> Result<(), DataOutError> {
        if ttt == crate::wire::RESERVED_TAG {
            if !self.unsolicited_open {
                return Err(DataOutError::UnsolicitedAfterFinal);
            }
            if data_sn != self.unsolicited_next_data_sn {
                return Err(DataOutError::DataSn {
                    expected: self.unsolicited_next_data_sn,
                    got: data_sn,
                });
            }
            self.accept_unsolicited_bytes(offset, data)?;
            self.unsolicited_next_data_sn += 1;
            if final_ {
                self.unsolicited_open = false;
            }
            return Ok(());
        }
        let idx = self
            .open
            .iter()
            .position(|r| r.req.ttt == ttt)
            .ok_or(DataOutError::UnknownTtt(ttt))?;
        let len = data.len() as u32;
        let r = self.open[idx];
        if data_sn != r.next_data_sn {
            return Err(DataOutError::DataSn {
                expected: r.next_data_sn,
                got: data_sn,
            });
        }
        let end = offset.checked_add(len).ok_or(DataOutError::BeyondR2t)?;
        if offset < r.req.offset || end > r.req.offset + r.req.length {
            return Err(DataOutError::BeyondR2t);
        }
        self.copy_in(offset, data);
        let r = &mut self.open[idx];
        r.received += len;
        r.next_data_sn += 1;
        if final_ || r.received >= r.req.length {
            self.open.swap_remove(idx);
        }
        Ok(())
    }

    /// R2Ts to send now (respecting MaxOutstandingR2T and MaxBurstLength). Only once the
    /// unsolicited burst is over, so offsets never overlap unsolicited data.
    pub fn next_r2ts(&mut self) -> Vec<R2tRequest> {
        let mut out = Vec::new();
        if self.unsolicited_open {
            return out;
        }
        if self.solicit_from < self.unsolicited_received {
            self.solicit_from = self.unsolicited_received;
        }
        while self.solicit_from < self.wanted
            && (self.open.len() as u32) < self.limits.max_outstanding_r2t.max(1)
        {
            let length =
                (self.wanted - self.solicit_from).min(self.limits.max_burst_length.max(512));
            let req = R2tRequest {
                ttt: self.ttt_base.wrapping_add(self.next_ttt) & 0x7fff_ffff,
                r2t_sn: self.next_r2t_sn,
                offset: self.solicit_from,
                length,
            };
            self.next_ttt += 1;
            self.next_r2t_sn += 1;
            self.solicit_from += length;
            self.open.push(OpenR2t {
                req,
                received: 0,
                next_data_sn: 0,
            });
            out.push(req);
        }
        out
    }

    /// All wanted data has arrived and nothing more is expected from the initiator.
    pub fn is_complete(&self) -> bool {
        !self.unsolicited_open
            && self.open.is_empty()
            && self.solicit_from.max(self.unsolicited_received) >= self.wanted
    }

    /// R2Ts sent so far (R2TSN of the next one).
    pub fn r2t_count(&self) -> u32 {
        self.next_r2t_sn
    }

    pub fn into_data(self) -> Bytes {
        match self.whole {
            Some(data) => data,
            None => self.buf.freeze(),
        }
    }
}

/// Residual reporting (RFC 7143 §11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

impl Residual {
    /// `expected`: the initiator's EDTL; `actual`: what the command transferred or wanted.
    pub fn of(expected: u32, actual: u64) -> Self {
        let e = expected as u64;
        if actual > e {
            Self {
                overflow: true,
                underflow: false,
                count: (actual - e).min(u32::MAX as u64) as u32,
            }
        } else if actual < e {
            Self {
                overflow: false,
                underflow: true,
                count: (e - actual) as u32,
            }
        } else {
            Self::default()
        }
    }
}

/// One Data-In PDU's worth of a read response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataInSegment {
    pub data_sn: u32,
    pub offset: u32,
    pub data: Bytes,
    /// Last PDU of a sequence (burst) or of the whole transfer.
    pub final_: bool,
    /// Status collapsed into this (the last) PDU.
    pub with_status: bool,
}

/// Cut `data` into Data-In PDUs of at most `max_seg` bytes, with the F bit at each
/// `max_burst` boundary and at the end. `collapse` puts the status into the last PDU.
pub fn plan_data_in(
    data: &Bytes,
    max_seg: u32,
    max_burst: u32,
    collapse: bool,
) -> Vec<DataInSegment> {
    let max_seg = max_seg.max(512) as usize;
    let max_burst = (max_burst.max(512) as usize).max(max_seg);
    let total = data.len();
    let mut out = Vec::with_capacity(total / max_seg + 1);
    let mut off = 0usize;
    let mut burst_left = max_burst;
    let mut sn = 0u32;
    while off < total {
        let len = (total - off).min(max_seg).min(burst_left);
        let end = off + len;
        burst_left -= len;
        let last = end == total;
        let seq_end = last || burst_left == 0;
        out.push(DataInSegment {
            data_sn: sn,
            offset: off as u32,
            data: data.slice(off..end),
            final_: seq_end,
            with_status: last && collapse,
        });
        if burst_left == 0 {
            burst_left = max_burst;
        }
        sn += 1;
        off = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RESERVED_TAG;

    fn limits(initial_r2t: bool, fb: u32, mb: u32, mo: u32) -> WriteLimits {
        WriteLimits {
            initial_r2t,
            first_burst_length: fb,
            max_burst_length: mb,
            max_outstanding_r2t: mo,
        }
    }

    #[test]
    fn immediate_data_only() {
        let t =
            WriteTransfer::new(8, 8, &[1; 8], true, limits(false, 65536, 262144, 1), 0).unwrap();
        assert!(t.is_complete());
        assert_eq!(&t.into_data()[..], &[1; 8]);
    }

    #[test]
    fn whole_immediate_data_is_kept_not_copied() {
        let l = limits(false, 65536, 262144, 1);
        let data = Bytes::from(vec![5u8; 4096]);
        let mut t = WriteTransfer::from_immediate(4096, 4096, &data, true, l, 0).unwrap();
        assert!(t.is_complete());
        assert!(t.next_r2ts().is_empty());
        assert_eq!(t.r2t_count(), 0);
        let out = t.into_data();
        assert_eq!(out, data);
        assert_eq!(out.as_ptr(), data.as_ptr(), "same buffer, no copy");
        // Part of the data, or more Data-Out to come: the copying path, as before.
        let part = data.slice(..1024);
        let mut t = WriteTransfer::from_immediate(4096, 4096, &part, true, l, 0).unwrap();
        assert!(!t.is_complete());
        assert_eq!(t.next_r2ts().len(), 1);
        let t = WriteTransfer::from_immediate(4096, 4096, &data, false, l, 0).unwrap();
        assert!(!t.is_complete());
        // The first burst limit still applies.
        let small = limits(false, 1024, 2048, 1);
        assert!(WriteTransfer::from_immediate(4096, 4096, &data, true, small, 0).is_err());
    }

    #[test]
    fn r2t_after_immediate_then_bursts() {
        let l = limits(false, 1000, 1024, 1);
        let mut t = WriteTransfer::new(3000, 3000, &[7; 1000], true, l, 0x100).unwrap();
        let r = t.next_r2ts();
        assert_eq!(
            r,
            vec![R2tRequest {
                ttt: 0x100,
                r2t_sn: 0,
                offset: 1000,
                length: 1024
            }]
        );
        assert!(t.next_r2ts().is_empty(), "MaxOutstandingR2T=1");
        t.on_data_out(0x100, 0, 1000, &[8; 1024], true).unwrap();
        let r = t.next_r2ts();
        assert_eq!(
            r,
            vec![R2tRequest {
                ttt: 0x101,
                r2t_sn: 1,
                offset: 2024,
                length: 976
            }]
        );
        t.on_data_out(0x101, 0, 2024, &[9; 500], false).unwrap();
        t.on_data_out(0x101, 1, 2524, &[9; 476], true).unwrap();
        assert!(t.is_complete());
        let d = t.into_data();
        assert_eq!(d[999], 7);
        assert_eq!(d[1000], 8);
        assert_eq!(d[2999], 9);
    }

    #[test]
    fn unsolicited_data_out_then_r2t() {
        let mut t =
            WriteTransfer::new(4096, 4096, &[], false, limits(false, 2048, 4096, 4), 0).unwrap();
        assert!(t.next_r2ts().is_empty(), "unsolicited burst still open");
        t.on_data_out(RESERVED_TAG, 0, 0, &[1; 1024], false)
            .unwrap();
        t.on_data_out(RESERVED_TAG, 1, 1024, &[2; 1024], true)
            .unwrap();
        assert_eq!(
            t.on_data_out(RESERVED_TAG, 2, 2048, &[2; 16], true),
            Err(DataOutError::UnsolicitedAfterFinal)
        );
        let r = t.next_r2ts();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].offset, r[0].length), (2048, 2048));
    }

    #[test]
    fn protocol_violations_are_refused() {
        let mut t =
            WriteTransfer::new(4096, 4096, &[], true, limits(true, 1024, 1024, 2), 0).unwrap();
        let r = t.next_r2ts();
        assert_eq!(r.len(), 2);
        assert_eq!(
            t.on_data_out(77, 0, 0, &[0; 4], true),
            Err(DataOutError::UnknownTtt(77))
        );
        assert_eq!(
            t.on_data_out(r[0].ttt, 1, 0, &[0; 4], false),
            Err(DataOutError::DataSn {
                expected: 0,
                got: 1
            })
        );
        assert_eq!(
            t.on_data_out(r[0].ttt, 0, 1000, &[0; 100], false),
            Err(DataOutError::BeyondR2t)
        );
        assert_eq!(
            WriteTransfer::new(10, 10, &[], false, limits(true, 1024, 1024, 1), 0).unwrap_err(),
            DataOutError::UnsolicitedNotAllowed
        );
        assert_eq!(
            WriteTransfer::new(10, 10, &[0; 11], true, limits(false, 1024, 1024, 1), 0)
                .unwrap_err(),
            DataOutError::BeyondEdtl {
                offset: 0,
                len: 11,
                edtl: 10
            }
        );
    }

    #[test]
    fn data_beyond_wanted_is_accepted_and_dropped() {
        // EDTL 8 KiB but the CDB wants 512 bytes: no R2T, extra immediate bytes dropped.
        let l = limits(false, 65536, 65536, 1);
        let mut t = WriteTransfer::new(8192, 512, &[3; 1024], true, l, 0).unwrap();
        assert!(t.next_r2ts().is_empty());
        assert!(t.is_complete());
        assert_eq!(t.into_data().len(), 512);
    }

    #[test]
    fn residuals() {
        assert_eq!(Residual::of(512, 512), Residual::default());
        assert_eq!(
            Residual::of(1024, 512),
            Residual {
                overflow: false,
                underflow: true,
                count: 512
            }
        );
        assert_eq!(
            Residual::of(0, 512),
            Residual {
                overflow: true,
                underflow: false,
                count: 512
            }
        );
    }

    #[test]
    fn data_in_segments_sequences_and_collapse() {
        let data = Bytes::from(vec![5u8; 10_000]);
        let segs = plan_data_in(&data, 4096, 8192, true);
        let lens: Vec<usize> = segs.iter().map(|s| s.data.len()).collect();
        assert_eq!(lens, vec![4096, 4096, 1808]);
        assert_eq!(
            segs.iter().map(|s| s.final_).collect::<Vec<_>>(),
            vec![false, true, true]
        );
        assert!(segs[2].with_status && !segs[1].with_status);
        assert_eq!(segs[2].offset, 8192);
        assert_eq!(segs[2].data_sn, 2);
        assert!(plan_data_in(&Bytes::new(), 4096, 8192, true).is_empty());
    }
}
