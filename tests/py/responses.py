"""The official `openai` Python client's Responses API (and the rest of the
surface it probes) against a running `brigade serve` with the real model.

- `client.responses.create`, not streamed and streamed (`stream=True`, and the
  SDK's `responses.stream` helper): the greedy text equals chat's for the same
  conversation; the events come in the documented order;
- `client.responses.retrieve` returns the stored response; `previous_response_id`
  continues it; `client.responses.delete` removes it (then 404: NotFoundError);
- `client.models.retrieve` of the served name (and 404 for another);
- a CORS preflight is answered for an allowed origin (the server is started with
  `--allowed-origins`).

Run by scripts/test-extra.sh:

    python tests/py/responses.py --base-url http://127.0.0.1:PORT --api-key KEY --origin http://app.test
"""

import argparse
import sys
import urllib.request

import openai

MAX_TOKENS = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--origin", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0)
    failures = []

    def check(name, ok, detail=""):
        print(("ok  " if ok else "FAIL"), name, detail if not ok else "")
        if not ok:
            failures.append(name)

    model = client.models.list().data[0].id
    m = client.models.retrieve(model)
    check("models.retrieve", m.id == model and m.object == "model", repr(m))
    try:
        client.models.retrieve("no-such-model")
        check("models.retrieve unknown is 404", False, "no error")
    except openai.NotFoundError as e:
        check("models.retrieve unknown is 404", e.status_code == 404, repr(e))

    q = "What is the capital of France?"
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0
    )
    want = chat.choices[0].message.content

    r = client.responses.create(model=model, input=q, max_output_tokens=MAX_TOKENS, temperature=0, metadata={"k": "v"})
    check("responses.create object", r.object == "response" and r.id.startswith("resp_"), repr(r))
    check("responses.create status", r.status in ("completed", "incomplete"), r.status)
    check("responses.create output_text == chat", r.output_text == want, f"{r.output_text!r} != {want!r}")
    check(
        "responses.create usage",
        r.usage.input_tokens == chat.usage.prompt_tokens
        and r.usage.output_tokens == chat.usage.completion_tokens
        and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens,
        repr(r.usage),
    )
    check("responses.create metadata", r.metadata == {"k": "v"}, repr(r.metadata))

    # Streamed, raw events.
    events = list(client.responses.create(model=model, input=q, max_output_tokens=MAX_TOKENS, temperature=0, stream=True))
    types = [e.type for e in events]
    check("stream starts", types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], types)
    check("stream ends", types[-1] in ("response.completed", "response.incomplete") and types[-2] == "response.output_item.done", types)
    check("stream sequence numbers", [e.sequence_number for e in events] == list(range(len(events))), "")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check("stream deltas == chat", text == want, f"{text!r} != {want!r}")
    check("stream final response", events[-1].response.output_text == want, repr(events[-1].response))

    # The SDK's stream helper (accumulates the events into a response).
    with client.responses.stream(model=model, input=q, max_output_tokens=MAX_TOKENS, temperature=0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    check("responses.stream helper", final.output_text == want, repr(final))

    # Stored: retrieve, continue, delete.
    got = client.responses.retrieve(r.id)
    check("responses.retrieve", got.id == r.id and got.output_text == r.output_text and got.usage == r.usage, repr(got))
    r2 = client.responses.create(model=model, input="And of Italy?", previous_response_id=r.id, max_output_tokens=MAX_TOKENS, temperature=0)
    chat2 = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q}, {"role": "assistant", "content": want}, {"role": "user", "content": "And of Italy?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    check("previous_response_id continues", r2.output_text == chat2.choices[0].message.content and r2.previous_response_id == r.id, repr(r2))
    client.responses.delete(r2.id)
    try:
        client.responses.retrieve(r2.id)
        check("deleted response is 404", False, "no error")
    except openai.NotFoundError:
        check("deleted response is 404", True)
    try:
        client.responses.create(model=model, input=q, max_output_tokens=0)
        check("bad max_output_tokens is 400", False, "no error")
    except openai.BadRequestError as e:
        check("bad max_output_tokens is 400", e.body.get("param") == "max_output_tokens", repr(e.body))

    # CORS preflight, as a browser sends it.
    req = urllib.request.Request(
        a.base_url + "/v1/responses",
        method="OPTIONS",
        headers={"Origin": a.origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"},
    )
    with urllib.request.urlopen(req) as resp:
        check(
            "CORS preflight",
            resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == a.origin and "POST" in resp.headers["Access-Control-Allow-Methods"],
            repr(dict(resp.headers)),
        )

    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("responses: all passed")


if __name__ == "__main__":
    main()
