"""The official `openai` Python client against a running `brigade serve`.

Greedy (temperature 0) completions and chat completions, streaming and not,
must return exactly the text `brigade generate --temperature 0 --json` prints.
Run by scripts/test-extra.sh:

    python tests/openai_client.py --base-url http://127.0.0.1:PORT --api-key KEY --brigade target/debug/brigade
"""

import argparse
import json
import subprocess
import sys

import openai

MAX_TOKENS = 24


def generate(brigade, prompt, chat):
    cmd = [brigade, "generate", "--prompt", prompt, "--temperature", "0", "--json", "--max-tokens", str(MAX_TOKENS)]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--brigade", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0)
    models = client.models.list()
    model = models.data[0].id
    failures = []

    def check(name, got, want):
        status = "ok" if got == want else "FAIL"
        print(f"{status}: {name}: {got!r}" + ("" if got == want else f" != {want!r}"))
        if got != want:
            failures.append(name)

    # Completions.
    prompt = "The capital of France is"
    want = generate(a.brigade, prompt, chat=False)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    check("completions", r.choices[0].text, want["text"])
    check("completions finish_reason", r.choices[0].finish_reason, want["finish_reason"])
    check("completions usage.prompt_tokens", r.usage.prompt_tokens, len(want["prompt_token_ids"]))
    text = ""
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    check("completions stream", text, want["text"])

    # Chat completions.
    question = "What is the capital of France?"
    want = generate(a.brigade, question, chat=True)
    msgs = [{"role": "user", "content": question}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    check("chat", r.choices[0].message.content, want["text"])
    check("chat role", r.choices[0].message.role, "assistant")
    check("chat usage.completion_tokens", r.usage.completion_tokens, len(want["token_ids"]))
    text, usage = "", None
    stream = client.chat.completions.create(
        model=model, messages=msgs, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    check("chat stream", text, want["text"])
    check("chat stream usage", usage is not None and usage.completion_tokens, len(want["token_ids"]))

    # Logprobs come through the client's types.
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    check("chat logprobs entries", len(lp), r.usage.completion_tokens)
    check("chat top_logprobs", all(len(e.top_logprobs) == 3 for e in lp), True)

    # Errors map to the client's exception classes.
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        failures.append("unknown model accepted")
    except openai.NotFoundError:
        print("ok: unknown model -> NotFoundError")
    try:
        openai.OpenAI(base_url=a.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
        failures.append("wrong key accepted")
    except openai.AuthenticationError:
        print("ok: wrong key -> AuthenticationError")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=-3)
        failures.append("bad temperature accepted")
    except openai.BadRequestError as e:
        check("400 param", e.body.get("param") if isinstance(e.body, dict) else None, "temperature")

    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
