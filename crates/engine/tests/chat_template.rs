//! The models' own chat templates rendered as Jinja (for conversations with tools), on the
//! real GGUF files: SmolLM2's, which knows nothing of tools, and Qwen2.5-Coder's, which writes
//! Hermes-style `<tool_call>` blocks.

use engine::testing::{cloud_test_model_path, test_model_path};
use engine::{
    tool_call_grammar, ChatMessage, Constrained, GrammarCompiler, Tokenizer, ToolCallFormat,
};
use serde_json::json;

fn weather_tool() -> serde_json::Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }})
}

#[test]
fn a_plain_chat_renders_as_llama_cpp_renders_it() {
    let tokenizer = Tokenizer::load(&test_model_path()).expect("tokenizer");
    let template = tokenizer.jinja_template().expect("a Jinja template");
    assert_eq!(template.tool_call_format(), ToolCallFormat::Generic);
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi!"),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Bye?"),
    ];
    let as_json = json!(messages
        .iter()
        .map(|message| json!({"role": message.role, "content": message.content}))
        .collect::<Vec<_>>());
    for open in [true, false] {
        assert_eq!(
            template.render(&as_json, None, open).expect("render"),
            tokenizer
                .apply_chat_template(&messages, open)
                .expect("render"),
        );
    }
}

#[test]
fn a_hermes_template_lists_the_tools_and_writes_calls_and_results_in_its_blocks() {
    let tokenizer = Tokenizer::load(&cloud_test_model_path()).expect("tokenizer");
    let template = tokenizer.jinja_template().expect("a Jinja template");
    assert_eq!(template.tool_call_format(), ToolCallFormat::Hermes);
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]);
    let tools = json!([weather_tool()]);
    let rendered = template
        .render(&messages, Some(&tools), true)
        .expect("render");
    // The tool as Python's json.dumps writes it, keys in the order sent.
    assert!(
        rendered.contains(
            r#"{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#
        ),
        "{rendered}"
    );
    assert!(
        rendered.contains(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        ),
        "{rendered}"
    );
    assert!(
        rendered.contains("<tool_response>\nsunny\n</tool_response>"),
        "{rendered}"
    );
    assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered}");
}

#[test]
fn a_template_that_raises_is_an_error_naming_why() {
    let template = engine::ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}",
        "",
        "",
    )
    .expect("compile");
    let error = template
        .render(&json!([{"role": "system", "content": "x"}]), None, true)
        .expect_err("the template refuses");
    assert!(
        error
            .to_string()
            .contains("the first message must be the user"),
        "{error}"
    );
}

#[test]
fn a_required_hermes_call_follows_its_grammar_and_no_other_name() {
    let tokenizer = Tokenizer::load(&cloud_test_model_path()).expect("tokenizer");
    let compiler = GrammarCompiler::new(&tokenizer).expect("compiler");
    let call = json!({
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": weather_tool()["function"]["parameters"],
        },
        "required": ["name", "arguments"],
        "additionalProperties": false,
    });
    let grammar = tool_call_grammar(&call, 1);
    let tokens = |text: &str| tokenizer.tokenize(text, false).expect("tokenize");
    let good = tokens(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    );
    let mut state = Constrained::start(&compiler, &grammar, &[]).expect("start");
    assert!(state.follows(&good));
    assert!(state.is_accepting());
    let wrong = tokens("<tool_call>\n{\"name\": \"get_time\"");
    let mut state = Constrained::start(&compiler, &grammar, &[]).expect("start");
    assert!(!state.follows(&wrong));
}
