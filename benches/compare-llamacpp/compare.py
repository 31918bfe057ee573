#!/usr/bin/env python3
"""Side-by-side benchmark: llama.cpp (llama-bench, llama-batched-bench) vs `brigade bench`.

Same GGUF, same thread count, runs alternating between the two engines for
--repeats rounds; prints medians and the ratio brigade / llama.cpp.
Python 3 standard library only. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TIME_BIN = "/usr/bin/time"

# llama-batched-bench / brigade batched shape (issue 6: prompt 128, output 128)
BATCH_PP = 128
BATCH_TG = 128
PP_LEN = 512
TG_LEN = 128
TG_PROMPT = 16  # brigade needs a prompt; llama-bench tg128 starts from an empty context
# Long context (issue 14): a 4096-token prompt, and 64 decode steps after 4096 tokens of context
LONG_PP = 4096
LONG_DEPTH = 4096
LONG_TG = 64


class RunError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def find_llama_bins(d: str) -> tuple[Path, Path]:
    """LLAMA_CPP_DIR may be the folder holding the binaries, the cmake build dir, or the source dir."""
    root = Path(d).expanduser()
    for cand in (root, root / "bin", root / "build" / "bin", root / "bin" / "Release", root / "build" / "bin" / "Release"):
        bench, batched = cand / "llama-bench", cand / "llama-batched-bench"
        if bench.is_file() and batched.is_file() and os.access(bench, os.X_OK) and os.access(batched, os.X_OK):
            return bench, batched
    sys.exit(
        f"error: llama-bench and llama-batched-bench not found under {root} (tried ., bin, build/bin); "
        "build them by hand as described in benches/compare-llamacpp/README.md"
    )


def default_model() -> str:
    env = os.environ.get("BRIGADE_MODEL")
    if env:
        return env
    home = os.environ.get("BRIGADE_HOME", str(Path.home() / ".cache" / "brigade" / "models"))
    return str(Path(home) / DEFAULT_MODEL_NAME)


def ensure_brigade(path: str, build: bool) -> Path:
    p = Path(path)
    if not p.is_absolute():
        p = REPO / p
    if not p.is_file():
        if not build:
            sys.exit(f"error: brigade binary {p} not found (build it with `cargo build --release`)")
        log(f"[compare] {p} missing: running `cargo build --release` in {REPO}")
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
        if not p.is_file():
            sys.exit(f"error: {p} still missing after cargo build --release")
    return p


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- noise

HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
LAST_FOREIGN = {"share": None, "cpu_s": None}  # other processes' CPU use during the last run_cmd


def cpu_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat (busy excludes idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])
    return total - v[3] - v[4], total


def children_cpu_s() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def busy_share(interval: float = 1.0) -> float:
    b0, t0 = cpu_busy_jiffies()
    time.sleep(interval)
    b1, t1 = cpu_busy_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_idle(max_wait: float, threshold: float) -> tuple[float, float]:
    """Waits (up to max_wait s) until the machine's busy share of all cores is below threshold.
    Returns (seconds waited, last busy share)."""
    start = time.monotonic()
    share = busy_share()
    while share > threshold and time.monotonic() - start < max_wait:
        share = busy_share(2.0)
    return time.monotonic() - start, share


# --------------------------------------------------------------------------- running


def run_cmd(cmd: list[str], timeout: float, measure_rss: bool = False) -> tuple[str, str, float, int | None]:
    """Runs cmd; returns (stdout, stderr, wall seconds, peak RSS in KiB or None)."""
    tfile = None
    full = cmd
    if measure_rss:
        fd, tfile = tempfile.mkstemp(prefix="compare-time-", suffix=".txt")
        os.close(fd)
        full = [TIME_BIN, "-v", "-o", tfile] + cmd
    busy0, c0 = cpu_busy_jiffies()[0], children_cpu_s()
    t0 = time.monotonic()
    try:
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise RunError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from e
    wall = time.monotonic() - t0
    foreign = max(0.0, (cpu_busy_jiffies()[0] - busy0) / HZ - (children_cpu_s() - c0))
    LAST_FOREIGN["cpu_s"] = foreign
    LAST_FOREIGN["share"] = foreign / max(1e-9, wall * NCPU)
    rss = None
    if tfile:
        try:
            txt = Path(tfile).read_text(errors="replace")
        finally:
            os.unlink(tfile)
        m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", txt)
        rss = int(m.group(1)) if m else None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout)[-2000:]
        raise RunError(f"exit {p.returncode}: {shlex.join(cmd)}\n{tail}")
    return p.stdout, p.stderr, wall, rss


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX tile support (Linux; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_tile" in line.split() for line in f)
    except OSError:
        return False


def llama_bench(bench: Path, model: str, threads: int, p: int, n: int, extra: list[str], timeout: float, depth: int = 0) -> dict:
    cmd = [str(bench), "-m", model, "-t", str(threads), "-p", str(p), "-n", str(n), "-r", "1", "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]  # tokens of context before the measured run (llama-bench -d)
    cmd += extra
    out, _err, wall, _ = run_cmd(cmd, timeout)
    start = out.find("[")
    if start < 0:
        raise RunError(f"no JSON in llama-bench output: {out[-500:]}")
    rows = json.loads(out[start:])
    if not rows:
        raise RunError("llama-bench printed an empty result list")
    r = rows[0]
    return {"tok_s": float(r["avg_ts"]), "wall_s": wall, "raw": r, "cmd": shlex.join(cmd)}


def llama_batched(batched: Path, model: str, threads: int, npl: int, extra: list[str], timeout: float) -> dict:
    ctx = npl * (BATCH_PP + BATCH_TG)
    cmd = [
        str(batched), "-m", model, "-t", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(BATCH_PP), "-ntg", str(BATCH_TG), "-npl", str(npl), "--output-format", "jsonl",
    ] + extra
    out, err, wall, rss = run_cmd(cmd, timeout, measure_rss=True)
    row = None
    for line in (out + "\n" + err).splitlines():
        line = line.strip()
        if line.startswith("{") and "speed_tg" in line:
            row = json.loads(line)
    if row is None:
        # fall back to the markdown table
        for line in (out + "\n" + err).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and cells[0].isdigit():
                pp, tg, pl, n_kv = (int(x) for x in cells[:4])
                t_pp, s_pp, t_tg, s_tg, t, s = (float(x) for x in cells[4:])
                row = {"pp": pp, "tg": tg, "pl": pl, "n_kv": n_kv, "t_pp": t_pp, "speed_pp": s_pp,
                       "t_tg": t_tg, "speed_tg": s_tg, "t": t, "speed": s}
    if row is None:
        raise RunError(f"could not parse llama-batched-bench output:\n{(out + err)[-1500:]}")
    if int(row["pl"]) != npl:
        raise RunError(f"llama-batched-bench ran pl={row['pl']}, expected {npl}")
    return {
        "s_tg": float(row["speed_tg"]),
        "s_pp": float(row["speed_pp"]),
        "s_total": float(row["speed"]),
        "out_tok_s": npl * BATCH_TG / float(row["t"]),
        "rss_kib": rss,
        "wall_s": wall,
        "raw": row,
        "cmd": shlex.join(cmd),
    }


def brigade_bench(brigade: Path, model: str, n: int, input_len: int, output_len: int, extra: list[str],
                  timeout: float, measure_rss: bool = False) -> dict:
    cmd = [
        str(brigade), "bench", "--model", model, "--num-requests", str(n), "--concurrency", str(n),
        "--input-len", str(input_len), "--output-len", str(output_len), "--json", "--no-progress",
    ] + extra
    out, _err, wall, rss = run_cmd(cmd, timeout, measure_rss=measure_rss)
    start = out.find("{")
    if start < 0:
        raise RunError(f"no JSON in brigade bench output: {out[-500:]}")
    r = json.loads(out[start:])
    if r.get("failed", 0):
        raise RunError(f"brigade bench: {r['failed']} failed requests")
    if r.get("total_output_tokens") != n * output_len:
        log(f"[compare] warning: brigade produced {r.get('total_output_tokens')} output tokens, expected {n * output_len}")
    r["_rss_kib"] = rss
    r["_wall_s"] = wall
    r["_cmd"] = shlex.join(cmd)
    return r


# --------------------------------------------------------------------------- metrics

# Each metric: key -> (label, unit, higher_is_better)
def metric_defs(parallel: list[int]) -> list[tuple[str, str, str, bool]]:
    m = [
        ("pp512", f"prompt processing pp{PP_LEN}", "tok/s", True),
        ("tg128", f"single-stream decode tg{TG_LEN}", "tok/s", True),
        (f"pp{LONG_PP}", f"prompt processing pp{LONG_PP}", "tok/s", True),
        (f"tg{LONG_TG}_d{LONG_DEPTH}", f"decode tg{LONG_TG} at {LONG_DEPTH} context", "tok/s", True),
        (f"tpot_d{LONG_DEPTH}", f"decode ms/token at {LONG_DEPTH} context", "ms", False),
    ]
    for n in parallel:
        m += [
            (f"b{n}_steady", f"{n} seqs: decode tok/s, all streams decoding", "tok/s", True),
            (f"b{n}_decode", f"{n} seqs: decode tok/s from TPOT p50", "tok/s", True),
            (f"b{n}_out", f"{n} seqs: output tok/s, whole run", "tok/s", True),
            (f"b{n}_total", f"{n} seqs: (prompt+output) tok/s", "tok/s", True),
            (f"b{n}_rss", f"{n} seqs: peak RSS", "MiB", False),
        ]
    return m


DEFINITIONS = {
    "pp512": "llama.cpp: llama-bench -p 512 -n 0 avg_ts. brigade: 512 / TTFT p50 (1 request, --input-len 512 --output-len 1).",
    "tg128": "llama.cpp: llama-bench -p 0 -n 128 avg_ts. brigade: 1000 / TPOT p50 ms (1 request, --input-len 16 --output-len 128).",
    f"pp{LONG_PP}": f"llama.cpp: llama-bench -p {LONG_PP} -n 0 avg_ts. brigade: {LONG_PP} / TTFT p50 (1 request, --input-len {LONG_PP} --output-len 1).",
    f"tg{LONG_TG}_d{LONG_DEPTH}": f"llama.cpp: llama-bench -p 0 -n {LONG_TG} -d {LONG_DEPTH} avg_ts (decode after {LONG_DEPTH} tokens of context). "
                                  f"brigade: 1000 / TPOT p50 ms (1 request, --input-len {LONG_DEPTH} --output-len {LONG_TG + 1}: "
                                  f"TPOT excludes the prefill, so it times the {LONG_TG} decode steps at {LONG_DEPTH}..{LONG_DEPTH + LONG_TG} context).",
    f"tpot_d{LONG_DEPTH}": f"1000 / the tg{LONG_TG}_d{LONG_DEPTH} row: milliseconds per decoded token at {LONG_DEPTH} context.",
    "decode": "llama.cpp: S_TG = N*128 / T_TG (decode steps only). brigade: N / (TPOT p50 s), TPOT = per-request (last-first token time)/(out-1) - "
              "comparable decode rate when all N streams decode together (includes interference from other streams' prefill chunks).",
    "steady": "llama.cpp: S_TG = N*128 / T_TG (decode steps only, all N streams in lock-step). brigade: steady_decode_tokens_per_s = tokens "
              "received while all N requests were decoding (between the last request's first token and the first request's last token) / that window.",
    "out": "llama.cpp: N*128 / (T_PP + T_TG). brigade: output_tokens_per_s = N*128 / wall duration of the bench run (includes tokenize/prefill).",
    "total": "llama.cpp: S t/s = (N*128 + N*128) / (T_PP + T_TG). brigade: total_tokens_per_s.",
    "rss": "Maximum resident set size from /usr/bin/time -v of the whole process (includes the mmapped model pages touched). Lower is better.",
}


def run_round(rnd: int, args, bins, brigade: Path, cases: set[str], parallel: list[int], results: dict, raw: list) -> None:
    bench, batched = bins
    t = args.threads
    bargs = args._brigade_extra
    llama_first = rnd % 2 == 0  # flip the order every round

    def pair(name, fl, fb):
        order = [("llama.cpp", fl), ("brigade", fb)]
        if not llama_first:
            order.reverse()
        for eng, f in order:
            accepted = None
            for attempt in range(1 + max(0, args.retry_noisy)):
                waited, idle_share = wait_idle(args.wait_idle, args.idle_threshold) if args.wait_idle > 0 else (0.0, None)
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                try:
                    vals, rec = f()
                except RunError as e:
                    log(f"[compare] round {rnd + 1} {name} {eng}: FAILED: {e}")
                    raw.append({"round": rnd + 1, "case": name, "engine": eng, "error": str(e)})
                    break
                fs = LAST_FOREIGN["share"]
                noisy = fs is not None and fs > args.noise_threshold
                entry = {"round": rnd + 1, "case": name, "engine": eng, "attempt": attempt + 1,
                         "loadavg_1m_before": load, "waited_for_idle_s": round(waited, 1), "busy_share_before": idle_share,
                         "foreign_cpu_share": fs, "foreign_cpu_s": LAST_FOREIGN["cpu_s"], "noisy": noisy,
                         "values": vals, **rec}
                raw.append(entry)
                shown = ", ".join(f"{k}={v:.1f}" for k, v in vals.items() if v is not None)
                log(f"[compare] round {rnd + 1}/{args.repeats} {name:<10} {eng:<9} {shown}  ({time.monotonic() - t0:.1f}s, "
                    f"other processes used {100 * (fs or 0):.0f}% of the cores{' - NOISY' if noisy else ''})")
                accepted = entry
                if not noisy:
                    break
            if accepted is None:
                continue
            accepted["used"] = True
            for k, v in accepted["values"].items():
                if v is not None:
                    results.setdefault(k, {}).setdefault(eng, []).append(v)
                    if accepted["noisy"]:
                        results.setdefault("_noisy", {}).setdefault(k, {}).setdefault(eng, 0)
                        results["_noisy"][k][eng] += 1

    if "pp" in cases:
        def l_pp():
            r = llama_bench(bench, args.model, t, PP_LEN, 0, args._llama_bench_extra, args.timeout)
            return {"pp512": r["tok_s"]}, {"cmd": r["cmd"], "build_commit": r["raw"].get("build_commit"), "cpu_info": r["raw"].get("cpu_info")}

        def b_pp():
            r = brigade_bench(brigade, args.model, 1, PP_LEN, 1, bargs, args.timeout)
            ttft = r["ttft_ms"]["p50"]
            return {"pp512": PP_LEN / (ttft / 1000.0) if ttft > 0 else None}, {"cmd": r["_cmd"], "report": r}
        pair("pp512", l_pp, b_pp)

    if "tg" in cases:
        def l_tg():
            r = llama_bench(bench, args.model, t, 0, TG_LEN, args._llama_bench_extra, args.timeout)
            return {"tg128": r["tok_s"]}, {"cmd": r["cmd"], "build_commit": r["raw"].get("build_commit"), "cpu_info": r["raw"].get("cpu_info")}

        def b_tg():
            r = brigade_bench(brigade, args.model, 1, TG_PROMPT, TG_LEN, bargs, args.timeout)
            tpot = r["tpot_ms"]["p50"]
            return {"tg128": 1000.0 / tpot if tpot > 0 else None}, {"cmd": r["_cmd"], "report": r}
        pair("tg128", l_tg, b_tg)

    if "long" in cases:
        def l_lpp():
            r = llama_bench(bench, args.model, t, LONG_PP, 0, args._llama_bench_extra, args.timeout)
            return {f"pp{LONG_PP}": r["tok_s"]}, {"cmd": r["cmd"], "build_commit": r["raw"].get("build_commit"), "cpu_info": r["raw"].get("cpu_info")}

        def b_lpp():
            r = brigade_bench(brigade, args.model, 1, LONG_PP, 1, bargs, args.timeout)
            ttft = r["ttft_ms"]["p50"]
            return {f"pp{LONG_PP}": LONG_PP / (ttft / 1000.0) if ttft > 0 else None}, {"cmd": r["_cmd"], "report": r}
        pair(f"pp{LONG_PP}", l_lpp, b_lpp)

        def l_ltg():
            r = llama_bench(bench, args.model, t, 0, LONG_TG, args._llama_bench_extra, args.timeout, depth=LONG_DEPTH)
            ts = r["tok_s"]
            return ({f"tg{LONG_TG}_d{LONG_DEPTH}": ts, f"tpot_d{LONG_DEPTH}": 1000.0 / ts if ts > 0 else None},
                    {"cmd": r["cmd"], "build_commit": r["raw"].get("build_commit"), "cpu_info": r["raw"].get("cpu_info")})

        def b_ltg():
            # One more token than timed: TPOT spans the first to the last token, i.e. LONG_TG decode steps.
            r = brigade_bench(brigade, args.model, 1, LONG_DEPTH, LONG_TG + 1, bargs, args.timeout)
            tpot = r["tpot_ms"]["p50"]
            return ({f"tg{LONG_TG}_d{LONG_DEPTH}": 1000.0 / tpot if tpot > 0 else None, f"tpot_d{LONG_DEPTH}": tpot if tpot > 0 else None},
                    {"cmd": r["_cmd"], "report": r})
        pair(f"tg{LONG_TG}_d{LONG_DEPTH}", l_ltg, b_ltg)

    if "batched" in cases:
        for n in parallel:
            def l_b(n=n):
                r = llama_batched(batched, args.model, t, n, args._llama_batched_extra, args.timeout)
                return ({f"b{n}_steady": r["s_tg"], f"b{n}_decode": r["s_tg"], f"b{n}_out": r["out_tok_s"], f"b{n}_total": r["s_total"],
                         f"b{n}_rss": r["rss_kib"] / 1024.0 if r["rss_kib"] else None},
                        {"cmd": r["cmd"], "report": r["raw"]})

            def b_b(n=n):
                r = brigade_bench(brigade, args.model, n, BATCH_PP, BATCH_TG, bargs, args.timeout, measure_rss=True)
                tpot = r["tpot_ms"]["p50"]
                steady = r.get("steady_decode_tokens_per_s") or None
                return ({f"b{n}_steady": steady, f"b{n}_decode": n / (tpot / 1000.0) if tpot > 0 else None,
                         f"b{n}_out": r["output_tokens_per_s"], f"b{n}_total": r["total_tokens_per_s"],
                         f"b{n}_rss": r["_rss_kib"] / 1024.0 if r["_rss_kib"] else None},
                        {"cmd": r["_cmd"], "report": r})
            pair(f"batched{n}", l_b, b_b)


def summarize(results: dict, parallel: list[int]) -> list[dict]:
    rows = []
    for key, label, unit, higher in metric_defs(parallel):
        per = results.get(key, {})
        lv, bv = per.get("llama.cpp", []), per.get("brigade", [])
        lm = statistics.median(lv) if lv else None
        bm = statistics.median(bv) if bv else None
        ratio = bm / lm if (lm and bm is not None) else None
        kind = key.split("_")[-1] if key.startswith("b") else key
        rows.append({
            "metric": key, "label": label, "unit": unit, "higher_is_better": higher,
            "llama_cpp_median": lm, "brigade_median": bm, "ratio_brigade_over_llama_cpp": ratio,
            "llama_cpp_runs": lv, "brigade_runs": bv,
            "noisy_runs": results.get("_noisy", {}).get(key, {}),
            "definition": DEFINITIONS.get(kind, ""),
        })
    return rows


def spread(v: list[float]) -> str:
    if len(v) < 2:
        return "-"
    m = statistics.median(v)
    return f"±{100.0 * (max(v) - min(v)) / 2 / m:.0f}%" if m else "-"


def print_table(rows: list[dict], meta: dict) -> None:
    fmt = lambda x: "-" if x is None else f"{x:,.1f}"
    head = ("metric", "unit", "llama.cpp median", "brigade median", "ratio b/l", "spread l", "spread b", "noisy l/b")
    body = []
    for r in rows:
        if not r["llama_cpp_runs"] and not r["brigade_runs"]:
            continue
        ratio = "-" if r["ratio_brigade_over_llama_cpp"] is None else f"{r['ratio_brigade_over_llama_cpp']:.2f}x"
        body.append((r["label"], r["unit"], fmt(r["llama_cpp_median"]), fmt(r["brigade_median"]), ratio,
                     spread(r["llama_cpp_runs"]), spread(r["brigade_runs"]),
                     f"{r['noisy_runs'].get('llama.cpp', 0)}/{r['noisy_runs'].get('brigade', 0)}"))
    w = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i]) for i, c in enumerate(cells)) + " |"
    print()
    print(f"model {meta['model']}  threads {meta['threads']}  repeats {meta['repeats']}  "
          f"llama.cpp {meta['llama_cpp_build_commit']}  brigade {meta['brigade_rev']} {meta['brigade_args']}")
    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for b in body:
        print(line(b))
    print()
    print("ratio = brigade / llama.cpp (higher is better for tok/s, lower is better for RSS); spread = half the min-max range / median;")
    print("noisy l/b = runs kept although other processes used more than --noise-threshold of the cores during them (after --retry-noisy).")
    print("Definitions:")
    for k in ("pp512", "tg128", "steady", "decode", "out", "total", "rss"):
        print(f"  {k:<7} {DEFINITIONS[k]}")
    print(f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="folder with llama-bench and llama-batched-bench, or the cmake build dir (default: $LLAMA_CPP_DIR)")
    ap.add_argument("--model", "-m", default=default_model(),
                    help="GGUF model (default: $BRIGADE_MODEL or the cached default model; scripts/fetch-model.sh prints it)")
    ap.add_argument("--threads", "-t", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--brigade", default="target/release/brigade", help="brigade binary (default target/release/brigade; built if missing)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release when the brigade binary is missing")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the brigade binary in place instead of a private copy taken at start")
    ap.add_argument("--repeats", "-r", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--parallel", default="32,64", help="parallel sequence counts for the batched case (default 32,64)")
    ap.add_argument("--cases", default="pp,tg,long,batched",
                    help="subset of pp,tg,long,batched (default all; long = prompt 4096 and decode at 4096 context)")
    ap.add_argument("--brigade-args", default="",
                    help="extra flags for `brigade bench`, e.g. \"--workers 2 --pipeline-depth 2\". Unless they set --workers, "
                         "--threads-per-worker or --config, the script adds --workers 1 --threads-per-worker THREADS.")
    ap.add_argument("--llama-bench-args", default="", help="extra flags for llama-bench (e.g. \"-fa 1\")")
    ap.add_argument("--llama-batched-args", default="", help="extra flags for llama-batched-bench (e.g. \"-fa on\")")
    ap.add_argument("--llama-repack", action="store_true",
                    help="keep llama.cpp's weight repacking on CPUs with AMX (off by default there: its AMX kernel dies with SIGILL)")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="before each run wait up to this many seconds for the machine to go idle (0: do not wait; default 120)")
    ap.add_argument("--idle-threshold", type=float, default=0.2,
                    help="'idle' = busy share of all cores below this (default 0.2)")
    ap.add_argument("--noise-threshold", type=float, default=0.1,
                    help="a run is NOISY when other processes used more than this share of all cores during it (default 0.1)")
    ap.add_argument("--retry-noisy", type=int, default=1,
                    help="rerun a NOISY run up to this many times, keeping the last attempt (default 1)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per single run (default 1800)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (summary, every run, metadata) on stdout instead of the table")
    ap.add_argument("--save-json", help="also write the JSON object to this file")
    args = ap.parse_args()

    if not args.llama_cpp_dir:
        sys.exit("error: set LLAMA_CPP_DIR (or --llama-cpp-dir) to the folder holding llama-bench and llama-batched-bench")
    bins = find_llama_bins(args.llama_cpp_dir)
    if not Path(args.model).is_file():
        sys.exit(f"error: model {args.model} not found; run `bash scripts/fetch-model.sh` (it prints the path) or pass --model")
    args.model = str(Path(args.model).resolve())
    if not Path(TIME_BIN).is_file():
        sys.exit(f"error: {TIME_BIN} not found (GNU time, for peak RSS); install it: apt-get install -y time")
    brigade = ensure_brigade(args.brigade, not args.no_build)
    brigade_src = brigade
    snapdir = None
    if not args.no_snapshot:
        # other people may rebuild target/release/brigade while this runs: use a private copy
        snapdir = tempfile.mkdtemp(prefix="compare-brigade-")
        brigade = Path(shutil.copy2(brigade_src, Path(snapdir) / "brigade"))
    parallel = [int(x) for x in args.parallel.split(",") if x.strip()]
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not cases <= {"pp", "tg", "long", "batched"}:
        sys.exit("error: --cases takes a subset of pp,tg,long,batched")

    bextra = shlex.split(args.brigade_args)
    if not any(a.split("=")[0] in ("--workers", "--threads-per-worker", "--config") for a in bextra):
        bextra = ["--workers", "1", "--threads-per-worker", str(args.threads)] + bextra
    # llama-bench and llama-batched-bench do not speculate: neither does brigade
    # here (n-gram speculation has its own benchmark, `brigade bench --spec-compare`).
    if not any(a.split("=")[0] in ("--spec-ngram", "--no-spec", "--config") for a in bextra):
        bextra = bextra + ["--no-spec"]
    args._brigade_extra = bextra
    args._llama_bench_extra = shlex.split(args.llama_bench_args)
    args._llama_batched_extra = shlex.split(args.llama_batched_args)
    # llama.cpp built with -DGGML_NATIVE=ON dies with SIGILL in its AMX repack
    # kernel on CPUs with AMX: run its tools without weight repacking there.
    amx = cpu_has_amx()
    if amx and not args.llama_repack:
        if not any(a.startswith("--repack") for a in args._llama_bench_extra):
            args._llama_bench_extra += ["--repack", "0"]
        if not any(a in ("--no-repack", "-nr", "--repack") for a in args._llama_batched_extra):
            args._llama_batched_extra += ["--no-repack"]
        print("note: this CPU has AMX: llama.cpp runs with weight repacking off (--repack 0 / --no-repack); "
              "--llama-repack keeps it on", file=sys.stderr)

    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "model": args.model, "threads": args.threads, "repeats": args.repeats, "parallel": parallel,
        "llama_bench": str(bins[0]), "llama_batched_bench": str(bins[1]), "llama_cpp_build_commit": "unknown",
        "brigade": str(brigade_src),
        "brigade_binary_mtime": _dt.datetime.fromtimestamp(brigade_src.stat().st_mtime).isoformat(timespec="seconds"),
        "brigade_rev": git_rev(), "brigade_args": shlex.join(bextra),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    log(f"[compare] llama.cpp: {bins[0].parent}  brigade: {brigade} {meta['brigade_args']}  model: {args.model}  threads: {args.threads}")

    results: dict = {}
    raw: list = []
    try:
        for rnd in range(args.repeats):
            run_round(rnd, args, bins, brigade, cases, parallel, results, raw)
    except KeyboardInterrupt:
        log("[compare] interrupted: summarizing the runs so far")
        raw.append({"error": "interrupted"})
    finally:
        if snapdir:
            shutil.rmtree(snapdir, ignore_errors=True)
    for r in raw:
        if r.get("build_commit"):
            meta["llama_cpp_build_commit"] = r["build_commit"]
            meta["llama_cpp_cpu_info"] = r.get("cpu_info")
            break
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = summarize(results, parallel)
    doc = {"meta": meta, "summary": rows, "runs": raw}
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(rows, meta)
    return 1 if any("error" in r for r in raw) else 0


if __name__ == "__main__":
    sys.exit(main())
