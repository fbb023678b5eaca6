//! Structured output on the real model: an answer constrained by a JSON schema always parses
//! and follows it, whatever the sampling, and a constrained generation resumed from its
//! committed tokens on another engine continues exactly.

mod common;

use common::*;
use engine::{json_schema_grammar, GrammarCompiler, SamplingParams};
use serde_json::{json, Value};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colour": {"enum": ["red", "green", "blue"]},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 2},
        },
        "required": ["name", "age", "colour", "pets"],
        "additionalProperties": false,
        "$defs": {
            "pet": {
                "type": "object",
                "properties": {"kind": {"type": "string", "maxLength": 10}},
                "required": ["kind"],
                "additionalProperties": false,
            }
        },
    })
}

/// Whether `value` follows `person_schema`, checked field by field.
fn is_person(value: &Value) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let pets_ok = object["pets"].as_array().is_some_and(|pets| {
        pets.len() <= 2
            && pets.iter().all(|pet| {
                pet.as_object().is_some_and(|pet| {
                    pet.len() == 1
                        && pet["kind"]
                            .as_str()
                            .is_some_and(|kind| kind.chars().count() <= 10)
                })
            })
    });
    keys.len() == 4
        && object["name"]
            .as_str()
            .is_some_and(|name| name.chars().count() <= 20)
        && object["age"].as_u64().is_some_and(|age| age <= 120)
        && ["red", "green", "blue"].contains(&object["colour"].as_str().unwrap_or(""))
        && pets_ok
}

#[test]
fn a_schema_constrained_answer_parses_and_follows_the_schema_at_any_temperature() {
    let engine = start(2, 1024);
    let prompt = chat_prompt(&engine, "Describe a person and their pets.");
    let grammar = json_schema_grammar(&person_schema());
    for (temperature, seed) in [(0.0, 0), (0.8, 1), (1.2, 2), (1.5, 3)] {
        let mut constrained = generation(prompt.clone(), sampled(temperature, seed), 200);
        constrained.grammar = Some(grammar.clone());
        let outcome = run(&engine, constrained);
        assert_finished(&outcome, engine::FinishReason::Stop);
        let text = outcome.text();
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("T={temperature}: {error}: {text:?}"));
        assert!(is_person(&value), "T={temperature}: {text}");
    }
}

#[test]
fn alternatives_a_grammar_rules_out_are_not_reported() {
    let engine = start(1, 1024);
    let prompt = chat_prompt(&engine, "Pick a colour.");
    let schema = json!({"enum": ["red", "green", "blue"]});
    let mut constrained = generation(prompt, sampled(0.0, 0), 20);
    constrained.grammar = Some(json_schema_grammar(&schema));
    constrained.top_logprobs = 5;
    let outcome = run(&engine, constrained);
    assert_finished(&outcome, engine::FinishReason::Stop);
    // Where the grammar allows fewer than five tokens, fewer are reported: every
    // alternative could have been drawn.
    assert!(outcome
        .tokens
        .iter()
        .any(|token| token.top_logprobs.len() < 5));
    for token in &outcome.tokens {
        assert!(!token.top_logprobs.is_empty());
        for alternative in &token.top_logprobs {
            assert!(alternative.logprob.is_finite(), "{:?}", token);
        }
    }
}

#[test]
fn a_constrained_generation_resumed_elsewhere_continues_exactly() {
    let first_node = start(2, 1024);
    let prompt = chat_prompt(&first_node, "Describe a person and their pets.");
    let mut whole = generation(prompt, sampled(0.9, 77), 200);
    whole.grammar = Some(json_schema_grammar(&person_schema()));
    let full = run(&first_node, whole.clone());
    assert!(full.tokens.len() > 12, "{:?}", full.text());
    drop(first_node);

    let second_node = start(1, 1024);
    let mut resumed = whole;
    resumed.committed = full.token_ids()[..10].to_vec();
    let tail = run(&second_node, resumed);
    assert_eq!(tail.token_ids(), full.token_ids()[10..]);
    assert_eq!(tail.done.reason, full.done.reason);
}

#[test]
fn a_grammar_that_does_not_compile_or_committed_tokens_it_forbids_fail_the_generation() {
    let engine = start(1, 512);
    let prompt = chat_prompt(&engine, "Hi");
    let mut broken = generation(prompt.clone(), SamplingParams::greedy(), 8);
    broken.grammar = Some("{\"grammars\": 7}".to_string());
    let mut stream = engine.submit(broken).expect("submit");
    assert!(matches!(
        next_event(&mut stream),
        Some(engine::GenerationEvent::Failed(
            engine::EngineError::InvalidGeneration(_)
        ))
    ));
    // "Hi" is not how a JSON object starts.
    let mut forbidden = generation(prompt, SamplingParams::greedy(), 8);
    forbidden.grammar = Some(json_schema_grammar(&json!({"type": "object"})));
    forbidden.committed = engine.tokenizer().tokenize("Hi", false).unwrap();
    let mut stream = engine.submit(forbidden).expect("submit");
    assert!(matches!(
        next_event(&mut stream),
        Some(engine::GenerationEvent::Failed(
            engine::EngineError::InvalidGeneration(_)
        ))
    ));
}

#[test]
fn the_compiler_refuses_what_it_cannot_follow_and_names_it() {
    let tokenizer = engine::Tokenizer::load(&test_model_path()).expect("tokenizer");
    let compiler = GrammarCompiler::new(&tokenizer).expect("compiler");
    compiler
        .check(&json_schema_grammar(&person_schema()))
        .expect("the person schema compiles");
    let unsatisfiable = json!({"type": "integer", "minimum": 5, "maximum": 1});
    assert!(compiler
        .check(&json_schema_grammar(&unsatisfiable))
        .is_err());
    let dangling = json!({"$ref": "#/$defs/missing"});
    let error = compiler
        .check(&json_schema_grammar(&dangling))
        .expect_err("a reference to nothing");
    assert!(error.contains("missing"), "{error}");
}
