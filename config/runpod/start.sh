#!/usr/bin/env bash
# One container, one network namespace: the mlnode API moves to 127.0.0.1:8081, podproxy
# owns 8080 and serves inference on 5050 (the mlnode's own compatibility server takes 5000
# once vLLM is up; vLLM servers use 5001, 5002, ...).
set -eu
export POC_PORT="${POC_PORT:-8080}"
export INFERENCE_PORT="${INFERENCE_PORT:-5050}"
export MLNODE_URL="${MLNODE_URL:-http://127.0.0.1:8081}"
export VLLM_URLS="${VLLM_URLS:-http://127.0.0.1:5001-5008}"
# POC_CALLBACK_URL (e.g. http://203.0.113.7:9100) comes from the template's env vars.

podproxy check >/dev/null
podproxy &
proxy=$!
uvicorn api.app:app --host=127.0.0.1 --port=8081 &
app=$!
# Stop both when either ends, and pass SIGTERM on so podproxy drains its streams.
trap 'kill -TERM $proxy $app 2>/dev/null' TERM INT
wait -n $proxy $app 2>/dev/null || true
kill -TERM $proxy $app 2>/dev/null || true
wait
