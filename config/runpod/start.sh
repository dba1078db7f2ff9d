#!/usr/bin/env bash
# RunPod template entrypoint (bash >= 5.1). One container, one network namespace: the mlnode
# API moves to 127.0.0.1:8081, podproxy owns 8080 and serves inference on 5050 (the mlnode's
# own compatibility server takes 5000 once vLLM is up; vLLM servers use 5001, 5002, ...).
#
# Supervision, so a restart policy sees every failure:
# - a bad config or a busy port: `podproxy check` fails and the script exits with its status
#   before anything starts;
# - either process ends on its own: the other is stopped (podproxy with SIGTERM, so it drains
#   its streams), and the script exits non-zero with the status of the one that ended first
#   (1 if that status was 0);
# - SIGTERM/SIGINT to the script reaches both; it waits for podproxy's drain and exits with
#   podproxy's status (0 after a clean drain).
set -u
export POC_PORT="${POC_PORT:-8080}"
export INFERENCE_PORT="${INFERENCE_PORT:-5050}"
MLNODE_PORT="${MLNODE_PORT:-8081}"
export MLNODE_URL="${MLNODE_URL:-http://127.0.0.1:$MLNODE_PORT}"
export VLLM_URLS="${VLLM_URLS:-http://127.0.0.1:5001-5008}"
# POC_CALLBACK_URL (e.g. http://203.0.113.7:9100) comes from the template's env vars.

log() { echo "start.sh: $*" >&2; }

podproxy check >/dev/null || { st=$?; log "podproxy check failed (status $st)"; exit "$st"; }

proxy="" app="" stopping=""
stop_all() { [ -n "$proxy$app" ] && kill -TERM $proxy $app 2>/dev/null; }
trap 'stopping=1; log "stopping: SIGTERM to podproxy (drain) and the mlnode"; stop_all' TERM INT

podproxy &
proxy=$!
uvicorn api.app:app --host=127.0.0.1 --port="$MLNODE_PORT" &
app=$!

first="" first_status=0 proxy_status=0
running="$proxy $app"
while [ -n "$running" ]; do
  ended=""
  wait -n -p ended $running
  st=$?
  [ -n "${ended:-}" ] || continue   # a trapped signal interrupted the wait
  running=$(echo " $running " | sed "s/ $ended / /; s/^ *//; s/ *$//")
  if [ "$ended" = "$proxy" ]; then who=podproxy; proxy_status=$st; else who=mlnode; fi
  if [ -z "$first" ] && [ -z "$stopping" ]; then
    first=$who first_status=$st
    log "$who exited with status $st; stopping the other"
    stop_all
  fi
done

if [ -n "$stopping" ] && [ -z "$first" ]; then
  exit "$proxy_status"
fi
[ "$first_status" -ne 0 ] && exit "$first_status"
exit 1
