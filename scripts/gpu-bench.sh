#!/usr/bin/env bash
# The SPEC §7 benchmark grid on the GPU machine: muse (phase7, phase8 and the arch=gpt baseline) and the
# PyTorch peer (bench/peers/gpt_pytorch.py) on the same GPU in the same run.
#   here:   scripts/gpu-bundle.sh                 # Release build in .gpu/, runtime .debs in .deb/
#   there:  scripts/gpu-bench.sh                  (carry .gpu and .deb; needs python3, and torch for the peers)
#   here:   python3 scripts/bench-report.py OUT/bench/*.jsonl > report.md
# Writes under ${OUT:-/tmp/muse-bench}/bench/:
#   muse.jsonl   one `muse bench --json` record per command, plus "label", "group" and "command"
#   peers.jsonl  the peer's records, plus the same fields
#   meta.json    GPU, driver, muse version and commit, torch version, settings, wall time
#                (meta-muse.json / meta-peers.json with PART=muse / PART=peers)
#   logs/        stderr of every command
# Every failure (non-zero exit, timeout, a shape without a record) becomes a record with "error", the
# command and the tail of its stderr, so the report lists it.
#
# Settings (environment):
#   PART=all|muse|peers      all (default); muse: leave the peers out; peers: only the peers (their long-context
#                            shapes included). The default grid may not fit one 10-minute device call (the
#                            peer compiles with torch.compile for each size and mode): run PART=muse and
#                            PART=peers as two calls and give both outputs to bench-report.py.
#   MUSE=.gpu/muse  DEVICE=cuda  OUT=/tmp/muse-bench  PYTHON=python3
#   GPU_MATH=bf16            muse's --gpu-math for the forward and train rows (bf16, tf32 or fp32)
#   GRID=full|quick          full: SPEC §7 + throughput shapes; quick: a handful of shapes
#   MODES="forward train"    SIZES="small medium"   MODELS="phase7 phase8 gpt"
#   PEERS=1 LONG=1 DECODE=1  (0 leaves that part out)    LONG_MODELS="phase8 phase7"  (MODELS=none: peers only)
#   SMALL_SHAPES="B:N ..." MEDIUM_SHAPES="B:N ..." LONG_SEQS="N ..." DECODE_BATCHES="B ..." DECODE_CONTEXT=1000
#                            (override what GRID chose)
#   ITERS=10 WARMUP=2        muse timed / warm-up iterations;  DECODE_ITERS=20 DECODE_WARMUP=2
#   DECODE_DEVICE=DEVICE     cpu: time the CPU recurrent decoder instead of the GPU one
#   PEER_ITERS=ITERS PEER_WARMUP=3 PEER_ARGS=""   (e.g. PEER_ARGS=--no-compile)
#   TIMEOUT=120              seconds per muse command;  PEER_TIMEOUT=300 per peer process (a whole grid)
#   BUDGET_S=570             stop starting commands after this many seconds (the rest are recorded as
#                            skipped); 0 = no budget. Keeps a run inside a 10-minute device call.
#   APPEND=0                 1 = append to existing .jsonl files instead of starting them afresh
#   MUSE_COMMIT              recorded in meta.json (else git rev-parse, where there is a checkout)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MUSE="${MUSE:-.gpu/muse}"
DEVICE="${DEVICE:-cuda}"
GPU_MATH="${GPU_MATH:-bf16}"
DIR="${OUT:-/tmp/muse-bench}/bench"
PYTHON="${PYTHON:-python3}"
GRID="${GRID:-full}"
MODES="${MODES:-forward train}"
SIZES="${SIZES:-small medium}"
MODELS="${MODELS:-phase7 phase8 gpt}"
LONG_MODELS="${LONG_MODELS:-phase8 phase7}"
PEERS="${PEERS:-1}"
LONG="${LONG:-1}"
DECODE="${DECODE:-1}"
ITERS="${ITERS:-10}"
WARMUP="${WARMUP:-2}"
DECODE_ITERS="${DECODE_ITERS:-20}"
DECODE_WARMUP="${DECODE_WARMUP:-2}"
DECODE_CONTEXT="${DECODE_CONTEXT:-1000}"
PEER_ITERS="${PEER_ITERS:-$ITERS}"
PEER_WARMUP="${PEER_WARMUP:-3}"
PEER_ARGS="${PEER_ARGS:-}"
TIMEOUT="${TIMEOUT:-120}"
PEER_TIMEOUT="${PEER_TIMEOUT:-300}"
BUDGET_S="${BUDGET_S:-570}"
APPEND="${APPEND:-0}"
PART="${PART:-all}"
case "$PART" in
  all) ;;
  muse) PEERS=0 ;;
  peers) PEERS=1; MODELS=none; LONG_MODELS=none; DECODE=0 ;;
  *) echo "gpu-bench.sh: PART=$PART: expected all, muse or peers" >&2; exit 2 ;;
esac
[ "$MODELS" = none ] && MODELS=""
[ "$LONG_MODELS" = none ] && LONG_MODELS=""

case "$GRID" in
  full)
    small_shapes="1:256 2:256 4:256 8:256 1:512 2:512 4:512 1:1024 2:1024 32:1024 64:1024"
    medium_shapes="1:512 2:512 4:512 1:1024 32:1024"
    long_seqs="2048 4096 8192 16384"
    decode_batches="1 16" ;;
  quick)
    small_shapes="1:256 8:256 1:1024"
    medium_shapes="1:512"
    long_seqs="4096"
    decode_batches="1" ;;
  *) echo "gpu-bench.sh: GRID=$GRID: expected full or quick" >&2; exit 2 ;;
esac
SMALL_SHAPES="${SMALL_SHAPES:-$small_shapes}"
MEDIUM_SHAPES="${MEDIUM_SHAPES:-$medium_shapes}"
LONG_SEQS="${LONG_SEQS:-$long_seqs}"
DECODE_BATCHES="${DECODE_BATCHES:-$decode_batches}"
# Decode runs on the GPU recurrent decoder (DECODE_DEVICE=cpu: the CPU one, for comparison).
DECODE_DEVICE="${DECODE_DEVICE:-$DEVICE}"

mkdir -p "$DIR/logs" || exit 1
MUSE_JSONL="$DIR/muse.jsonl"
PEERS_JSONL="$DIR/peers.jsonl"
META_JSON="$DIR/meta.json"
[ "$PART" != all ] && META_JSON="$DIR/meta-$PART.json"
if [ "$APPEND" != 1 ]; then  # start afresh the files this run writes
  [ "$PART" != peers ] && : > "$MUSE_JSONL"
  [ "$PEERS" = 1 ] && : > "$PEERS_JSONL"
fi

source scripts/gpu-runtime.sh

if [ "$PART" != peers ] && [ ! -x "$MUSE" ]; then
  echo "gpu-bench.sh: no muse binary at $MUSE (set MUSE=...)" >&2
  exit 2
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
progress() { printf '[%4ss] %s\n' "$(elapsed)" "$*"; }

# ---- meta.json --------------------------------------------------------------------------------------------
gpu_info=""
if command -v nvidia-smi > /dev/null 2>&1; then
  gpu_info="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
fi
muse_version=""
[ -x "$MUSE" ] && muse_version="$("$MUSE" --version 2>&1 | head -5)"
commit="${MUSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}"
torch_version=""
if [ "$PEERS" = 1 ]; then
  torch_version="$(timeout 60 "$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
fi

write_meta() {  # $1 = "start" or "end"
  META_PHASE="$1" GPU_INFO="$gpu_info" MUSE_VERSION="$muse_version" COMMIT="$commit" TORCH_VERSION="$torch_version" \
  MUSE_BIN="$MUSE" DEVICE="$DEVICE" GPU_MATH="$GPU_MATH" GRID="$GRID" MODES="$MODES" SIZES="$SIZES" MODELS="$MODELS" PEERS="$PEERS" \
  LONG="$LONG" DECODE="$DECODE" ITERS="$ITERS" WARMUP="$WARMUP" PEER_ITERS="$PEER_ITERS" PEER_WARMUP="$PEER_WARMUP" \
  PEER_ARGS="$PEER_ARGS" DECODE_ITERS="$DECODE_ITERS" DECODE_CONTEXT="$DECODE_CONTEXT" TIMEOUT="$TIMEOUT" \
  PEER_TIMEOUT="$PEER_TIMEOUT" BUDGET_S="$BUDGET_S" WALL_S="$(elapsed)" META="$META_JSON" PART="$PART" \
  MUSE_JSONL="$MUSE_JSONL" PEERS_JSONL="$PEERS_JSONL" "$PYTHON" - <<'PY'
import datetime, json, os, platform
e = os.environ
path = e["META"]
meta = {}
if e["META_PHASE"] == "end" and os.path.exists(path):
    with open(path) as f:
        meta = json.load(f)
gpu = [part.strip() for part in e["GPU_INFO"].split(",")] if e["GPU_INFO"] else []
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
if e["META_PHASE"] == "start":
    meta = {
        "started": now,
        "host": platform.node(),
        "gpu": gpu[0] if gpu else None,
        "gpu_memory": gpu[1] if len(gpu) > 1 else None,
        "driver": gpu[2] if len(gpu) > 2 else None,
        "cpu_count": os.cpu_count(),
        "muse_version": e["MUSE_VERSION"],
        "muse_commit": e["COMMIT"] or None,
        "muse_binary": e["MUSE_BIN"],
        "torch": e["TORCH_VERSION"] or None,
        "device": e["DEVICE"],
        "part": e["PART"],
        "settings": {k.lower(): e[k] for k in ("GPU_MATH", "GRID", "MODES", "SIZES", "MODELS", "PEERS", "LONG", "DECODE", "ITERS",
                                              "WARMUP", "PEER_ITERS", "PEER_WARMUP", "PEER_ARGS", "DECODE_ITERS",
                                              "DECODE_CONTEXT", "TIMEOUT", "PEER_TIMEOUT", "BUDGET_S")},
    }
else:
    meta["finished"] = now
    meta["wall_s"] = int(e["WALL_S"])
    counts = {}
    written = {"all": ("MUSE_JSONL", "PEERS_JSONL"), "muse": ("MUSE_JSONL",), "peers": ("PEERS_JSONL",)}[e["PART"]]
    for name in written:
        ok = err = 0
        if os.path.exists(e[name]):
            for line in open(e[name]):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "error" in rec:
                    err += 1
                else:
                    ok += 1
        counts[os.path.basename(e[name])] = {"records": ok, "errors": err}
    meta["counts"] = counts
with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
os.replace(path + ".tmp", path)
PY
}

# ---- one command -> labelled records --------------------------------------------------------------------
# annotate JSONL LABEL RC WALL_MS TIMEOUT OUT ERR COMMAND EXPECTED
#   Appends the command's JSON records to JSONL with "label" (LABEL),
#   "group" (grid, throughput, long, decode) and "command"; every expected shape ("mode:B:N ...", decode:
#   N = context) without a record becomes an error record. Prints one summary line per record.
read -r -d '' ANNOTATE <<'PY'
import json, sys
path, label, rc, wall_ms, timeout_s, out_path, err_path, command, expected = sys.argv[1:10]
rc, wall = int(rc), int(wall_ms) / 1000.0

def group(mode, batch, seq):
    if mode == "decode":
        return "decode"
    if seq > 1024:
        return "long"
    return "throughput" if batch * seq >= 32768 else "grid"

records = []
with open(out_path, errors="replace") as f:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
try:
    with open(err_path, errors="replace") as f:
        tail = [l.rstrip()[:300] for l in f if l.strip()][-6:]
except OSError:
    tail = []

def shape_of(rec):
    return (rec.get("mode"), rec.get("batch"), rec.get("seq"))

wanted = []
for item in expected.split():
    mode, b, n = item.split(":")
    wanted.append((mode, int(b), int(n)))

out = []
single = len(wanted) == 1
for rec in records:
    rec["label"] = label
    mode, b, n = shape_of(rec)
    if isinstance(b, int) and isinstance(n, int):
        rec["group"] = group(mode, b, n)
    rec["command"] = command
    if single:
        rec["wall_s"] = round(wall, 2)
    if "error" in rec and tail:
        rec.setdefault("stderr_tail", tail)
    out.append(rec)

got = {shape_of(r) for r in records}
if rc == 0:
    why = "no JSON record (exit 0)"
elif rc in (124, 137):
    why = f"timeout after {timeout_s} s"
elif rc == 200:
    why = "skipped: time budget (BUDGET_S) used up"
else:
    why = f"exit status {rc}"
for mode, b, n in wanted:
    if (mode, b, n) in got:
        continue
    out.append({"label": label, "mode": mode, "batch": b, "seq": n, "group": group(mode, b, n), "error": why,
                "command": command, "stderr_tail": tail if rc != 200 else []})

with open(path, "a") as f:
    for rec in out:
        f.write(json.dumps(rec) + "\n")
for rec in out:
    head = f"{rec['label']} {rec.get('mode')} B={rec.get('batch')} N={rec.get('seq')}"
    if "error" in rec:
        detail = (" | " + rec["stderr_tail"][-1]) if rec.get("stderr_tail") else ""
        print(f"{head}: ERROR {rec['error']}{detail}")
    else:
        mem = rec.get("peak_mem_mb")
        mem_s = f", peak {mem:,.0f} MiB" if isinstance(mem, (int, float)) else ""
        print(f"{head}: {rec.get('tokens_per_s', 0):,.0f} tokens/s, {rec.get('median_ms', 0):.2f} ms{mem_s}")
PY

# The time left for the next command: min(limit, budget left); 0 when the budget is used up.
time_left() {  # $1 = the command's own limit
  local limit=$1
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$(( BUDGET_S - $(elapsed) ))
    [ "$left" -le 5 ] && { echo 0; return; }
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "$limit"
}

n_cmd=0
# run_cmd JSONL LABEL LIMIT EXPECTED -- command...
run_cmd() {
  local jsonl=$1 label=$2 limit=$3 expected=$4
  shift 5
  n_cmd=$((n_cmd + 1))
  local log t0 rc limit_now
  local mode_tag=${expected# }
  mode_tag=${mode_tag%%:*}
  log="$DIR/logs/$(printf '%03d' "$n_cmd")-${label}-$mode_tag"
  t0=$(date +%s%N)
  limit_now=$(time_left "$limit")
  if [ "$limit_now" -le 0 ]; then
    : > "$log.out"; : > "$log.err"
    rc=200
  else
    timeout -k 10 "$limit_now" "$@" > "$log.out" 2> "$log.err"
    rc=$?
  fi
  local wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  "$PYTHON" -c "$ANNOTATE" "$jsonl" "$label" "$rc" "$wall_ms" "$limit_now" "$log.out" "$log.err" "$*" "$expected" |
    while IFS= read -r line; do progress "$line"; done
}

# muse_args LABEL -> the preset arguments of a model label (phase7-small, phase8-medium, gpt-small, ...)
muse_args() {
  local model=${1%-*} size=${1##*-}
  case "$model" in
    phase7|phase8) echo "-p $model-$size" ;;
    gpt) echo "-p phase8-$size --set arch=gpt --set ffn=dense" ;;
    *) echo "-p $1" ;;
  esac
}

run_muse() {  # LABEL MODE B N [extra muse args...]
  local label=$1 mode=$2 b=$3 n=$4
  shift 4
  # shellcheck disable=SC2046
  run_cmd "$MUSE_JSONL" "$label" "$TIMEOUT" "$mode:$b:$n" -- \
    "$MUSE" bench $(muse_args "$label") "$@" --mode "$mode" -b "$b" -n "$n" --warmup "$WARMUP" --iters "$ITERS" \
    --device "$DEVICE" --gpu-math "$GPU_MATH" --json
}

run_peer() {  # SIZE MODE "B:N B:N ..."
  local size=$1 mode=$2 shapes=$3 expected="" s
  for s in $shapes; do expected="$expected $mode:$s"; done
  # shellcheck disable=SC2086
  run_cmd "$PEERS_JSONL" "peer-gpt-$size" "$PEER_TIMEOUT" "$expected" -- \
    "$PYTHON" bench/peers/gpt_pytorch.py --size "$size" --mode "$mode" --grid "$(echo $shapes | tr ' ' ',')" \
    --warmup "$PEER_WARMUP" --iters "$PEER_ITERS" --device "$DEVICE" $PEER_ARGS
}

write_meta start
progress "muse bench grid: GRID=$GRID device=$DEVICE muse=$MUSE (${muse_version%%$'\n'*}) gpu=${gpu_info:-none} torch=${torch_version:-none}"
progress "writing $DIR"

peer_long_done=0
# ---- forward and train grids: per mode and size, every muse model shape by shape, then the peer ------------
for mode in $MODES; do
  for size in $SIZES; do
    case "$size" in
      small) shapes=$SMALL_SHAPES ;;
      medium) shapes=$MEDIUM_SHAPES ;;
      *) progress "unknown size '$size' (small or medium): skipped"; continue ;;
    esac
    progress "== $mode, $size: ${shapes}"
    for shape in $shapes; do
      for model in $MODELS; do
        run_muse "$model-$size" "$mode" "${shape%:*}" "${shape#*:}"
      done
    done
    if [ "$PEERS" = 1 ]; then
      peer_shapes=$shapes
      if [ "$LONG" = 1 ] && [ "$mode" = forward ] && [ "$size" = small ]; then
        # The long-context shapes in the same process: no second start-up and compilation.
        for n in $LONG_SEQS; do peer_shapes="$peer_shapes 1:$n"; done
        peer_long_done=1
      fi
      progress "-- peer-gpt-$size $mode: ${peer_shapes} (one process, torch.compile during warm-up)"
      run_peer "$size" "$mode" "$peer_shapes"
    fi
  done
done

# ---- long context: forward, B=1, N up to 16K (phase7's learned positions need a longer table) ------------
if [ "$LONG" = 1 ] && { [ -n "$LONG_MODELS" ] || { [ "$PEERS" = 1 ] && [ "$peer_long_done" = 0 ]; }; }; then
  progress "== long context, forward, B=1: N = $LONG_SEQS"
  for n in $LONG_SEQS; do
    for model in $LONG_MODELS; do
      extra=()
      [ "$model" = phase7 ] && extra=(--set "max_seq=$n")
      run_muse "$model-small" forward 1 "$n" "${extra[@]}"
    done
  done
  if [ "$PEERS" = 1 ] && [ "$peer_long_done" = 0 ]; then
    long_shapes=""
    for n in $LONG_SEQS; do long_shapes="$long_shapes 1:$n"; done
    progress "-- peer-gpt-small long context"
    run_peer small forward "$long_shapes"
  fi
fi

# ---- decode: batch 1 and batched, after a prompt ------------------------------------------------------------
if [ "$DECODE" = 1 ]; then
  progress "== decode, context $DECODE_CONTEXT: batches $DECODE_BATCHES"
  for b in $DECODE_BATCHES; do
    for model in phase8 phase7; do
      extra=()
      need=$((DECODE_CONTEXT + DECODE_WARMUP + DECODE_ITERS))
      # phase7's learned positions hold 1,024 rows: a longer table only if the run needs it (no effect on time).
      [ "$model" = phase7 ] && [ "$need" -gt 1024 ] && extra=(--set "max_seq=$need")
      # shellcheck disable=SC2046
      run_cmd "$MUSE_JSONL" "$model-small" "$TIMEOUT" "decode:$b:$DECODE_CONTEXT" -- \
        "$MUSE" bench $(muse_args "$model-small") "${extra[@]}" --mode decode -b "$b" --context "$DECODE_CONTEXT" \
        --warmup "$DECODE_WARMUP" --iters "$DECODE_ITERS" --device "$DECODE_DEVICE" --json
    done
  done
fi

write_meta end
written=()
[ "$PART" != peers ] && written+=("$MUSE_JSONL")
[ "$PEERS" = 1 ] && written+=("$PEERS_JSONL")
ok=$(cat "${written[@]}" /dev/null | grep -vc '"error"')
bad=$(cat "${written[@]}" /dev/null | grep -c '"error"')
progress "done in $(elapsed) s: $ok records, $bad errors, in $DIR (report: python3 scripts/bench-report.py ${written[*]})"
