"""The Batch API through the official `openai` SDK, unmodified: files.create
(purpose "batch"), batches.create, retrieve until completed, files.content of
the output and error files, list (with paging), cancel, files.delete, and a
second tenant's key that sees none of it (404).

Run by scripts/test-extra.sh against `brigade serve --data-dir DIR` with two
tenants; exits non-zero on the first failed check.
"""

import argparse
import json
import time

import openai
from openai import OpenAI

ENDED = ("completed", "failed", "cancelled", "expired")


def wait(client, batch_id, timeout_s=600):
    t0 = time.time()
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ENDED:
            return b
        assert time.time() - t0 < timeout_s, f"batch {batch_id} still {b.status}"
        time.sleep(0.2)


def lines(text):
    out = {}
    for line in text.splitlines():
        v = json.loads(line)
        assert v["custom_id"] not in out, f"{v['custom_id']} answered twice"
        out[v["custom_id"]] = v
    return out


def request(i, max_tokens, **extra):
    body = {"messages": [{"role": "user", "content": f"Say hello number {i}."}], "max_tokens": max_tokens, "temperature": 0}
    body.update(extra)
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--other-key", required=True)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key)
    other = OpenAI(base_url=a.base_url + "/v1", api_key=a.other_key)

    reqs = [request(i, 8) for i in range(3)] + [request(3, 8, temperature=-1)]
    data = "".join(json.dumps(r) + "\n" for r in reqs).encode()
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes == len(data), f
    assert f.id.startswith("file-"), f
    assert client.files.retrieve(f.id).filename == "requests.jsonl"
    assert f.id in [x.id for x in client.files.list()]
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.content(f.id).content == data

    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"suite": "test-extra"})
    assert b.object == "batch" and b.status in ("validating", "in_progress"), b
    assert b.metadata == {"suite": "test-extra"}, b.metadata
    b = wait(client, b.id)
    assert b.status == "completed", b
    rc = b.request_counts
    assert (rc.total, rc.completed, rc.failed) == (4, 3, 1), rc
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.expires_at == b.created_at + 86400, b
    out = lines(client.files.content(b.output_file_id).text)
    assert sorted(out) == ["req-0", "req-1", "req-2"], sorted(out)
    for v in out.values():
        assert v["response"]["status_code"] == 200 and v["error"] is None, v
        msg = v["response"]["body"]["choices"][0]["message"]["content"]
        assert isinstance(msg, str) and msg, v
    errs = lines(client.files.content(b.error_file_id).text)
    assert list(errs) == ["req-3"] and errs["req-3"]["response"]["status_code"] == 400, errs
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"

    # Cancel a longer one: cancelling at once, then cancelled with what finished.
    data2 = "".join(json.dumps(request(i, 32)) + "\n" for i in range(24)).encode()
    f2 = client.files.create(file=("more.jsonl", data2), purpose="batch")
    b2 = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    c = client.batches.cancel(b2.id)
    assert c.status in ("cancelling", "cancelled"), c
    c = wait(client, b2.id)
    assert c.status == "cancelled" and c.cancelled_at, c
    if c.output_file_id:
        assert len(lines(client.files.content(c.output_file_id).text)) == c.request_counts.completed
    try:
        client.batches.cancel(b.id)
        raise AssertionError("cancelling a completed batch succeeded")
    except openai.BadRequestError:
        pass

    # List: newest first; paging with limit=1 walks both.
    page = client.batches.list(limit=1)
    assert len(page.data) == 1 and page.data[0].id == b2.id and page.has_more, page
    assert [x.id for x in client.batches.list(limit=1)] == [b2.id, b.id]

    # The other tenant: nothing to see.
    for call in (lambda: other.batches.retrieve(b.id), lambda: other.files.retrieve(f.id), lambda: other.files.content(b.output_file_id),
                 lambda: other.files.delete(f.id), lambda: other.batches.cancel(b2.id)):
        try:
            call()
            raise AssertionError("another tenant reached a batch or file")
        except openai.NotFoundError:
            pass
    assert list(other.batches.list()) == [] and list(other.files.list()) == []

    # Delete.
    d = client.files.delete(f.id)
    assert d.deleted and d.id == f.id, d
    try:
        client.files.retrieve(f.id)
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass
    print("batches.py: files + batches round trip through the openai SDK: ok")


if __name__ == "__main__":
    main()
