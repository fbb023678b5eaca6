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
results["refused_tools"] = refusal(
    tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
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
results["forced_text"] = forced_text
print(json.dumps(results))
