"""The clients users reach for, against a gateway whose `auto` routes between
the fleet and a cloud upstream: structured output, tool calls, penalties and
the refusals `auto` must give. Prints one JSON object of results; the Rust test
`clients.rs` asserts on it.

Usage: compat_auto.py BASE_URL API_KEY
"""

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from typing import Literal

import litellm
import openai
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, api_key = sys.argv[1:3]
model = "auto"
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
results = {}
story = [{"role": "user", "content": "Write a short story about a parked car."}]


def refusal(**fields):
    try:
        client.chat.completions.create(model=model, messages=story, max_tokens=4, **fields)
        return None
    except openai.BadRequestError as error:
        return {"status": error.status_code, "param": error.body.get("param")}


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


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]


describe = [{"role": "user", "content": "Describe a person."}]
parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(model=model, messages=describe, response_format=Person, max_tokens=120, temperature=0)
results["sdk_parsed"] = parsed.choices[0].message.parsed.model_dump()
structured = ChatOpenAI(
    model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=120, max_retries=0
).with_structured_output(Person, method="json_schema")
results["langchain_structured"] = structured.invoke(describe[0]["content"]).model_dump()
lite = litellm.completion(
    model=f"openai/{model}", api_base=base_url, api_key=api_key, messages=describe,
    max_tokens=120, temperature=0, response_format=Person,
)
results["litellm_structured"] = Person.model_validate_json(lite.choices[0].message.content).model_dump()

weather = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat.completions.create(
    model=model, messages=ask, tools=[weather], tool_choice="required", max_tokens=200, temperature=0
)
results["sdk_tools"] = [
    {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
    for call in called.choices[0].message.tool_calls or []
]


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny and 21 degrees in {city}."


agent = ChatOpenAI(
    model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=200, max_retries=0
)
history = [HumanMessage("What is the weather in Paris?")]
call = agent.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
history.append(call)
for made in call.tool_calls:
    history.append(ToolMessage(get_weather.invoke(made["args"]), tool_call_id=made["id"]))
answered = agent.bind_tools([get_weather], tool_choice="none").invoke(history)
results["langchain_tools"] = {
    "calls": [{"name": made["name"], "args": made["args"]} for made in call.tool_calls],
    "answer": answered.content,
}
results["refused_logit_bias"] = refusal(logit_bias={"42": 5})
results["refused_n"] = refusal(n=2)
print(json.dumps(results))
