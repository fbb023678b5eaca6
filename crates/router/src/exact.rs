//! The exact speculative cascade (`auto` with `quality: "exact"`): the fleet's answer is a
//! draft, the cloud model scores the whole draft in one prefill, and the answer keeps the
//! longest prefix the cloud agrees with, then the cloud's own token where they part, then the
//! cloud's continuation. At temperature 0 the cloud "agrees" with a draft token when it is the
//! cloud's most likely token at that position (ties to the lower id, as the engine's greedy
//! sampler picks), so the answer is token for token the one the cloud model alone gives.
//!
//! Pure: the gateway's driver (`route_drive::exact`) feeds the draft and the cloud's scores
//! and carries out the verdict.

/// The cloud's most likely token after each position of the draft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DraftScores {
    /// `choices[j]`: the cloud's most likely token at draft position `j`, given the prompt
    /// and the draft before it. `None` where the cloud named no alternative (a position every
    /// token of which it ruled out), which accepts nothing from there on.
    pub choices: Vec<Option<i32>>,
    /// The token the cloud generated after the whole draft, if it generated one; `None`
    /// with `ended` when it ended the answer there.
    pub after: Option<i32>,
    pub ended: bool,
}

/// What the answer keeps of a draft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Draft tokens the cloud agreed with, from the start.
    pub accepted: usize,
    /// The cloud's token after the accepted ones: where the draft parted from it, or after a
    /// wholly accepted draft, the one it generated. `None` when the cloud ends the answer
    /// there, or it did not say.
    pub next: Option<i32>,
    /// Whether the cloud ends the answer after the accepted tokens (its next token ends the
    /// generation).
    pub ends: bool,
}

impl Verdict {
    /// The answer's tokens so far: the accepted draft, then the cloud's next token.
    pub fn tokens(&self, draft: &[i32]) -> Vec<i32> {
        let mut tokens = draft[..self.accepted.min(draft.len())].to_vec();
        tokens.extend(self.next);
        tokens
    }
}

/// The greedy verdict on `draft`: the longest prefix whose every token is the cloud's most
/// likely one. `is_end(token)` says whether a token ends a generation (an end-of-generation
/// token is never part of an answer's text).
///
/// # Panics
///
/// If `scores` does not score every draft position.
pub fn verify_greedy(draft: &[i32], scores: &DraftScores, is_end: impl Fn(i32) -> bool) -> Verdict {
    assert_eq!(
        draft.len(),
        scores.choices.len(),
        "every draft position needs the cloud's choice"
    );
    let accepted = draft
        .iter()
        .zip(&scores.choices)
        .take_while(|(token, choice)| **choice == Some(**token))
        .count();
    let next = match scores.choices.get(accepted) {
        Some(choice) => *choice,
        None => scores.after,
    };
    let ends = match next {
        Some(token) => is_end(token),
        None => accepted == draft.len() && scores.ended,
    };
    Verdict {
        accepted,
        next: next.filter(|&token| !is_end(token)),
        ends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: i32 = 99;

    fn verdict(draft: &[i32], choices: &[i32], after: Option<i32>, ended: bool) -> Verdict {
        let scores = DraftScores {
            choices: choices.iter().map(|&choice| Some(choice)).collect(),
            after,
            ended,
        };
        verify_greedy(draft, &scores, |token| token == END)
    }

    #[test]
    fn the_draft_is_kept_up_to_where_the_cloud_parts_from_it() {
        let kept = verdict(&[1, 2, 3, 4], &[1, 2, 7, 4], Some(5), false);
        assert_eq!(
            kept,
            Verdict {
                accepted: 2,
                next: Some(7),
                ends: false
            }
        );
        assert_eq!(kept.tokens(&[1, 2, 3, 4]), [1, 2, 7]);
        // A later agreement after a difference counts for nothing.
        assert_eq!(verdict(&[1, 2], &[5, 2], None, false).accepted, 0);
    }

    #[test]
    fn a_whole_draft_is_followed_by_the_token_the_cloud_generated() {
        let whole = verdict(&[1, 2], &[1, 2], Some(3), false);
        assert_eq!(whole.tokens(&[1, 2]), [1, 2, 3]);
        assert!(!whole.ends);
        // The cloud ended its answer right after the draft.
        let ended = verdict(&[1, 2], &[1, 2], None, true);
        assert_eq!(
            ended,
            Verdict {
                accepted: 2,
                next: None,
                ends: true
            }
        );
    }

    #[test]
    fn the_cloud_choosing_an_end_token_ends_the_answer() {
        let ends = verdict(&[1, 2, 3], &[1, END, 3], None, false);
        assert_eq!(ends.accepted, 1);
        assert_eq!(ends.next, None);
        assert!(ends.ends);
        assert_eq!(ends.tokens(&[1, 2, 3]), [1]);
        let after = verdict(&[1], &[1], Some(END), false);
        assert!(after.ends);
        assert_eq!(after.next, None);
    }

    #[test]
    fn an_empty_draft_keeps_only_what_the_cloud_generated() {
        let empty = verdict(&[], &[], Some(4), false);
        assert_eq!(empty.tokens(&[]), [4]);
        // A position where the cloud named nothing accepts nothing from there.
        let scores = DraftScores {
            choices: vec![Some(1), None],
            after: Some(3),
            ended: false,
        };
        let verdict = verify_greedy(&[1, 2], &scores, |_| false);
        assert_eq!((verdict.accepted, verdict.next), (1, None));
        assert!(!verdict.ends);
    }
}
