//! A moved or cancelled generation's metering: each cell's attempt counts
//! only the tokens forwarded from it, so that the tenant pays for what the
//! client was sent, once, however often the generation moved.

use cell_api::metering::{Metering, SegmentTrack};

/// `metering`'s segments with their completion tokens cut, latest first,
/// to `forwarded` in total: a cell may have produced (and metered) tokens
/// that never arrived, and the cell the generation moved to produces them
/// again.
pub(super) fn clamped(metering: &Metering, forwarded: u32) -> Vec<SegmentTrack> {
    let mut segments = metering.segments.clone();
    let produced: u32 = segments.iter().fold(0, |sum, segment| {
        sum.saturating_add(segment.completion_tokens)
    });
    let mut excess = produced.saturating_sub(forwarded);
    for segment in segments.iter_mut().rev() {
        let cut = excess.min(segment.completion_tokens);
        segment.completion_tokens -= cut;
        excess -= cut;
    }
    segments
}

/// The finishing cell's metering with the earlier cells' attempts before
/// its own.
pub(super) fn merged(earlier: Vec<SegmentTrack>, finished: Metering) -> Metering {
    let mut segments = earlier;
    segments.extend(finished.segments);
    Metering {
        segments,
        ..finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell_api::metering::PaidSpeed;

    fn segment(node: &str, completion: u32) -> SegmentTrack {
        let mut track = SegmentTrack::started(node.into(), 5, 0, 0, PaidSpeed::declared(1e3, 1e2));
        track.completion_tokens = completion;
        track
    }

    fn metering(segments: Vec<SegmentTrack>) -> Metering {
        Metering {
            prompt_tokens: 5,
            segments,
            node_report: None,
            finished_ms: 10,
        }
    }

    #[test]
    fn tokens_that_never_arrived_are_cut_from_the_latest_segments() {
        let sent = metering(vec![segment("car-1", 4), segment("car-2", 6)]);
        let counts = |forwarded| -> Vec<u32> {
            clamped(&sent, forwarded)
                .iter()
                .map(|segment| segment.completion_tokens)
                .collect()
        };
        assert_eq!(counts(10), [4, 6]);
        assert_eq!(counts(12), [4, 6], "never raised");
        assert_eq!(counts(7), [4, 3]);
        assert_eq!(counts(2), [2, 0]);
    }

    #[test]
    fn earlier_attempts_come_first_and_the_finish_is_the_last_cells() {
        let finished = Metering {
            node_report: Some(cell_api::metering::NodeReport {
                prompt_tokens: 5,
                completion_tokens: 9,
                compute_ms: 3,
            }),
            ..metering(vec![segment("car-9", 5)])
        };
        let merged = merged(vec![segment("car-1", 4)], finished.clone());
        let nodes: Vec<&str> = merged.segments.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(nodes, ["car-1", "car-9"]);
        assert_eq!(merged.node_report, finished.node_report);
        assert_eq!(merged.finished_ms, finished.finished_ms);
    }
}
