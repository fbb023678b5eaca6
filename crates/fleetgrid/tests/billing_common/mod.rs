//! What the two billing test files share: the billed stack's prices in
//! micro-dollars per token, and reading a successful body.

#![allow(dead_code)]

use serde_json::Value;

/// Spot $2 / $4, reserved $3 / $6, fleet $5 / $10 per million prompt /
/// completion tokens, in micro-dollars per token.
pub const SPOT_PROMPT_MICRO: u64 = 2;
pub const SPOT_COMPLETION_MICRO: u64 = 4;
pub const RESERVED_PROMPT_MICRO: u64 = 3;
pub const RESERVED_COMPLETION_MICRO: u64 = 6;

/// The JSON body of a response that must be 200, or a panic showing it.
pub async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("json body")
}

pub fn month_now() -> String {
    ledger::invoice::month_containing(coordinator::core::now_ms())
}
