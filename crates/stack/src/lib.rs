//! A fleetgrid stack as child processes: a coordinator (`fleetgrid serve`),
//! vehicle agents (`fleetgrid agent`) and, for routing, the local cloud
//! (`fleetgrid cloud serve`), started from a binary the caller names, waited
//! for on events and stopped cleanly. `fleetgrid demo`, the evaluation's own
//! stack, the benchmarks and the end-to-end tests all start their processes
//! here.
//!
//! - [`Process`]: one child in its own process group, its stderr in a log
//!   file, its stdout read line by line, its exit observed as it happens.
//!   Stopping is SIGTERM to the group, a bounded grace, then SIGKILL; a
//!   `Process` that is dropped (a caller returning early or panicking) is
//!   stopped the same way, so nothing it started outlives it.
//! - [`Fleetgrid`]: the command lines of one `fleetgrid` binary:
//!   [`Coordinator`], agents ([`AgentSpec`]), [`LocalCloud`] and one-shot CLI
//!   commands.
//! - [`probe`]: readiness as the coordinator reports it over HTTP (the health
//!   endpoint answering, the vehicles connected), polled until it holds, a
//!   member exits or a deadline passes — never a fixed sleep.
//! - [`Stack`]: a coordinator, the processes beside it and its agents,
//!   stopped together.
//! - [`nats`] and [`postgres`]: a NATS cluster and a private PostgreSQL
//!   server, for a cluster's members to share, which a test may stop under
//!   them.
//!
//! Readiness is an event: an announcement line on stdout, an HTTP answer or a
//! count the coordinator reports. A process that exits while it is waited for
//! ends the wait at once with the end of its own log.
//!
//! The coordinator is one role among the stack's members; a later kind of
//! process beside it (a cell) is one more spec and one more member list, not
//! a new way of starting or stopping processes.

mod cluster;
mod error;
mod fleetgrid;
mod lines;
pub mod nats;
pub mod postgres;
pub mod probe;
mod process;
mod stack;

pub use cluster::{ClusterCell, ClusterGateway, ClusterSpec, MemberSpec};
pub use error::StackError;
pub use fleetgrid::{
    agent_url, AgentSpec, CloudSpec, Coordinator, CoordinatorSpec, Fleetgrid, LocalCloud,
    ALWAYS_PLUGGED_IN_TRACE, NODE_CREDENTIAL_ENV,
};
pub use lines::Lines;
pub use process::{
    log_tail, stop_all, stop_all_blocking, Exit, LogFile, Process, Stdout, STOP_GRACE,
};
pub use stack::Stack;
