#!/usr/bin/env python3
"""Render every chat template of llama.cpp's `models/templates/` the way Hugging Face
transformers' `apply_chat_template` does, for a fixed set of conversations; write the
expected texts for tests/chat_templates.rs (which renders the same with minijinja).

Nothing here runs in CI. Run it by hand when the templates or the conversations change;
it overwrites its outputs.

Setup: the reference env (/tmp/refenv: transformers >= 5, jinja2 >= 3.1.6) and the
llama.cpp data files (scripts/fetch-test-data.sh caches them under
~/.cache/brigade/llamacpp-0.3.36/vendor/llama.cpp/models; or unpack the PyPI sdist
`llama-cpp-python==0.3.36`).

Run (from the repo root; a few seconds):

    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/reference/render_templates.py
    # optional: --models DIR   (the `.../llama.cpp/models` dir; default: $BRIGADE_LLAMACPP_DATA,
    #                           then the cache path above)

Outputs (tests/fixtures/templates/):
    conversations.json   the inputs: one entry per case (messages, tools,
                         add_generation_prompt); the fixed clock; the bos/eos table
    <template>.json      {"template": file name, "sha256": of the template text,
                          "bos_token", "eos_token",
                          "cases": {case: {"text": rendering} | {"error": message}}}

How a case is rendered (exactly as `PreTrainedTokenizerBase.apply_chat_template` does
with tokenize=False):

* messages go through `_normalize_chat_messages` (keys whose value is None are dropped);
* `render_jinja_template(conversations=[messages], tools=tools, documents=None,
  chat_template=source, add_generation_prompt=..., bos_token=..., eos_token=...)`:
  transformers' own compiled environment (ImmutableSandboxedEnvironment, trim_blocks,
  lstrip_blocks, loopcontrols, the `generation` tag, its `tojson`, `raise_exception`,
  `strftime_now`, `namespace`, `dict`);
* bos_token / eos_token come from BOS_EOS below (by file-name prefix; the strings the
  model families' tokenizers have; `None` = the tokenizer has none, so the variable is
  not passed at all, as transformers omits unset special tokens);
* `strftime_now` reads a fixed clock, FIXED_NOW (naive, as `datetime.now()` is); the
  Rust test pins the same instant;
* a case's `kwargs` are extra template variables (`apply_chat_template(**kwargs)`);
* a message's `reasoning_content` is aliased as `thinking` by transformers itself;
* a case whose rendering raises records {"error": the exception's message}: the Rust
  side must fail too (its message is not compared).

Conventions of the conversations (what Brigade's `ChatMessage` carries):
* `tool_calls[].function.arguments` is a JSON object (a dict), as transformers' docs
  ask and as the templates that `tojson` it expect, except in `tool_call_string_arguments`
  (OpenAI's wire form, a string holding JSON); `tool_calls[].id` and `type` are set;
* a `tool` message has `tool_call_id`, `name` and string content;
* `content` is a string, or a list of `{"type": "text", "text": ...}` parts; an
  assistant turn that calls tools has content "" or text, or `null` (dropped by
  normalization, case `tool_call_null_content`).
"""

import argparse
import datetime as real_datetime
import hashlib
import json
import os
import sys
from pathlib import Path

from transformers.utils import chat_template_utils
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "templates"
DEFAULT_MODELS = Path.home() / ".cache/brigade/llamacpp-0.3.36/vendor/llama.cpp/models"

# The clock strftime_now reads (also in conversations.json for the Rust test).
FIXED_NOW = real_datetime.datetime(2024, 2, 5, 14, 3, 9)

# bos/eos by file-name prefix: first match wins; the last entry is the default.
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
BOS_EOS = [
    ("NousResearch-Hermes-2-Pro", ("<|begin_of_text|>", "<|im_end|>")),
    ("NousResearch-Hermes-3", LLAMA3),
    ("meta-llama-", LLAMA3),
    ("fireworks-ai-llama-3", LLAMA3),
    ("meetkai-functionary", LLAMA3),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama", DEEPSEEK),
    ("deepseek-", DEEPSEEK),
    ("llama-cpp-deepseek", DEEPSEEK),
    ("Qwen", (None, "<|im_end|>")),
    ("Kimi", ("[BOS]", "[EOS]")),
    ("moonshotai", ("[BOS]", "[EOS]")),
    ("google-gemma", ("<bos>", "<eos>")),
    ("CohereForAI", ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>")),
    ("Cohere2", ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>")),
    ("microsoft-Phi-3", ("<s>", "<|endoftext|>")),
    ("ibm-granite", ("<|end_of_text|>", "<|end_of_text|>")),
    ("openai-gpt-oss", ("<|startoftext|>", "<|return|>")),
    ("HuggingFaceTB-SmolLM3", (None, "<|im_end|>")),
    ("GLM", (None, "<|endoftext|>")),
    ("LFM", ("<|startoftext|>", "<|im_end|>")),
    ("", ("<s>", "</s>")),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "description": "IANA zone, e.g. Europe/Paris"}},
            "required": ["tz"],
        },
    },
}

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CALL = {
    "id": "a1b2c3d4e",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
}

CASES = {
    "system_user_gen": {
        "messages": [SYSTEM, {"role": "user", "content": "Hello!"}],
        "add_generation_prompt": True,
    },
    "user_gen": {
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "add_generation_prompt": True,
    },
    "user_nogen": {
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "add_generation_prompt": False,
    },
    "multi_turn_gen": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "I am an assistant."},
            {"role": "user", "content": "Tell me a joke."},
        ],
        "add_generation_prompt": True,
    },
    "multi_turn_nogen": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
        ],
        "add_generation_prompt": False,
    },
    "unicode": {
        "messages": [
            {"role": "system", "content": "  Réponds en français, s'il te plaît.\n"},
            {"role": "user", "content": "Emoji 🦀🚀, 日本語, \"quotes\" and 'single', a\\b, <b>&amp;</b>\n\nnew\tlines  "},
            {"role": "assistant", "content": "D'accord : « 你好 » 👍"},
            {"role": "user", "content": "{{ not a template }} {% raw %}"},
        ],
        "add_generation_prompt": True,
    },
    "content_parts": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "the sky."}]},
        ],
        "add_generation_prompt": True,
    },
    "tools_gen": {
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "add_generation_prompt": True,
    },
    "tool_call_roundtrip": {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True,
    },
    "tool_call_null_content": {
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "21 C"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True,
    },
    "tool_call_then_answer": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "21 C, clear"},
            {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": False,
    },
    "tool_call_string_arguments": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "a1b2c3d4e",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "21 C"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True,
    },
    "reasoning_multi_turn": {
        "messages": [
            {"role": "user", "content": "What is 17 * 3?"},
            {"role": "assistant", "content": "51.", "reasoning_content": "17 * 3 = 51."},
            {"role": "user", "content": "And 17 * 4?"},
        ],
        "add_generation_prompt": True,
    },
    "thinking_disabled": {
        "messages": [{"role": "user", "content": "Hi!"}],
        "kwargs": {"enable_thinking": False},
        "add_generation_prompt": True,
    },
    "not_alternating": {
        "messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        "add_generation_prompt": True,
    },
    "empty_content": {
        "messages": [SYSTEM, {"role": "user", "content": ""}],
        "add_generation_prompt": True,
    },
}


class FixedDatetime(real_datetime.datetime):
    """`datetime` whose `now()` is FIXED_NOW (what transformers' strftime_now reads)."""

    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


def bos_eos(name):
    for prefix, tokens in BOS_EOS:
        if name.startswith(prefix):
            return tokens
    raise AssertionError("BOS_EOS has a default entry")


def render(source, case, bos, eos):
    kwargs = {}  # the tokenizer's special tokens, then the case's template variables
    if bos is not None:
        kwargs["bos_token"] = bos
    if eos is not None:
        kwargs["eos_token"] = eos
    kwargs.update(json.loads(json.dumps(case.get("kwargs", {}))))
    messages = _normalize_chat_messages(json.loads(json.dumps(case["messages"])))
    tools = case.get("tools")
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=json.loads(json.dumps(tools)) if tools is not None else None,
            documents=None,
            chat_template=source,
            add_generation_prompt=case["add_generation_prompt"],
            **kwargs,
        )
        return {"text": rendered[0]}
    except Exception as e:  # noqa: BLE001 - any failure is the expected outcome
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser()
    default = os.environ.get("BRIGADE_LLAMACPP_DATA") or str(DEFAULT_MODELS)
    ap.add_argument("--models", default=default, help="llama.cpp's models/ dir")
    args = ap.parse_args()
    templates = Path(args.models) / "templates"
    files = sorted(p for p in templates.glob("*.jinja"))
    if not files:
        sys.exit(f"no *.jinja under {templates}")

    chat_template_utils.datetime = FixedDatetime  # strftime_now's clock
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*.json"):
        old.unlink()
    conversations = {
        "fixed_now": FIXED_NOW.isoformat(),
        "cases": CASES,
    }
    (OUT_DIR / "conversations.json").write_text(
        json.dumps(conversations, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    num_errors = 0
    for path in files:
        source = path.read_text(encoding="utf-8")
        bos, eos = bos_eos(path.name)
        cases = {name: render(source, case, bos, eos) for name, case in CASES.items()}
        num_errors += sum("error" in c for c in cases.values())
        fixture = {
            "template": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bos_token": bos,
            "eos_token": eos,
            "cases": cases,
        }
        out = OUT_DIR / (path.stem + ".json")
        out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(files)} templates x {len(CASES)} cases ({num_errors} expected errors) -> {OUT_DIR}")


if __name__ == "__main__":
    main()
