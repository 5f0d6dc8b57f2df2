//! Text requests in the full feature phase: SendTargets, with continuation when the
//! answer is longer than the initiator's MaxRecvDataSegmentLength.

use super::pdus;
use super::TargetConnection;
use crate::wire::{self, reject_reason, Bhs, RESERVED_TAG};
use bytes::Bytes;
use tracing::warn;

impl TargetConnection {
    pub(super) fn on_text(&mut self, t: wire::TextRequest, data: Bytes) {
        let max = self.cfg.max_send_segment.max(512) as usize;
        let body = match self.text_body(&t, &data) {
            Ok(b) => b,
            Err(reason) => {
                let offending = pdus::pdu(Bhs::TextRequest(t), Bytes::new());
                return self.send(pdus::reject(reason, &offending));
            }
        };
        let (chunk, rest) = if body.len() > max {
            (body.slice(..max), Some(body.slice(max..)))
        } else {
            (body, None)
        };
        let ttt = match rest {
            Some(r) => {
                let ttt = self.alloc_ttt();
                self.text_pending = Some((ttt, r));
                ttt
            }
            None => RESERVED_TAG,
        };
        self.send(pdus::pdu(
            Bhs::TextResponse(wire::TextResponse {
                final_: ttt == RESERVED_TAG,
                continue_: ttt != RESERVED_TAG,
                lun: t.lun,
                itt: t.itt,
                ttt,
                ..Default::default()
            }),
            chunk,
        ));
    }

    /// The whole answer to `t` (a continuation's remainder, or a new answer), or the
    /// Reject reason.
    fn text_body(&mut self, t: &wire::TextRequest, data: &Bytes) -> Result<Bytes, u8> {
        if t.ttt != RESERVED_TAG {
            return match self.text_pending.take() {
                Some((ttt, rest)) if ttt == t.ttt => Ok(rest),
                _ => {
                    warn!(ttt = t.ttt, "Text continuation for an unknown transfer tag");
                    Err(reject_reason::INVALID_PDU_FIELD)
                }
            };
        }
        let pairs = wire::text::parse_text(data).map_err(|e| {
            warn!(error = %e, "malformed text request");
            reject_reason::PROTOCOL_ERROR
        })?;
        let mut resp: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                resp.extend(self.ctx.send_targets(&v));
            } else {
                resp.push((k, "NotUnderstood".into()));
            }
        }
        Ok(wire::text::encode_text(&resp))
    }
}
