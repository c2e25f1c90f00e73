#!/usr/bin/env bash
# End-to-end `muse chat` in a real terminal: trains a tiny model for a few steps, then drives the chat
# through tmux — two turns, Ctrl-C at the prompt, /reset, a long reply stopped by Ctrl-C, /exit — and
# checks what the terminal shows. Exits 77 (ctest: skipped) when tmux is not installed.
# Usage: chat_tmux.sh path/to/muse
set -euo pipefail
muse="$(realpath "$1")"
if ! command -v tmux >/dev/null; then
  echo "tmux is not installed (scripts/setup-debian.sh installs it): skipping"
  exit 77
fi

work="$(mktemp -d)"
session="muse-chat-test-$$"
export TMUX_TMPDIR="$work"  # a private tmux server: never touches the user's sessions
cleanup() {
  tmux kill-server 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*"
  echo "---- terminal ----"
  tmux capture-pane -p -J -t "$session" -S -200 2>/dev/null || true
  exit 1
}

screen() { tmux capture-pane -p -J -t "$session" -S -2000; }

# Waits until the terminal shows `pattern` (a fixed string) at least `count` times.
wait_for() {
  local pattern="$1" count="${2:-1}"
  for _ in $(seq 1 300); do
    if [ "$(screen | grep -cF -- "$pattern" || true)" -ge "$count" ]; then return 0; fi
    sleep 0.1
  done
  fail "timed out waiting for '$pattern' (x$count)"
}

# The prompt "> " at the start of a line, counted.
prompts() { screen | grep -c '^> ' || true; }
wait_for_prompts() {
  for _ in $(seq 1 300); do
    if [ "$(prompts)" -ge "$1" ]; then return 0; fi
    sleep 0.1
  done
  fail "timed out waiting for prompt number $1"
}

for i in $(seq 1 200); do
  echo "User: hello number $i"
  echo "Assistant: hi there, friend $i"
done >"$work/corpus.txt"
"$muse" prepare -i "$work/corpus.txt" -o "$work/data" >/dev/null
"$muse" train -p tiny -d "$work/data" -o "$work/run" --steps 20 --batch 4 --seq 32 --warmup 2 \
  --eval-every 1000 --eval-windows 2 --log-every 1000 >/dev/null 2>&1
grep -q '"chat_template"' "$work/run/$(cat "$work/run/latest")/config.json" ||
  { echo "FAIL: the checkpoint's config.json has no chat_template"; exit 1; }

# 1. The checkpoint's template: replies end at the end of their line (or after 40 tokens).
tmux new-session -d -s "$session" -x 160 -y 50 \
  "'$muse' chat -m '$work/run' --max-tokens 40 --temperature 0; echo CHAT-EXITED-\$?; sleep 60" || { echo "tmux new-session failed: skipping"; exit 77; }
if ! tmux has-session -t "$session" 2>/dev/null; then
  echo "the tmux server could not start in this environment: skipping"
  exit 77
fi
wait_for "muse chat:"
wait_for_prompts 1
tmux send-keys -t "$session" "hello number 7" Enter
wait_for_prompts 2
tmux send-keys -t "$session" "and again" Enter
wait_for_prompts 3
tmux send-keys -t "$session" C-c
wait_for "Ctrl-C stops a reply"
wait_for_prompts 4
tmux send-keys -t "$session" "/reset" Enter
wait_for "[history cleared]"
wait_for_prompts 5
tmux send-keys -t "$session" "hello after reset" Enter
wait_for_prompts 6
tmux send-keys -t "$session" "/exit" Enter
wait_for "CHAT-EXITED-0"
tmux kill-session -t "$session"

# 2. A template whose replies have no end: the reply runs until Ctrl-C stops it, and the chat goes on.
cat >"$work/endless.json" <<'JSON'
{"user": "User: {message}\n", "assistant": "Assistant: {message}"}
JSON
tmux new-session -d -s "$session" -x 160 -y 50 \
  "'$muse' chat -m '$work/run' --template '$work/endless.json' --max-tokens 100000000 --seed 1; echo CHAT-EXITED-\$?; sleep 60"
wait_for_prompts 1
tmux send-keys -t "$session" "tell me everything" Enter
sleep 1
tmux send-keys -t "$session" C-c
wait_for "[stopped]"
wait_for_prompts 2
tmux send-keys -t "$session" "one more" Enter
sleep 0.5
tmux send-keys -t "$session" C-c
wait_for "[stopped]" 2
wait_for_prompts 3
tmux send-keys -t "$session" "/exit" Enter
wait_for "CHAT-EXITED-0"
echo "chat end to end: ok"
