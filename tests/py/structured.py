"""Structured output through the official `openai` client, checked with the
`jsonschema` package, against a running `brigade serve` with the real model.

For a set of JSON schemas (nested objects, bounded arrays, enums, bounded
numbers, optional fields, $ref/$defs, patterns), every output must parse and
validate: `response_format` json_schema and vLLM's `guided_json` (extra_body),
streaming and not, one at a time and 64 at once; regex, choice and GBNF
outputs must match; a bad schema is a 400 naming the field. Run by
scripts/test-extra.sh:

    python tests/py/structured.py --base-url http://127.0.0.1:PORT --api-key KEY
"""

import argparse
import concurrent.futures
import json
import re
import sys

import jsonschema
import openai

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "colors": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4}},
        "required": ["colors"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["score", "count"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "note": {"type": "string", "maxLength": 30}},
        "required": ["done"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
                },
                "required": ["id", "tags"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3}},
        "required": ["items"],
        "additionalProperties": False,
    },
}


def ask(name):
    return [{"role": "user", "content": f"Give me an example {name} record as JSON."}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    failures = []

    def check_json(label, schema, text):
        try:
            jsonschema.validate(json.loads(text), schema)
            print(f"ok    {label}")
        except Exception as e:  # noqa: BLE001 - report every kind of failure
            failures.append(label)
            print(f"FAIL  {label}: {text!r}: {e}")

    def chat(name, schema, stream, seed, via):
        kw = dict(model=model, messages=ask(name), max_tokens=256, temperature=0.8, seed=seed)
        if via == "response_format":
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        else:
            kw["extra_body"] = {"guided_json": schema}
        if stream:
            text = ""
            for chunk in client.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    text += ch.delta.content or ""
            return text
        return client.chat.completions.create(**kw).choices[0].message.content

    for name, schema in SCHEMAS.items():
        for stream in (False, True):
            for via in ("response_format", "guided_json"):
                check_json(f"{name} {via} stream={stream}", schema, chat(name, schema, stream, 1, via))

    jobs = [(name, SCHEMAS[name], i % 2 == 0, 100 + i) for i, name in zip(range(64), list(SCHEMAS) * 13)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        futs = [pool.submit(chat, n, s, st, seed, "response_format") for n, s, st, seed in jobs]
        for (n, s, st, seed), f in zip(jobs, futs):
            check_json(f"64 at once: {n} stream={st} seed={seed}", s, f.result())

    def completion(extra):
        r = client.completions.create(model=model, prompt="Answer:", max_tokens=32, temperature=0.8, seed=5, extra_body=extra)
        return r.choices[0].text

    for label, extra, pattern in [
        ("regex", {"guided_regex": "[0-9]{3}-[0-9]{4}"}, r"[0-9]{3}-[0-9]{4}"),
        ("choice", {"guided_choice": ["yes", "no"]}, r"yes|no"),
        ("gbnf", {"grammar": 'root ::= "[" w (", " w){0,3} "]"\nw ::= [a-z]{1,6}'}, r"\[[a-z]{1,6}(, [a-z]{1,6}){0,3}\]"),
    ]:
        text = completion(extra)
        ok = re.fullmatch(pattern, text) is not None
        print(f"{'ok  ' if ok else 'FAIL'}  {label}: {text!r}")
        if not ok:
            failures.append(label)

    try:
        client.chat.completions.create(
            model=model, messages=ask("x"), max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}},
        )
        failures.append("bad schema accepted")
        print("FAIL  bad schema accepted")
    except openai.BadRequestError as e:
        param = e.body.get("param") if isinstance(e.body, dict) else None
        ok = param == "response_format"
        print(f"{'ok  ' if ok else 'FAIL'}  bad schema: 400, param={param}")
        if not ok:
            failures.append("bad schema param")

    if failures:
        print(f"{len(failures)} structured-output checks failed")
        sys.exit(1)
    print("structured output: all passed")


if __name__ == "__main__":
    main()
