//! The tokenizer and chat template of the real SmolLM2 model, loaded vocabulary-only as the
//! coordinator does.

mod common;

use common::test_model_path;
use engine::{ChatMessage, EngineError, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&test_model_path()).expect("load tokenizer")
}

#[test]
fn the_chat_template_renders_chatml() {
    let rendered = tokenizer()
        .apply_chat_template(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi!"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let without_turn = tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", "Hi!")], false)
        .unwrap();
    assert_eq!(without_turn, "<|im_start|>user\nHi!<|im_end|>\n");
}

#[test]
fn special_tokens_in_rendered_prompts_become_single_tokens() {
    let tokenizer = tokenizer();
    let tokens = tokenizer
        .tokenize("<|im_start|>user\nHi<|im_end|>", false)
        .unwrap();
    let im_end = *tokens.last().unwrap();
    assert!(
        tokenizer.is_end_of_generation(im_end),
        "<|im_end|> ends a turn"
    );
    assert!(!tokenizer.is_end_of_generation(tokens[1]));
    assert!(tokens.len() <= 6, "{tokens:?}");
}

#[test]
fn text_round_trips_through_tokens_and_pieces() {
    let tokenizer = tokenizer();
    let text = "The café serves crème brûlée — naïvely priced at 5€ 🍮.";
    let tokens = tokenizer.tokenize(text, false).unwrap();
    assert!(tokens.len() > 10);
    assert_eq!(tokenizer.detokenize(&tokens), text);
    let bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&token| tokenizer.piece(token))
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
}

#[test]
fn ids_outside_the_vocabulary_are_harmless() {
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size() as i32;
    assert_eq!(vocab, 49152);
    assert!(tokenizer.piece(vocab).is_empty());
    assert!(tokenizer.piece(-5).is_empty());
    assert!(!tokenizer.is_end_of_generation(vocab));
    let hello = tokenizer.tokenize("hello", false).unwrap();
    let mixed: Vec<i32> = [vec![-1], hello, vec![vocab + 10]].concat();
    assert_eq!(tokenizer.detokenize(&mixed), "hello");
}

#[test]
fn the_trained_context_length_is_read_from_metadata() {
    assert_eq!(tokenizer().context_train(), 8192);
}

#[test]
fn a_missing_file_is_a_load_error() {
    let missing = std::env::temp_dir().join("fleetgrid-engine-missing-tokenizer.gguf");
    assert!(matches!(
        Tokenizer::load(&missing),
        Err(EngineError::ModelLoad(_))
    ));
}

#[test]
fn a_file_that_is_not_gguf_is_a_load_error() {
    let dir = std::env::temp_dir().join(format!("fleetgrid-engine-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus.gguf");
    std::fs::write(&bogus, b"definitely not a model").unwrap();
    let result = Tokenizer::load(&bogus);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(result, Err(EngineError::ModelLoad(_))),
        "{result:?}"
    );
}
