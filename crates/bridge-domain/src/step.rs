//! The steps of a transfer and what each does to the books.
//!
//! A [`Step`] is one movement of money at an outside service: it names the
//! idempotency key sent with it, the pending step the settlement runner asks
//! about, the callback a service sends, and the ledger posting it leaves.
//! [`TransferEvent::effect`] says, without IO, what an event of the state
//! machine changes in the books: the posting, the investor's balance and
//! hold, the fund allocation and the fund account. The store applies such
//! effects and nothing else, so every path that takes a transfer one step
//! further (one message, a batch, the settlement runner, a callback, a
//! deadline) changes the books in exactly the same way.

use std::fmt;
use std::str::FromStr;

use crate::{Error, TransferEvent, TransferState};

/// A movement of money at an outside service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// The investor's bank debits the investor.
    Withdrawal,
    /// The fund administrator credits the fund account.
    Deposit,
    /// The investor's bank gives back what a declined deposit left in
    /// transit.
    Refund,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Withdrawal, Step::Deposit, Step::Refund];

    /// The step's name in idempotency keys, pending steps, callbacks and
    /// ledger postings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Withdrawal => "withdrawal",
            Self::Deposit => "deposit",
            Self::Refund => "refund",
        }
    }

    /// The state a transfer waits in while the step is to be done. A refund
    /// compensates a declined deposit, so it waits where the deposit does.
    pub fn waits_in(self) -> TransferState {
        match self {
            Self::Withdrawal => TransferState::Validated,
            Self::Deposit | Self::Refund => TransferState::Withdrawn,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Step {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        Self::ALL.into_iter().find(|step| step.as_str() == name).ok_or_else(|| Error::UnknownStep(name.to_owned()))
    }
}

/// A ledger account, relative to a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Book {
    /// The investor's account at their bank.
    Investor,
    /// Money that has left the investor's bank and not yet reached the fund.
    InTransit,
    /// The fund's account at the fund administrator.
    FundAccount,
}

/// One double-entry posting of a transfer's amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posting {
    pub step: Step,
    pub debit: Book,
    pub credit: Book,
}

/// What one event of a transfer changes in the books, in minor units of
/// the transfer's currency. Zero means untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    pub posting: Option<Posting>,
    /// The investor's balance.
    pub balance_minor: i64,
    /// What is held on the investor's balance for transfers in flight.
    pub held_minor: i64,
    /// The investor's allocation in the fund, reserved for transfers in
    /// flight, completed for finished ones (and the fund's allocated total,
    /// their sum, which a completion leaves as it is).
    pub reserved_minor: i64,
    pub completed_minor: i64,
    /// The fund account's balance.
    pub fund_account_minor: i64,
}

impl TransferEvent {
    /// What this event does to the books for a transfer of `amount_minor`.
    ///
    /// Validation holds the funds and reserves the allocation; a settled
    /// withdrawal turns the hold into a debit, the money in transit; a
    /// declined one releases hold and reservation; a settled deposit moves
    /// the money from transit to the fund account; a declined deposit whose
    /// refund settled moves it back to the investor and releases the
    /// reservation; completion turns the reservation into a completed
    /// allocation. A transfer handed to a person stays frozen where it
    /// stood: that is the person's to resolve. Reopening it changes nothing
    /// either (the step code then does what the pipeline would); what an
    /// operator records as done outside Bridge does to the books what the
    /// step would have: a refund as a refunded declined deposit, a confirmed
    /// deposit as a settled one.
    pub fn effect(&self, amount_minor: i64) -> Effect {
        let posting = |step, debit, credit| Some(Posting { step, debit, credit });
        match self {
            Self::Validated => Effect { held_minor: amount_minor, reserved_minor: amount_minor, ..Effect::default() },
            Self::Withdrawn => Effect {
                posting: posting(Step::Withdrawal, Book::Investor, Book::InTransit),
                balance_minor: -amount_minor,
                held_minor: -amount_minor,
                ..Effect::default()
            },
            Self::WithdrawalFailed(_) => {
                Effect { held_minor: -amount_minor, reserved_minor: -amount_minor, ..Effect::default() }
            }
            Self::Deposited | Self::DepositConfirmed => Effect {
                posting: posting(Step::Deposit, Book::InTransit, Book::FundAccount),
                fund_account_minor: amount_minor,
                ..Effect::default()
            },
            Self::DepositFailed(_) | Self::RefundedOutside => Effect {
                posting: posting(Step::Refund, Book::InTransit, Book::Investor),
                balance_minor: amount_minor,
                reserved_minor: -amount_minor,
                ..Effect::default()
            },
            Self::Completed => {
                Effect { reserved_minor: -amount_minor, completed_minor: amount_minor, ..Effect::default() }
            }
            Self::Rejected(_)
            | Self::CompensationFailed(_)
            | Self::StepOverdue(_)
            | Self::StepRefused(_)
            | Self::Reopened(_) => Effect::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FailureReason, RejectReason};

    /// The books a transfer's events leave, summed: the posting's amounts
    /// per ledger account as well.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Books {
        balance: i64,
        held: i64,
        reserved: i64,
        completed: i64,
        fund_account: i64,
        investor_ledger: i64,
        in_transit: i64,
        fund_ledger: i64,
    }

    fn walk(events: &[TransferEvent], amount: i64) -> (TransferState, Books) {
        let mut state = TransferState::Requested;
        let mut books = Books::default();
        for event in events {
            state = state.apply(event).expect("a legal path");
            let effect = event.effect(amount);
            books.balance += effect.balance_minor;
            books.held += effect.held_minor;
            books.reserved += effect.reserved_minor;
            books.completed += effect.completed_minor;
            books.fund_account += effect.fund_account_minor;
            if let Some(posting) = effect.posting {
                for (book, sign) in [(posting.debit, -1), (posting.credit, 1)] {
                    let ledger = match book {
                        Book::Investor => &mut books.investor_ledger,
                        Book::InTransit => &mut books.in_transit,
                        Book::FundAccount => &mut books.fund_ledger,
                    };
                    *ledger += sign * amount;
                }
            }
        }
        (state, books)
    }

    fn reason() -> FailureReason {
        FailureReason("DECLINED".to_owned())
    }

    #[test]
    fn a_completed_transfer_moved_the_amount_from_investor_to_fund_and_left_nothing_held() {
        use TransferEvent as E;
        let (state, books) = walk(&[E::Validated, E::Withdrawn, E::Deposited, E::Completed], 250);
        assert_eq!(state, TransferState::Completed);
        assert_eq!(
            books,
            Books {
                balance: -250,
                completed: 250,
                fund_account: 250,
                investor_ledger: -250,
                fund_ledger: 250,
                ..Books::default()
            }
        );
    }

    #[test]
    fn every_other_final_state_leaves_the_books_as_they_were() {
        use TransferEvent as E;
        for path in [
            vec![E::Rejected(RejectReason::InsufficientFunds)],
            vec![E::Validated, E::WithdrawalFailed(reason())],
            vec![E::Validated, E::Withdrawn, E::DepositFailed(reason())],
        ] {
            let (state, books) = walk(&path, 250);
            assert!(state.is_terminal(), "{path:?}");
            assert_eq!(books, Books::default(), "{path:?}");
        }
    }

    #[test]
    fn a_transfer_handed_to_a_person_stays_frozen_where_it_stood() {
        use TransferEvent as E;
        for stuck in [E::StepOverdue(reason()), E::StepRefused(reason())] {
            let (state, books) = walk(&[E::Validated, stuck], 250);
            assert_eq!(state, TransferState::ManualReview);
            assert_eq!(books, Books { held: 250, reserved: 250, ..Books::default() });
        }
        for stuck in [E::StepOverdue(reason()), E::StepRefused(reason()), E::CompensationFailed(reason())] {
            let (state, books) = walk(&[E::Validated, E::Withdrawn, stuck], 250);
            assert_eq!(state, TransferState::ManualReview);
            assert_eq!(
                books,
                Books { balance: -250, reserved: 250, investor_ledger: -250, in_transit: 250, ..Books::default() }
            );
        }
    }

    #[test]
    fn every_resolution_of_money_in_transit_balances_the_books() {
        use TransferEvent as E;
        let frozen = [E::Validated, E::Withdrawn, E::CompensationFailed(reason())];
        // Refunded outside Bridge: the investor has the money back, nothing
        // is reserved, the transfer is reversed.
        let (state, books) = walk(&[&frozen[..], &[E::RefundedOutside]].concat(), 250);
        assert_eq!(state, TransferState::Reversed);
        assert_eq!(books, Books::default());
        // The deposit confirmed outside: completed by the completion stage as
        // any deposited transfer.
        let (state, books) = walk(&[&frozen[..], &[E::DepositConfirmed, E::Completed]].concat(), 250);
        assert_eq!(state, TransferState::Completed);
        let (_, completed) = walk(&[E::Validated, E::Withdrawn, E::Deposited, E::Completed], 250);
        assert_eq!(books, completed);
        // Reopened, the step runs as the pipeline's would.
        let (state, books) = walk(
            &[E::Validated, E::StepRefused(reason()), E::Reopened(Step::Withdrawal), E::WithdrawalFailed(reason())],
            250,
        );
        assert_eq!(state, TransferState::Failed);
        assert_eq!(books, Books::default());
    }

    #[test]
    fn every_posting_names_its_step_once_per_transfer() {
        use TransferEvent as E;
        let steps: Vec<Step> = [E::Withdrawn, E::Deposited, E::DepositFailed(reason())]
            .iter()
            .filter_map(|event| event.effect(1).posting.map(|posting| posting.step))
            .collect();
        assert_eq!(steps, [Step::Withdrawal, Step::Deposit, Step::Refund]);
    }

    #[test]
    fn steps_parse_back_and_wait_where_their_service_is_asked() {
        for step in Step::ALL {
            assert_eq!(step.as_str().parse::<Step>(), Ok(step));
        }
        assert!("withdraw".parse::<Step>().is_err());
        assert_eq!(Step::Withdrawal.waits_in(), TransferState::Validated);
        assert_eq!(Step::Refund.waits_in(), TransferState::Withdrawn);
    }
}
