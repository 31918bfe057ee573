#!/bin/bash
# Idle CPU of `brigade serve` over 60 s: utime+stime from /proc/PID/stat (clock ticks).
set -u
M="${BRIGADE_MODEL:-$(bash "$(dirname "$0")/fetch-model.sh")}"
BIN="${BRIGADE_BIN:-$(dirname "$0")/../target/release/brigade}"
printf '[server]\nport = 0\n' > /tmp/idle.toml
"$BIN" serve --config /tmp/idle.toml --model "$M" 2>/tmp/idle.err &
PID=$!
for i in $(seq 100); do grep -q "listening on" /tmp/idle.err && break; sleep 0.1; done
BASE=$(sed -n 's/^brigade: listening on //p' /tmp/idle.err)
curl -s -o /dev/null "$BASE/v1/completions" -H 'content-type: application/json' -d '{"prompt":"Hello","max_tokens":16}'
sleep 7   # past the idle KV release (5 s)
tick() { awk '{print $14+$15}' /proc/$PID/stat; }
T=$(getconf CLK_TCK)
a=$(tick); sleep 60; b=$(tick)
echo "idle CPU over 60 s: $((b-a)) ticks of 1/$T s = $(python3 -c "print(f'{($b-$a)/$T/60*100:.3f}% of one core')")"
echo "threads: $(ls /proc/$PID/task | wc -l)"
kill -TERM $PID; wait $PID; echo "exit $?"
