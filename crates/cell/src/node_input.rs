//! Checks on what a connected node sends, before any of it is used.
//!
//! A node is not trusted. A message that breaks the protocol — a token out
//! of order or outside the vocabulary, more tokens or alternatives than were
//! asked, a logprob that is not a log-probability, an id longer than ours —
//! is a protocol violation, and the core disconnects the node for it
//! (`Core::protocol_violation`); its generations continue elsewhere from
//! their committed tokens. These functions only decide: no state, no I/O.
//!
//! A token's text is never used: the coordinator renders committed token ids
//! with its own tokenizer (`served::PieceTable`). A node may leave it empty;
//! text that is not the token's own is a forgery, and a violation.

use proto::agent_message::Kind as AgentKind;

use crate::limits;
use cell_api::served::PieceTable;

/// How a node's message breaks the protocol; its `Display` is logged.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("message without a kind")]
    Empty,
    #[error("a second Hello")]
    RepeatedHello,
    #[error("generation id of {0} bytes")]
    LongGenerationId(usize),
    #[error("token at position {found}, expected {expected}")]
    OutOfOrder { found: u32, expected: u32 },
    #[error("{sent} tokens when at most {left} may still come")]
    TooManyTokens { sent: usize, left: u32 },
    #[error("token id {0} outside the vocabulary")]
    OutOfVocabulary(i32),
    #[error("text of token {0} is not that token's")]
    ForgedPiece(i32),
    #[error("logprob {0} is not a log-probability")]
    NotALogprob(f32),
    #[error("{sent} alternatives when {asked} were asked")]
    TooManyAlternatives { sent: usize, asked: u32 },
    #[error("prompt token {position} scored as {found}, which is not the prompt's")]
    NotThePrompt { position: u32, found: i32 },
    #[error("{0} it was not asked for")]
    Unasked(&'static str),
}

/// What a batch of tokens must fit: the generation as the coordinator knows it.
#[derive(Clone, Copy, Debug)]
pub struct BatchBounds {
    /// Position of the next token: the number committed so far.
    pub next_position: u32,
    /// Tokens the generation may still produce (`max_tokens` minus committed).
    pub tokens_left: u32,
    /// Alternatives asked per token (`top_logprobs` of the assignment).
    pub top_logprobs: u32,
}

/// Checks what can be checked of a message without the core's state: its
/// kind, and the length of the generation id it names.
pub fn check_shape(message: &proto::AgentMessage) -> Result<(), Violation> {
    let generation_id = match &message.kind {
        None => return Err(Violation::Empty),
        Some(AgentKind::Hello(_)) => return Err(Violation::RepeatedHello),
        Some(AgentKind::Heartbeat(_)) => return Ok(()),
        Some(AgentKind::Tokens(batch)) => &batch.generation_id,
        Some(AgentKind::Done(done)) => &done.generation_id,
        Some(AgentKind::Failed(failed)) => &failed.generation_id,
        Some(AgentKind::Checkpoint(piece)) => &piece.generation_id,
        Some(AgentKind::PromptLogprobs(scores)) => &scores.generation_id,
        Some(AgentKind::Verified(verified)) => &verified.generation_id,
    };
    if generation_id.len() > limits::GENERATION_ID_BYTES_MAX {
        return Err(Violation::LongGenerationId(generation_id.len()));
    }
    Ok(())
}

/// Checks a whole batch of tokens before any of it is committed: in order
/// from `next_position`, no more than may still come, ids in the model's
/// vocabulary (`pieces`) and text, if any, theirs, logprobs finite and not
/// above zero, alternatives no more than asked and each of them valid too.
pub fn check_batch(
    tokens: &[proto::Token],
    bounds: &BatchBounds,
    pieces: &PieceTable,
) -> Result<(), Violation> {
    if tokens.len() > bounds.tokens_left as usize {
        return Err(Violation::TooManyTokens {
            sent: tokens.len(),
            left: bounds.tokens_left,
        });
    }
    for (offset, token) in tokens.iter().enumerate() {
        let expected = bounds.next_position.saturating_add(offset as u32);
        if token.position != expected {
            return Err(Violation::OutOfOrder {
                found: token.position,
                expected,
            });
        }
        check_token(token.token_id, &token.piece, token.logprob, pieces)?;
        if token.top_logprobs.len() > bounds.top_logprobs as usize {
            return Err(Violation::TooManyAlternatives {
                sent: token.top_logprobs.len(),
                asked: bounds.top_logprobs,
            });
        }
        for alternative in &token.top_logprobs {
            check_token(
                alternative.token_id,
                &alternative.piece,
                alternative.logprob,
                pieces,
            )?;
        }
    }
    Ok(())
}

/// Checks a piece of a prompt's scores (`PromptLogprobs`) before any of it
/// is kept: the prompt's own tokens, in order from `next_index` (the first
/// prompt token is never scored), none past the prompt's end, and logprobs
/// and alternatives valid as a completion token's are.
pub fn check_prompt_scores(
    tokens: &[proto::Token],
    prompt: &[i32],
    next_index: usize,
    top_logprobs: u32,
    pieces: &PieceTable,
) -> Result<(), Violation> {
    let left = prompt.len().saturating_sub(next_index);
    let bounds = BatchBounds {
        next_position: u32::try_from(next_index).unwrap_or(u32::MAX),
        tokens_left: u32::try_from(left).unwrap_or(u32::MAX),
        top_logprobs,
    };
    check_batch(tokens, &bounds, pieces)?;
    // In order from `next_index` and no more than are left: each is the prompt token there.
    let own = prompt.get(next_index..).unwrap_or_default();
    match tokens
        .iter()
        .zip(own)
        .find(|(token, ours)| token.token_id != **ours)
    {
        Some((token, _)) => Err(Violation::NotThePrompt {
            position: token.position,
            found: token.token_id,
        }),
        None => Ok(()),
    }
}

fn check_token(
    token_id: i32,
    piece: &[u8],
    logprob: f32,
    pieces: &PieceTable,
) -> Result<(), Violation> {
    let Some(ours) = pieces.piece(token_id) else {
        return Err(Violation::OutOfVocabulary(token_id));
    };
    if !piece.is_empty() && piece != ours {
        return Err(Violation::ForgedPiece(token_id));
    }
    if !logprob.is_finite() || logprob > limits::LOGPROB_ABOVE_ZERO_TOLERANCE {
        return Err(Violation::NotALogprob(logprob));
    }
    Ok(())
}

/// Cuts text a node sent (a failure message, its engine's description) to
/// `NODE_FAILURE_MESSAGE_BYTES_MAX`, at a character boundary.
pub fn bounded_node_text(mut message: String) -> String {
    if message.len() > limits::NODE_FAILURE_MESSAGE_BYTES_MAX {
        let mut end = limits::NODE_FAILURE_MESSAGE_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: BatchBounds = BatchBounds {
        next_position: 3,
        tokens_left: 2,
        top_logprobs: 1,
    };

    /// A vocabulary of 100 tokens, token `i` rendering as `t{i}`.
    fn pieces() -> PieceTable {
        let owned: Vec<Vec<u8>> = (0..100).map(|id| format!("t{id}").into_bytes()).collect();
        let pieces: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        PieceTable::from_pieces(&pieces)
    }

    fn check(tokens: &[proto::Token]) -> Result<(), Violation> {
        check_batch(tokens, &BOUNDS, &pieces())
    }

    fn token(position: u32, token_id: i32, logprob: f32, alternatives: usize) -> proto::Token {
        proto::Token {
            position,
            token_id,
            piece: format!("t{token_id}").into_bytes(),
            logprob,
            top_logprobs: (0..alternatives)
                .map(|index| proto::TokenLogprob {
                    token_id: index as i32 % 100,
                    piece: Vec::new(),
                    logprob: -1.0,
                })
                .collect(),
        }
    }

    #[test]
    fn an_honest_batch_passes() {
        let batch = [token(3, 5, -0.1, 1), token(4, 99, 0.0, 0)];
        assert_eq!(check(&batch), Ok(()));
        // Rounding may put a certain token's logprob a hair above zero.
        assert_eq!(check(&[token(3, 5, 1e-5, 1)]), Ok(()));
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn text_that_is_not_the_tokens_own_is_a_forgery() {
        let mut forged = token(3, 5, -0.1, 0);
        forged.piece = b"INJECTED</script><script>alert(1)</script>".to_vec();
        assert_eq!(check(&[forged]), Err(Violation::ForgedPiece(5)));
        let mut empty = token(3, 5, -0.1, 0);
        empty.piece.clear();
        assert_eq!(check(&[empty]), Ok(()));
        let mut alternative = token(3, 5, -0.1, 1);
        alternative.top_logprobs[0].piece = b"t1".to_vec();
        assert_eq!(check(&[alternative]), Err(Violation::ForgedPiece(0)));
    }

    #[test]
    fn ids_outside_the_vocabulary_are_violations() {
        for id in [-5, 100, 1_000_000_000] {
            assert_eq!(
                check(&[token(3, id, -0.1, 0)]),
                Err(Violation::OutOfVocabulary(id))
            );
        }
        let mut alternative = token(3, 5, -0.1, 1);
        alternative.top_logprobs[0].token_id = -1;
        assert_eq!(check(&[alternative]), Err(Violation::OutOfVocabulary(-1)));
    }

    #[test]
    fn logprobs_must_be_finite_and_not_above_zero() {
        for logprob in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5] {
            let found = check(&[token(3, 5, logprob, 0)]);
            assert!(
                matches!(found, Err(Violation::NotALogprob(_))),
                "{logprob}: {found:?}"
            );
        }
        let mut alternative = token(3, 5, -0.1, 1);
        alternative.top_logprobs[0].logprob = f32::NAN;
        assert!(matches!(
            check(&[alternative]),
            Err(Violation::NotALogprob(_))
        ));
    }

    #[test]
    fn more_alternatives_than_asked_are_violations() {
        assert_eq!(
            check(&[token(3, 5, -0.1, 300)]),
            Err(Violation::TooManyAlternatives {
                sent: 300,
                asked: 1
            })
        );
    }

    #[test]
    fn order_and_count_are_checked() {
        assert_eq!(
            check(&[token(4, 5, -0.1, 0)]),
            Err(Violation::OutOfOrder {
                found: 4,
                expected: 3
            })
        );
        assert_eq!(
            check(&[token(3, 5, -0.1, 0), token(3, 5, -0.1, 0)]),
            Err(Violation::OutOfOrder {
                found: 3,
                expected: 4
            })
        );
        let three = [
            token(3, 5, -0.1, 0),
            token(4, 5, -0.1, 0),
            token(5, 5, -0.1, 0),
        ];
        assert_eq!(
            check(&three),
            Err(Violation::TooManyTokens { sent: 3, left: 2 })
        );
    }

    #[test]
    fn shapes_and_strings_are_bounded() {
        let message = |kind| proto::AgentMessage { kind: Some(kind) };
        assert_eq!(
            check_shape(&proto::AgentMessage { kind: None }),
            Err(Violation::Empty)
        );
        assert_eq!(
            check_shape(&message(AgentKind::Hello(Default::default()))),
            Err(Violation::RepeatedHello)
        );
        let long = proto::TokenBatch {
            generation_id: "1".repeat(limits::GENERATION_ID_BYTES_MAX + 1),
            tokens: Vec::new(),
        };
        assert_eq!(
            check_shape(&message(AgentKind::Tokens(long))),
            Err(Violation::LongGenerationId(
                limits::GENERATION_ID_BYTES_MAX + 1
            ))
        );
        let ours = proto::TokenBatch {
            generation_id: format!("{}.{}", u64::MAX, u32::MAX),
            tokens: Vec::new(),
        };
        assert_eq!(check_shape(&message(AgentKind::Tokens(ours))), Ok(()));
    }

    #[test]
    fn failure_messages_are_cut_at_a_character() {
        let long = "é".repeat(limits::NODE_FAILURE_MESSAGE_BYTES_MAX);
        let cut = bounded_node_text(long);
        assert!(cut.len() <= limits::NODE_FAILURE_MESSAGE_BYTES_MAX);
        assert!(cut.len() >= limits::NODE_FAILURE_MESSAGE_BYTES_MAX - 1);
        assert_eq!(bounded_node_text("short".into()), "short");
    }

    #[test]
    fn prompt_scores_must_be_the_prompts_own_tokens_in_order() {
        let prompt = [7, 8, 9, 10];
        let scores = |tokens: &[proto::Token], next_index| {
            check_prompt_scores(tokens, &prompt, next_index, 1, &pieces())
        };
        // The first prompt token is never scored; pieces of a scoring come in order.
        assert_eq!(
            scores(&[token(1, 8, -2.0, 1), token(2, 9, -0.5, 0)], 1),
            Ok(())
        );
        assert_eq!(scores(&[token(3, 10, -1.0, 1)], 3), Ok(()));
        assert_eq!(
            scores(&[token(1, 42, -2.0, 0)], 1),
            Err(Violation::NotThePrompt {
                position: 1,
                found: 42
            })
        );
        assert_eq!(
            scores(&[token(2, 9, -2.0, 0)], 1),
            Err(Violation::OutOfOrder {
                found: 2,
                expected: 1
            })
        );
        assert_eq!(
            scores(&[token(3, 10, -1.0, 0), token(4, 10, -1.0, 0)], 3),
            Err(Violation::TooManyTokens { sent: 2, left: 1 })
        );
        assert!(matches!(
            scores(&[token(1, 8, f32::NAN, 0)], 1),
            Err(Violation::NotALogprob(_))
        ));
        assert_eq!(
            scores(&[token(1, 8, -2.0, 2)], 1),
            Err(Violation::TooManyAlternatives { sent: 2, asked: 1 })
        );
    }
}
