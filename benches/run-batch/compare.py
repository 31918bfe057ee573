#!/usr/bin/env python3
"""`brigade run-batch` against `brigade bench` on the same workload, side by side.

`brigade bench --write-batch` writes the exact requests a bench run makes (same
seed: same token prompts, `max_tokens` with `ignore_eos`, greedy) as an OpenAI
batch file; then rounds alternate `brigade bench` and `brigade run-batch` on it
(a fresh results file each time) and the medians of their throughputs are
compared. Both run the same engine, so the ratio should be ~1 (issue 13 asks
within 5%).

    python3 benches/run-batch/compare.py --num-requests 2000 --input-len 128 --output-len 128 -r 2
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_bench(args, extra) -> dict:
    cmd = [args.brigade, "bench", "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--seed", str(args.seed), "--concurrency", str(args.concurrency),
           "--json", "--no-progress"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return {"output_tok_s": r["output_tokens_per_s"], "total_tok_s": r["total_tokens_per_s"], "wall_s": r["duration_s"],
            "output_tokens": r["total_output_tokens"], "failed": r["failed"]}


SUMMARY = re.compile(r"throughput\s+([\d.]+) output tok/s, ([\d.]+) total tok/s")
WALL = re.compile(r"wall time\s+([\d.]+) s")
TOKENS = re.compile(r"tokens\s+(\d+) input, (\d+) output")
REQS = re.compile(r"requests\s+\d+ \(\d+ already done, (\d+) ok, (\d+) errors\)")


def run_batch(args, extra, batch_file, tmp) -> dict:
    out = os.path.join(tmp, f"results-{time.time_ns()}.jsonl")
    cmd = [args.brigade, "run-batch", "-i", batch_file, "-o", out] + extra
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = p.stdout + p.stderr
    m, w, t, q = SUMMARY.search(text), WALL.search(text), TOKENS.search(text), REQS.search(text)
    if not (m and w and t and q):
        raise SystemExit(f"run-batch printed no summary:\n{text[-2000:]}")
    os.unlink(out)
    return {"output_tok_s": float(m.group(1)), "total_tok_s": float(m.group(2)), "wall_s": float(w.group(1)),
            "output_tokens": int(t.group(2)), "failed": int(q.group(2))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brigade", default="target/release/brigade")
    ap.add_argument("--model", default=None, help="model file or name (default: brigade's default)")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64,
                    help="bench requests in flight (default 64 = runtime.max_seqs, the sequences run-batch's server "
                         "admits at once: the same engine shape; 'all at once' would raise bench's max_seqs to the request count)")
    ap.add_argument("--repeats", "-r", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    extra = ["--model", args.model] if args.model else []
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "requests.jsonl")
        subprocess.run([args.brigade, "bench", "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                        "--output-len", str(args.output_len), "--seed", str(args.seed), "--write-batch", batch_file] + extra,
                       check=True)
        res = {"bench": [], "run-batch": []}
        for rnd in range(args.repeats):
            order = ["bench", "run-batch"] if rnd % 2 == 0 else ["run-batch", "bench"]
            for which in order:
                log(f"round {rnd + 1}: {which}")
                r = run_bench(args, extra) if which == "bench" else run_batch(args, extra, batch_file, tmp)
                log(f"  {r}")
                res[which].append(r)
    print(f"CPU: {cpu}; {args.num_requests} requests, prompt {args.input_len}, output {args.output_len}, "
          f"{args.repeats} alternating rounds, medians")
    print(f"| metric | brigade bench | brigade run-batch | run-batch / bench |")
    print(f"|---|---|---|---|")
    for key in ["output_tok_s", "total_tok_s", "wall_s"]:
        b = statistics.median(r[key] for r in res["bench"])
        rb = statistics.median(r[key] for r in res["run-batch"])
        print(f"| {key} | {b:.1f} | {rb:.1f} | {rb / b:.3f} |")
    fails = sum(r["failed"] for v in res.values() for r in v)
    print(f"failed requests: {fails}; output tokens per run: "
          f"bench {[r['output_tokens'] for r in res['bench']]}, run-batch {[r['output_tokens'] for r in res['run-batch']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
