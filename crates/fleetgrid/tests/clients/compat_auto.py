"""The clients users reach for, against a gateway whose `auto` routes between
the fleet and a cloud upstream: structured output, tool calls, penalties and
the refusals `auto` must give. Prints one JSON object of results; the Rust test
`clients.rs` asserts on it.

Usage: compat_auto.py BASE_URL API_KEY
"""

base_url, api_key = sys.argv[1:3]
model = "auto"
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
results = {}

answer = client.chat.completions.create(
    model=model, messages=story, max_tokens=32, temperature=0,
    frequency_penalty=1.0, presence_penalty=0.5, extra_body={"min_p": 0.05, "top_k": 20},
)
results["penalised"] = {"content": answer.choices[0].message.content,
                        "tier": answer.model_extra["fleetgrid"]["tier"]}
results["penalised_streamed"] = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in client.chat.completions.create(
        model=model, messages=story, max_tokens=32, temperature=0, stream=True,
        frequency_penalty=1.0, presence_penalty=0.5,
    )
    if chunk.choices
)

parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(model=model, messages=describe, response_format=Person, max_tokens=160, temperature=0)
results["sdk_parsed"] = parsed.choices[0].message.parsed.model_dump()
results.update(structured(model, base_url, api_key, 0, 0))

called = client.chat.completions.create(
    model=model, messages=ask, tools=[weather], tool_choice="required", max_tokens=400, temperature=0
)
results["sdk_tools"] = calls_of(called.choices[0].message)
results.update(tool_round_trips(model, base_url, api_key))
results["refused_logit_bias"] = refusal(client, model, logit_bias={"42": 5})
results["refused_n"] = refusal(client, model, n=2)
results["refused_echo"] = completion_refusal(client, model, prompt="The car was", echo=True)
results["refused_token_prompt"] = completion_refusal(client, model, prompt=[1, 2, 3])
print(json.dumps(results))
