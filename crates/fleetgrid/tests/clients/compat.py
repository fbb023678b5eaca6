"""The clients users reach for, against a running gateway: the official `openai`
SDK, `langchain-openai` and `litellm`. Prints one JSON object of results; the
Rust test `clients.rs` asserts on it.

Usage: compat.py BASE_URL API_KEY MODEL FORCED_TOKEN_ID FORCED_TOKEN_TEXT
"""

base_url, api_key, model, forced_id, forced_text = sys.argv[1:6]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
results = {}

# A prompt whose greedy answer repeats itself, so that penalties show.
counting = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]


def chat(messages, **fields):
    answer = client.chat.completions.create(model=model, messages=messages, **fields)
    return answer.choices[0].message.content


def streamed(messages, **fields):
    parts = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, **fields
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


greedy = dict(max_tokens=48, temperature=0)
results["sdk_plain"] = chat(counting, **greedy)
results["sdk_penalised"] = chat(counting, frequency_penalty=1.5, presence_penalty=0.5, **greedy)
results["sdk_penalised_streamed"] = streamed(
    counting, frequency_penalty=1.5, presence_penalty=0.5, **greedy
)
extensions = dict(min_p=0.1, repetition_penalty=1.3, top_k=20)
sampled = dict(max_tokens=40, temperature=0.8, seed=11)
results["sdk_extensions"] = chat(story, extra_body=extensions, **sampled)
results["sdk_extensions_again"] = chat(story, extra_body=extensions, **sampled)
results["sdk_extensions_streamed"] = streamed(story, extra_body=extensions, **sampled)
results["sdk_without_extensions"] = chat(story, **sampled)
results["sdk_forced"] = chat(story, logit_bias={forced_id: 100}, max_tokens=5, temperature=0)
text = client.completions.create(
    model=model, prompt="The car was", max_tokens=12, temperature=0, frequency_penalty=1.0
)
results["sdk_completion_penalised"] = text.choices[0].text
results["refused_unknown"] = refusal(client, model, extra_body={"guided_json": {"type": "object"}})
results["refused_tool_schema"] = refusal(client, model,
    tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["n"]}}}],
    tool_choice="required",
)
results["refused_tool_choice"] = refusal(client, model,
    tools=[{"type": "function", "function": {"name": "f"}}],
    tool_choice={"type": "function", "function": {"name": "g"}},
)
results["refused_store_n"] = refusal(client, model, store=True, n=2)
# A stored completion through the SDK's own endpoints: retrieve, list (which
# pages with `after`), messages, update and delete.
kept = client.chat.completions.create(
    model=model, messages=story, max_tokens=6, temperature=0, store=True, metadata={"suite": "compat"}
)
retrieved = client.chat.completions.retrieve(kept.id)
updated = client.chat.completions.update(kept.id, metadata={"suite": "updated"})
stored = {
    "content": kept.choices[0].message.content,
    "retrieved_content": retrieved.choices[0].message.content,
    "retrieved_metadata": getattr(retrieved, "metadata", None),
    "listed": [item.id for item in client.chat.completions.list(limit=1)].count(kept.id),
    "messages": [message.content for message in client.chat.completions.messages.list(kept.id)],
    "updated_metadata": getattr(updated, "metadata", None),
    "deleted": client.chat.completions.delete(kept.id).deleted,
}
try:
    client.chat.completions.retrieve(kept.id)
    stored["after_delete"] = 200
except openai.NotFoundError as error:
    stored["after_delete"] = error.status_code
results["stored"] = stored
results["accepted_user_metadata"] = chat(
    story, user="end-user-1", metadata={"suite": "compat"}, store=False, max_tokens=4
)

lc = ChatOpenAI(
    model=model,
    base_url=base_url,
    api_key=api_key,
    temperature=0,
    max_tokens=48,
    frequency_penalty=1.5,
    presence_penalty=0.5,
    max_retries=0,
)
results["langchain_invoke"] = lc.invoke(counting[0]["content"]).content
results["langchain_stream"] = "".join(
    chunk.content for chunk in lc.stream(counting[0]["content"])
)

common = dict(
    model=f"openai/{model}",
    api_base=base_url,
    api_key=api_key,
    messages=counting,
    max_tokens=48,
    temperature=0,
    frequency_penalty=1.5,
    presence_penalty=0.5,
)
results["litellm"] = litellm.completion(**common).choices[0].message.content
results["litellm_stream"] = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in litellm.completion(stream=True, **common)
)


# The SDK's own structured output: it sends the Pydantic model's strict JSON
# schema and parses the answer back into the model, raising if it does not fit.
parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = []
for temperature in (0, 0.9, 1.3):
    answer = parse(
        model=model, messages=describe, response_format=Person,
        max_tokens=160, temperature=temperature, seed=5,
    )
    parsed.append(answer.choices[0].message.parsed.model_dump())
results["sdk_parsed"] = parsed
capital = [{"role": "user", "content": "Answer in JSON with the key 'capital': what is the capital of France?"}]
results["sdk_json_object"] = json.loads(
    chat(capital, response_format={"type": "json_object"}, max_tokens=160, temperature=0)
)
results.update(structured(model, base_url, api_key, 0.8, 0.5))
# Tool calls. Two tools; the arguments always follow the function's parameters.
clock = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}}}
def tool_answer(**fields):
    answer = client.chat.completions.create(
        model=model, messages=ask, tools=[weather, clock], max_tokens=400, **fields
    )
    choice = answer.choices[0]
    return {"finish_reason": choice.finish_reason, "content": choice.message.content,
            "calls": calls_of(choice.message)}


def streamed_tool_answer(**fields):
    calls, content, finish = {}, [], None
    for chunk in client.chat.completions.create(
        model=model, messages=ask, tools=[weather, clock], max_tokens=400, stream=True, **fields
    ):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        if choice.delta.content:
            content.append(choice.delta.content)
        for part in choice.delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
            call["id"] = part.id or call["id"]
            if part.function and part.function.name:
                call["name"] = part.function.name
            if part.function and part.function.arguments:
                call["arguments"] += part.function.arguments
                call["pieces"] += 1
    return {"finish_reason": finish, "content": "".join(content) or None, "calls": [
        {"id": call["id"], "name": call["name"], "arguments": json.loads(call["arguments"]),
         "pieces": call["pieces"]}
        for _, call in sorted(calls.items())
    ]}


greedy_tools = dict(temperature=0, seed=3)
results["tools_required"] = tool_answer(tool_choice="required", **greedy_tools)
results["tools_required_streamed"] = streamed_tool_answer(tool_choice="required", **greedy_tools)
results["tools_named"] = tool_answer(
    tool_choice={"type": "function", "function": {"name": "get_time"}}, **greedy_tools
)
results["tools_single"] = tool_answer(
    tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=8
)
results["tools_auto"] = tool_answer(tool_choice="auto", **greedy_tools)
results["tools_none"] = tool_answer(tool_choice="none", temperature=0)

# LangChain's bind_tools round trip and litellm's required call.
results.update(tool_round_trips(model, base_url, api_key))
# n > 1: each choice its own generation with its own seed, reproducible, the
# same streamed; best_of keeps the best and bills all.
several = dict(n=3, max_tokens=24, temperature=0.9, seed=21)
answer = client.chat.completions.create(model=model, messages=story, **several)
results["n_choices"] = [choice.message.content for choice in answer.choices]
results["n_indices"] = [choice.index for choice in answer.choices]
results["n_usage"] = answer.usage.model_dump()
again = client.chat.completions.create(model=model, messages=story, **several)
results["n_again"] = [choice.message.content for choice in again.choices]
parts = {}
for chunk in client.chat.completions.create(model=model, messages=story, stream=True, **several):
    for choice in chunk.choices:
        parts.setdefault(choice.index, []).append(choice.delta.content or "")
results["n_streamed"] = ["".join(parts[index]) for index in sorted(parts)]
completion_n = client.completions.create(
    model=model, prompt="The car was", n=2, max_tokens=12, temperature=0.9, seed=4
)
results["n_completions"] = [choice.text for choice in completion_n.choices]
best = client.completions.create(
    model=model, prompt="The car was", n=1, best_of=3, max_tokens=12, temperature=0.9, seed=4
)
results["best_of"] = {"texts": [choice.text for choice in best.choices],
                      "completion_tokens": best.usage.completion_tokens}
lc_several = ChatOpenAI(
    model=model, base_url=base_url, api_key=api_key, temperature=0.9, max_tokens=24, n=3,
    seed=21, max_retries=0,
)
results["langchain_n"] = [
    generation.text
    for generation in lc_several.generate([[HumanMessage(story[0]["content"])]]).generations[0]
]
# An evaluation harness's loglikelihood request: the prompt echoed with its
# tokens' log-probabilities and one token generated; the continuation's tokens
# found by their text offsets, as harnesses do.
def continuation_logprob(context, continuation):
    prompt = context + continuation
    scored = client.completions.create(
        model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    logprobs = scored.choices[0].logprobs
    inside = [
        logprob
        for offset, logprob in zip(logprobs.text_offset, logprobs.token_logprobs)
        if len(context) <= offset < len(prompt)
    ]
    return scored, sum(inside)


scored, paris = continuation_logprob("The capital of France is", " Paris")
_, banana = continuation_logprob("The capital of France is", " banana")
logprobs = scored.choices[0].logprobs
results["echo_logprobs"] = {
    "prompt": "The capital of France is Paris",
    "text": scored.choices[0].text,
    "tokens": logprobs.tokens,
    "token_logprobs": logprobs.token_logprobs,
    "top_logprobs": logprobs.top_logprobs,
    "text_offset": logprobs.text_offset,
    "prompt_tokens": scored.usage.prompt_tokens,
    "completion_tokens": scored.usage.completion_tokens,
    "paris": paris,
    "banana": banana,
}
results["forced_text"] = forced_text
print(json.dumps(results))
