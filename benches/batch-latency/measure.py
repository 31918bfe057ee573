#!/usr/bin/env python3
"""Interactive latency while a served batch runs (issue 13).

Starts `brigade serve --data-dir TMP`, then:
  A. interactive load alone: streaming `/v1/completions` requests from a few
     concurrent clients; TTFT (time to the first token event) of each;
  B. uploads a batch of `--batch-requests` requests (`brigade bench
     --write-batch`: token prompts, `max_tokens` with `ignore_eos`) through
     `/v1/files` and `/v1/batches`, waits until it is in progress, and runs the
     same interactive load again while it runs, recording the batch's
     `request_counts.completed` before and after;
and prints TTFT p50/p90/p99 of both phases, their ratio (issue 13 asks p99
with the batch <= 2x without) and the batch's progress during phase B.
Standard library only.

    python3 benches/batch-latency/measure.py --batch-requests 2000
"""
import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(v, q):
    v = sorted(v)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    def __init__(self, args, data_dir, log_path):
        cmd = [args.brigade, "serve", "--port", "0", "--data-dir", data_dir, "--log-format", "json"]
        if args.model:
            cmd += ["--model", args.model]
        cmd += args.serve_args.split()
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stderr=self.log, stdout=subprocess.DEVNULL)
        self.base = None
        for _ in range(1200):
            text = open(log_path).read()
            m = re.search(r"brigade: listening on http://([\d.:]+)", text)
            if m:
                self.base = m.group(1)
                break
            if self.p.poll() is not None:
                raise SystemExit(f"server exited:\n{text[-3000:]}")
            time.sleep(0.1)
        if not self.base:
            raise SystemExit("server did not start")
        self.host, self.port = self.base.rsplit(":", 1)

    def req(self, method, path, body=None, headers=None, raw=False):
        c = http.client.HTTPConnection(self.host, int(self.port), timeout=600)
        h = {"Content-Type": "application/json"} if body is not None and not isinstance(body, bytes) else {}
        h.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = r.read()
        c.close()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {out[:500]!r}")
        return out if raw else json.loads(out)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def ttft_once(srv, prompt, max_tokens):
    c = http.client.HTTPConnection(srv.host, int(srv.port), timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"interactive request: {r.status} {r.read()[:300]!r}")
    first = None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        ev = json.loads(payload)
        if first is None and ev.get("choices") and ev["choices"][0].get("text"):
            first = time.perf_counter() - t0
    c.close()
    return first


def interactive(srv, args, rng_seed):
    rng = random.Random(rng_seed)
    results, lock = [], threading.Lock()
    todo = list(range(args.interactive))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            prompt = [rng.randrange(1000, 20000) for _ in range(args.interactive_input)]
            t = ttft_once(srv, prompt, args.interactive_output)
            with lock:
                results.append(t)
            time.sleep(rng.uniform(0, args.think_s))

    th = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    return [r for r in results if r is not None]


def multipart(fields, file_name, file_bytes):
    b = "----brigade" + os.urandom(8).hex()
    parts = []
    for k, v in fields.items():
        parts.append(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
    parts.append(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n"
                 f"Content-Type: application/jsonl\r\n\r\n".encode() + file_bytes + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={b}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brigade", default="target/release/brigade")
    ap.add_argument("--model", default=None)
    ap.add_argument("--serve-args", default="", help="extra flags for brigade serve")
    ap.add_argument("--batch-requests", type=int, default=2000)
    ap.add_argument("--batch-input", type=int, default=128)
    ap.add_argument("--batch-output", type=int, default=128)
    ap.add_argument("--interactive", type=int, default=60, help="interactive requests per phase")
    ap.add_argument("--clients", type=int, default=2, help="concurrent interactive clients")
    ap.add_argument("--interactive-input", type=int, default=128)
    ap.add_argument("--interactive-output", type=int, default=8)
    ap.add_argument("--think-s", type=float, default=0.5, help="max pause between a client's requests")
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "requests.jsonl")
        extra = ["--model", args.model] if args.model else []
        subprocess.run([args.brigade, "bench", "--num-requests", str(args.batch_requests), "--input-len",
                        str(args.batch_input), "--output-len", str(args.batch_output), "--write-batch", batch_file] + extra,
                       check=True)
        srv = Server(args, os.path.join(tmp, "data"), os.path.join(tmp, "server.log"))
        try:
            ttft_once(srv, [1000] * 16, 2)  # warm-up
            log("phase A: interactive alone")
            alone = interactive(srv, args, 1)
            log("phase B: upload and start the batch")
            body, h = multipart({"purpose": "batch"}, "requests.jsonl", open(batch_file, "rb").read())
            f = srv.req("POST", "/v1/files", body, h)
            b = srv.req("POST", "/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/completions",
                                                "completion_window": "24h"})
            t_start = time.time()
            while True:
                s = srv.req("GET", f"/v1/batches/{b['id']}")
                if s["status"] == "in_progress" and s["request_counts"]["completed"] > 0:
                    break
                if s["status"] in ("failed", "cancelled", "expired", "completed"):
                    raise SystemExit(f"batch ended before phase B: {s}")
                if time.time() - t_start > 600:
                    raise SystemExit(f"batch did not progress: {s}")
                time.sleep(0.5)
            before = s["request_counts"]["completed"]
            t0 = time.time()
            log(f"  batch in progress ({before} done); interactive load")
            loaded = interactive(srv, args, 2)
            s = srv.req("GET", f"/v1/batches/{b['id']}")
            after, dt = s["request_counts"]["completed"], time.time() - t0
            srv.req("POST", f"/v1/batches/{b['id']}/cancel", {})
        finally:
            srv.stop()
    print(f"CPU: {cpu}; interactive: {args.interactive} streaming requests per phase from {args.clients} clients, "
          f"prompt {args.interactive_input} tokens, {args.interactive_output} out; batch {args.batch_requests} x "
          f"({args.batch_input} in, {args.batch_output} out)")
    print("| TTFT (ms) | p50 | p90 | p99 |")
    print("|---|---|---|---|")
    for name, v in [("interactive alone", alone), ("with the batch running", loaded)]:
        print(f"| {name} | {pct(v, .5) * 1e3:.0f} | {pct(v, .9) * 1e3:.0f} | {pct(v, .99) * 1e3:.0f} |")
    print(f"p99 ratio (with / without): {pct(loaded, .99) / pct(alone, .99):.2f} (target <= 2)")
    print(f"batch progress during phase B: {after - before} requests in {dt:.1f} s "
          f"({(after - before) * args.batch_output / max(dt, 1e-9):.0f} output tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
