//! The one unit-attention policy: a UNIT ATTENTION reports an event (reset, reservation
//! preempted, capacity changed) and fails the command that carried it, so the command
//! is sent again, a bounded number of times.
use super::InitiatorError;
use std::future::Future;

/// Retries after a unit attention before its error is returned; enough for the UAs
/// that one event queues (e.g. a reset plus reservations released).
pub const UA_RETRIES: usize = 8;

/// Run `op` again while it fails with a UNIT ATTENTION, at most [`UA_RETRIES`] times.
pub async fn past_unit_attention<T, F, Fut>(mut op: F) -> Result<T, InitiatorError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, InitiatorError>>,
{
    let mut left = UA_RETRIES;
    loop {
        match op().await {
            Err(e) if e.is_unit_attention() && left > 0 => {
                tracing::debug!(error = %e, "unit attention consumed; retrying");
                left -= 1;
            }
            r => return r,
        }
    }
}
