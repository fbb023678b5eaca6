"""The clients users reach for, against a running gateway: the official `openai`
SDK, `langchain-openai` and `litellm`. Prints one JSON object of results; the
Rust test `clients.rs` asserts on it.

Usage: compat.py BASE_URL API_KEY MODEL FORCED_TOKEN_ID FORCED_TOKEN_TEXT
"""

import json
import os
import sys

# litellm reads its model price map from the network unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from typing import Literal

import litellm
import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, api_key, model, forced_id, forced_text = sys.argv[1:6]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
results = {}

# A prompt whose greedy answer repeats itself, so that penalties show.
counting = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
story = [{"role": "user", "content": "Write a short story about a parked car."}]


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


def refusal(**fields):
    try:
        client.chat.completions.create(model=model, messages=story, max_tokens=4, **fields)
        return None
    except openai.BadRequestError as error:
        return {"status": error.status_code, "param": error.body.get("param")}


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
results["refused_unknown"] = refusal(extra_body={"guided_json": {"type": "object"}})
results["refused_tool_schema"] = refusal(
    tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["n"]}}}],
    tool_choice="required",
)
results["refused_tool_choice"] = refusal(
    tools=[{"type": "function", "function": {"name": "f"}}],
    tool_choice={"type": "function", "function": {"name": "g"}},
)
results["refused_store"] = refusal(store=True)
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


class Pet(BaseModel):
    kind: str = Field(max_length=12)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]
    pets: list[Pet] = Field(max_length=2)


describe = [{"role": "user", "content": "Describe a person and their pets."}]
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
structured = ChatOpenAI(
    model=model, base_url=base_url, api_key=api_key, temperature=0.8, max_tokens=160, max_retries=0
).with_structured_output(Person, method="json_schema")
results["langchain_structured"] = structured.invoke(describe[0]["content"]).model_dump()
lite = litellm.completion(
    model=f"openai/{model}", api_base=base_url, api_key=api_key, messages=describe,
    max_tokens=160, temperature=0.5, response_format=Person,
)
results["litellm_structured"] = Person.model_validate_json(
    lite.choices[0].message.content
).model_dump()
# Tool calls. Two tools; the arguments always follow the function's parameters.
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
clock = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}}}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]


def calls_of(message):
    return [
        {"id": call.id, "name": call.function.name, "arguments": json.loads(call.function.arguments)}
        for call in message.tool_calls or []
    ]


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

# LangChain's bind_tools round trip: the model calls the tool, the tool's result
# goes back as a ToolMessage, and the model answers.
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Current weather in a city."""
    return f"Sunny and 21 degrees {unit} in {city}."


agent = ChatOpenAI(
    model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=400, max_retries=0
)
history = [HumanMessage("What is the weather in Paris?")]
called = agent.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
history.append(called)
for call in called.tool_calls:
    history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
answered = agent.bind_tools([get_weather], tool_choice="none").invoke(history)
results["langchain_tools"] = {
    "calls": [{"name": call["name"], "args": call["args"]} for call in called.tool_calls],
    "answer": answered.content,
    "answer_calls": len(answered.tool_calls),
}
lite_tools = litellm.completion(
    model=f"openai/{model}", api_base=base_url, api_key=api_key, messages=ask,
    tools=[weather], tool_choice="required", max_tokens=400, temperature=0,
)
results["litellm_tools"] = calls_of(lite_tools.choices[0].message)
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
results["forced_text"] = forced_text
print(json.dumps(results))
