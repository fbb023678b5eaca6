"""What both client scripts share: the clients' imports, a Pydantic model for
structured output, a tool, and the round trips LangChain and litellm make. The
Rust tests prepend it to `compat.py` and `compat_auto.py`."""

import json
import os
import sys

# litellm reads its model price map from the network unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from typing import Literal

import litellm
import openai
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class Pet(BaseModel):
    kind: str = Field(max_length=12)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]
    pets: list[Pet] = Field(max_length=2)


describe = [{"role": "user", "content": "Describe a person and their pets."}]
story = [{"role": "user", "content": "Write a short story about a parked car."}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Current weather in a city."""
    return f"Sunny and 21 degrees {unit} in {city}."


def calls_of(message):
    """An SDK message's tool calls, their arguments parsed (raising if they are not JSON)."""
    return [
        {"id": call.id, "name": call.function.name, "arguments": json.loads(call.function.arguments)}
        for call in message.tool_calls or []
    ]


def structured(model, base_url, api_key, langchain_temperature, litellm_temperature):
    """LangChain's `with_structured_output` and litellm's `response_format`, each
    parsed into `Person` (raising if the answer does not fit)."""
    chain = ChatOpenAI(
        model=model, base_url=base_url, api_key=api_key, temperature=langchain_temperature,
        max_tokens=160, max_retries=0,
    ).with_structured_output(Person, method="json_schema")
    lite = litellm.completion(
        model=f"openai/{model}", api_base=base_url, api_key=api_key, messages=describe,
        max_tokens=160, temperature=litellm_temperature, response_format=Person,
    )
    return {
        "langchain_structured": chain.invoke(describe[0]["content"]).model_dump(),
        "litellm_structured": Person.model_validate_json(lite.choices[0].message.content).model_dump(),
    }


def tool_round_trips(model, base_url, api_key):
    """LangChain's bind_tools round trip (the model calls the tool, its result goes
    back as a ToolMessage, the model answers) and litellm's required call."""
    agent = ChatOpenAI(
        model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=400, max_retries=0
    )
    history = [HumanMessage(ask[0]["content"])]
    called = agent.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
    history.append(called)
    for call in called.tool_calls:
        history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    answered = agent.bind_tools([get_weather], tool_choice="none").invoke(history)
    lite = litellm.completion(
        model=f"openai/{model}", api_base=base_url, api_key=api_key, messages=ask,
        tools=[weather], tool_choice="required", max_tokens=400, temperature=0,
    )
    return {
        "langchain_tools": {
            "calls": [{"name": call["name"], "args": call["args"]} for call in called.tool_calls],
            "answer": answered.content,
            "answer_calls": len(answered.tool_calls),
        },
        "litellm_tools": calls_of(lite.choices[0].message),
    }


def refusal(client, model, **fields):
    """The 400 a request with `fields` gets: its status and the parameter it names."""
    try:
        client.chat.completions.create(model=model, messages=story, max_tokens=4, **fields)
        return None
    except openai.BadRequestError as error:
        return {"status": error.status_code, "param": error.body.get("param")}


def completion_refusal(client, model, **fields):
    """`refusal` for a completions request."""
    try:
        client.completions.create(model=model, max_tokens=4, **fields)
        return None
    except openai.BadRequestError as error:
        return {"status": error.status_code, "param": error.body.get("param")}
