//! Each stage's shared set-based transactions (see `group_commit`) and what
//! the lanes hand them: one queue per stage and process.

use bridge_codec::FundsDeposited;
use bridge_store::transfers::Transfer;
use uuid::Uuid;

use crate::config::StageName;
use crate::group_commit::GroupCommit;
use crate::message::Inbound;

/// Each stage's shared transactions (see `group_commit`).
pub(crate) struct Groups {
    pub(crate) validator: GroupCommit<(Inbound, Transfer)>,
    pub(crate) withdrawal: GroupCommit<SettledStep>,
    pub(crate) deposit: GroupCommit<SettledStep>,
    pub(crate) completion: GroupCommit<(Uuid, Inbound, FundsDeposited)>,
}

impl Groups {
    pub(crate) fn new(config: &crate::PipelineConfig) -> Self {
        let (slots, size) = (config.batches_in_flight, config.batch_size_max);
        Self {
            validator: GroupCommit::new(StageName::Validator.as_str(), slots, size),
            withdrawal: GroupCommit::new(StageName::Withdrawal.as_str(), slots, size),
            deposit: GroupCommit::new(StageName::Deposit.as_str(), slots, size),
            completion: GroupCommit::new(StageName::Completion.as_str(), slots, size),
        }
    }
}

/// A step its service settled, ready for the batch's transaction.
#[derive(Clone)]
pub(crate) struct SettledStep {
    pub(crate) message: Inbound,
    pub(crate) event_id: String,
    pub(crate) transfer_id: Uuid,
    /// The service's reference for the movement.
    pub(crate) reference: String,
}
