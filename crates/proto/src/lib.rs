//! The agent ↔ coordinator wire protocol, generated from `proto/fleetgrid.proto`.
//!
//! Both sides depend on this crate only; nothing else defines wire types.

#![allow(clippy::all, clippy::pedantic)]

/// Bumped on every change that an older peer could misread.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod v1 {
    tonic::include_proto!("fleetgrid.v1");
}

pub use v1::*;
