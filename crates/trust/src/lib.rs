//! Trust in vehicles: which generations are verified, what a node's record earns it, how
//! verifiers' verdicts are weighed, and what a failed verification takes back.
//!
//! A vehicle is as trustworthy as its owner, and owners are paid per token. So a share of every
//! node's generations is recomputed by a verifier (`engine::verify`: another owner's vehicle or
//! a datacenter node prefills prompt and answer and checks every token against the sampler).
//! This crate decides everything around that check:
//!
//! - [`NodeRecord`]: a node's trust state. A new node is in probation and has every generation
//!   verified until [`VerificationPolicy::probation`] consecutive ones pass; then each is
//!   verified with probability `max(floor, 1/n)` after `n` consecutive passes (BOINC's adaptive
//!   replication, with a floor). One failure quarantines it, and the record names the
//!   generations whose earnings are suspect: every unverified one since its last pass, and at
//!   least its last [`VerificationPolicy::suspect_window`].
//! - [`draw`]: which generations are verified and by whom, drawn from a keyed hash of the
//!   platform's secret and the ids, so that a node cannot tell which of its answers are checked
//!   and cannot pick its verifier.
//! - [`Case`]: one verification's verdicts. A datacenter node's verdict decides; a vehicle's
//!   failure is confirmed by a second verifier before anyone is quarantined, a share of its
//!   passes are audited, and a vehicle whose verdict the decision contradicts is quarantined
//!   itself (a lying or colluding verifier).
//! - [`adversarial`]: the simulation of a fleet with cheaters, under this policy
//!   (`fleetgrid bench verification`).
//!
//! **Architecture invariant:** pure and deterministic: no I/O, no clock, no random number
//! generator. The same secret, ids and verdicts give the same decisions.

pub mod adversarial;
mod case;
pub mod draw;
mod policy;
mod record;

pub use case::{Case, CaseStep, Decision, Verdict, Verifier};
pub use draw::Secret;
pub use policy::VerificationPolicy;
pub use record::{NodeRecord, Quarantine, QuarantineReason, TrustState};
