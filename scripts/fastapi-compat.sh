#!/usr/bin/env bash
# The DAPI's header-less JSON POSTs against a real FastAPI app (the framework of the mlnode
# and of vLLM's API server), through podproxy's embedded default. FastAPI >= 0.132 answers
# a pydantic body without Content-Type 422; podproxy's json_content_type routes add the
# header. Needs python3 with fastapi and uvicorn (pip install fastapi uvicorn). Bounded.
set -euo pipefail
bin=${1:-target/debug/podproxy}
python3 -c 'import fastapi, uvicorn' || { echo "fastapi-compat: needs: pip install fastapi uvicorn"; exit 1; }
work=$(mktemp -d)
app_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
poc_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
inf_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/app.py" <<'PY'
# The shape of the mlnode's POST /api/v1/inference/up and vLLM's chat endpoint.
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()

class Up(BaseModel):
    model: str
    dtype: str = "auto"
    additional_args: list[str] = []

class Chat(BaseModel):
    model: str
    messages: list[dict]

@app.post("/api/v1/inference/up")
def up(req: Up):
    return {"status": "OK", "model": req.model}

@app.post("/v1/chat/completions")
def chat(req: Chat):
    return {"object": "chat.completion", "model": req.model}

@app.get("/health")
def health():
    return {}
PY
(cd "$work" && exec python3 -m uvicorn app:app --host 127.0.0.1 --port "$app_port" --log-level warning) &
app=$!
proxy=
trap 'kill $app $proxy 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
fail() { echo "fastapi-compat FAILED: $*"; echo "--- podproxy log"; cat "$work/podproxy.log" 2>/dev/null; exit 1; }
# The app first: podproxy's first health check decides, so a backend that is not up yet
# would be down until the next round.
for _ in $(seq 1 150); do
  curl -sf -o /dev/null "http://127.0.0.1:$app_port/health" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$app_port/health" || fail "uvicorn did not start"
POC_PORT=$poc_port INFERENCE_PORT=$inf_port PODPROXY_ADMIN_BIND=127.0.0.1:0 \
  MLNODE_URL=http://127.0.0.1:$app_port VLLM_URLS=http://127.0.0.1:$app_port \
  "$bin" >"$work/podproxy.log" 2>&1 &
proxy=$!
# Ready when a request through podproxy reaches the app (both upstreams checked healthy).
for _ in $(seq 1 150); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$poc_port/health")" = 200 ] \
    && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$inf_port/health")" = 200 ] && break
  sleep 0.1
done
version=$(python3 -c 'import fastapi; print(fastapi.__version__)')
up='{"model":"Qwen/Qwen3-32B-FP8","dtype":"auto","additional_args":[]}'
# -H 'Content-Type:' makes curl send no Content-Type at all, as the DAPI does.
direct=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Content-Type:' -d "$up" "http://127.0.0.1:$app_port/api/v1/inference/up")
[ "$direct" = 422 ] || fail "FastAPI $version answered a header-less JSON body $direct directly (expected 422: is it older than 0.132?)"
via=$(curl -s -w ' %{http_code}' --max-time 10 -H 'Content-Type:' -d "$up" "http://127.0.0.1:$poc_port/v3.0.8/api/v1/inference/up")
[ "$via" = '{"status":"OK","model":"Qwen/Qwen3-32B-FP8"} 200' ] || fail "through podproxy: $via"
chat='{"model":"m","messages":[{"role":"user","content":"hi"}]}'
via=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Content-Type:' -d "$chat" "http://127.0.0.1:$inf_port/v1/chat/completions")
[ "$via" = 200 ] || fail "chat through the inference port: $via"
# A Content-Type the client sent is left alone: FastAPI still says 422 to a form type.
via=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -d "$up" "http://127.0.0.1:$poc_port/api/v1/inference/up")
[ "$via" = 422 ] || fail "a form Content-Type was changed: $via"
echo "fastapi-compat: FastAPI $version says 422 to header-less JSON directly, 200 through podproxy (PoC and inference ports); a client's own Content-Type kept"
