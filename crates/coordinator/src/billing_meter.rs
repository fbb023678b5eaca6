//! What the core counts of a generation for billing: one segment per node
//! attempt, with the tokens that attempt prefilled and produced and when it
//! was busy, plus the finishing node's own report. The core fills these in
//! under its lock (plain data, no I/O); the gateway turns them into the
//! ledger's `CompletedRequest` once the generation is done.

/// One attempt of a generation on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentTrack {
    /// The node's enrolled name.
    pub node: String,
    /// Tokens the node prefilled: the prompt, plus on a resumed attempt the
    /// tokens committed before it (a re-prefill, never billed to the tenant).
    pub prefilled_tokens: u32,
    /// Tokens this attempt produced and the coordinator committed.
    pub completion_tokens: u32,
    /// When the attempt was assigned (ms since the Unix epoch).
    pub started_ms: i64,
    /// When the attempt last produced a token or finished.
    pub last_active_ms: i64,
}

impl SegmentTrack {
    pub fn started(node: String, prefilled_tokens: u32, now_ms: i64) -> SegmentTrack {
        SegmentTrack {
            node,
            prefilled_tokens,
            completion_tokens: 0,
            started_ms: now_ms,
            last_active_ms: now_ms,
        }
    }

    /// Wall time the node worked on this attempt: from assignment to its
    /// last token.
    pub fn compute_ms(&self) -> u64 {
        u64::try_from(self.last_active_ms - self.started_ms).unwrap_or(0)
    }
}

/// The finishing node's own account of its attempt (from `GenerationDone`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeReport {
    /// The prompt as the node received it.
    pub prompt_tokens: u32,
    /// Committed tokens it was given plus those it produced.
    pub completion_tokens: u32,
    pub compute_ms: u64,
}

/// Everything billing needs of a finished generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metering {
    /// The prompt, as the coordinator tokenized it.
    pub prompt_tokens: u32,
    /// Every attempt, in order; the last one finished the generation.
    pub segments: Vec<SegmentTrack>,
    pub node_report: Option<NodeReport>,
    pub finished_ms: i64,
}
