"""Tool calling through the clients users have, against a running `brigade serve`
started with a tool-capable `--chat-template` (llama.cpp's Qwen 2.5 template):

- the official `openai` SDK: chat.completions with `tools` and `tool_choice`
  (`required`, a named function, `parallel_tool_calls=False`), streamed and not;
  streamed deltas reassemble to the non-streamed answer (greedy); the history
  with the answer's tool calls and a tool result is accepted; a bad schema is a
  400 naming it;
- LangChain (`langchain-openai`): `bind_tools` with `tool_choice`, and
  `with_structured_output` in its `json_schema` and `function_calling` modes.

Every call's arguments must parse as JSON and validate (`jsonschema`) against
its tool's parameters schema. Run by scripts/test-extra.sh:

    python tests/py/tools.py --base-url http://127.0.0.1:PORT --api-key KEY
"""

import argparse
import json
import sys
from typing import List, Literal, Optional

import jsonschema
import openai
from pydantic import BaseModel, Field

MAX_TOKENS = 200

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

BOOKING = {
    "type": "function",
    "function": {
        "name": "book_table",
        "description": "Book a restaurant table",
        "parameters": {
            "type": "object",
            "$defs": {
                "Time": {
                    "type": "object",
                    "properties": {
                        "hour": {"type": "integer", "minimum": 11, "maximum": 22},
                        "minute": {"type": "integer", "enum": [0, 15, 30, 45]},
                    },
                    "required": ["hour", "minute"],
                    "additionalProperties": False,
                }
            },
            "properties": {
                "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                "time": {"$ref": "#/$defs/Time"},
                "notes": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
            },
            "required": ["guests", "time"],
            "additionalProperties": False,
        },
    },
}

TOOLS = [WEATHER, BOOKING]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    role: Literal["author", "reviewer", "other"]
    email: Optional[str] = Field(default=None, max_length=60)


class People(BaseModel):
    """Everyone mentioned in the text."""

    people: List[Person] = Field(max_length=3)


failures = []


def check(name, ok, detail=""):
    print(("ok" if ok else "FAIL") + f": {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)


def valid_args(name, arguments):
    """Arguments (a JSON string or a dict) parse and validate against the tool's schema."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        jsonschema.validate(args, SCHEMAS[name])
        return True, ""
    except Exception as e:  # noqa: BLE001 - reported as a failure
        return False, f"{name} {arguments!r}: {e}"


def sdk_tests(client, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius? And book a table for 2 at 19:30."}]
    cases = [
        ("required", "required", True),
        ("required, parallel_tool_calls=False", "required", False),
        ("named book_table", {"type": "function", "function": {"name": "book_table"}}, True),
        ("named get_weather", {"type": "function", "function": {"name": "get_weather"}}, False),
    ]
    for label, choice, parallel in cases:
        kw = dict(model=model, messages=msgs, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel, max_tokens=MAX_TOKENS, temperature=0)
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        calls = c.message.tool_calls or []
        check(f"sdk {label}: finish_reason tool_calls", c.finish_reason == "tool_calls", c.finish_reason)
        check(f"sdk {label}: at least one call", len(calls) >= 1, repr(c.message))
        if isinstance(choice, dict) or not parallel:
            check(f"sdk {label}: exactly one call", len(calls) == 1, repr(calls))
        if isinstance(choice, dict):
            want = choice["function"]["name"]
            check(f"sdk {label}: the named function", all(t.function.name == want for t in calls), repr(calls))
        for t in calls:
            check(f"sdk {label}: id and type", t.id.startswith("call_") and t.type == "function", repr(t))
            check(f"sdk {label}: {t.function.name} arguments validate", *valid_args(t.function.name, t.function.arguments))

        # Streamed: the deltas reassemble to the same message.
        content, streamed, finish = "", {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.id is not None:
                    streamed[tc.index] = [tc.function.name, ""]
                streamed[tc.index][1] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        got = [tuple(streamed[i]) for i in sorted(streamed)]
        want = [(t.function.name, t.function.arguments) for t in calls]
        check(f"sdk {label}: stream reassembles to the message", got == want and finish == c.finish_reason, f"{got} / {want}, {finish}")
        check(f"sdk {label}: stream content", (content or None) == c.message.content, f"{content!r} / {c.message.content!r}")

        # The answer's calls and a result go back as history.
        if calls:
            history = msgs + [c.message.model_dump(exclude_none=True)]
            history += [{"role": "tool", "tool_call_id": t.id, "content": json.dumps({"ok": True})} for t in calls]
            r2 = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=16, temperature=0)
            check(f"sdk {label}: history with tool results", r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), repr(r2))

    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "float"}}}}}]
    try:
        client.chat.completions.create(model=model, messages=msgs, tools=bad, max_tokens=4)
        check("sdk bad schema is a 400", False, "accepted")
    except openai.BadRequestError as e:
        param = (e.body or {}).get("param") if isinstance(e.body, dict) else None
        check("sdk bad schema is a 400 naming it", param == "tools[0].function.parameters.properties.x.type", repr(e.body))


def langchain_tests(base_url, api_key, model):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=model, base_url=base_url + "/v1", api_key=api_key, temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    tool_schema = get_weather.tool_call_schema.model_json_schema()
    for choice in ["get_weather", "any", "required"]:
        msg = llm.bind_tools([get_weather], tool_choice=choice).invoke("What's the weather in Oslo?")
        calls = msg.tool_calls
        check(f"langchain bind_tools tool_choice={choice}: a call", len(calls) >= 1 and all(c["name"] == "get_weather" for c in calls), repr(msg))
        for c in calls:
            try:
                jsonschema.validate(c["args"], tool_schema)
                check(f"langchain bind_tools tool_choice={choice}: args validate", True)
            except jsonschema.ValidationError as e:
                check(f"langchain bind_tools tool_choice={choice}: args validate", False, f"{c['args']}: {e.message}")
    text = "Ada Lovelace (36) wrote the notes; Charles Babbage, 79, reviewed them."
    for method in ["json_schema", "function_calling"]:
        try:
            out = llm.with_structured_output(People, method=method).invoke(f"Extract the people: {text}")
            ok = isinstance(out, People)
            if ok:
                jsonschema.validate(out.model_dump(mode="json"), People.model_json_schema())
            check(f"langchain with_structured_output({method})", ok, repr(out))
        except Exception as e:  # noqa: BLE001 - reported as a failure
            check(f"langchain with_structured_output({method})", False, f"{type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0)
    model = client.models.list().data[0].id
    sdk_tests(client, model)
    langchain_tests(a.base_url, a.api_key, model)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("tools: all passed")


if __name__ == "__main__":
    main()
