#!/usr/bin/env bash
# Train the default model on a lent GPU machine, through the device tool:
#   here:  bash scripts/gpu_bundle.sh       (packs .dev/: synthesizers, text sources, PyAV)
#   there: OUT=... bash scripts/gpu_train.sh  with .dev carried
# It synthesizes a fresh corpus there with some cores while it trains on it (export.train's batch
# workers pick up new shards as they land) and leaves the weights, split into files the tool brings
# back (16 MiB each), with the logs in $OUT. `python -m export.gpu_weights` joins them into a state.
# The machine has Python 3.12 with torch, numpy and tokenizers; nothing can be installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
BATCH=${BATCH:-256} LR=${LR:-0.002} WARMUP=${WARMUP:-200} LAYERS=${LAYERS:-8}
SYNTH=${SYNTH:-7} WORKERS=${WORKERS:-8} COUNT=${COUNT:-400000} EVAL_EVERY=${EVAL_EVERY:-1000}
TRAIN_SECONDS=${TRAIN_SECONDS:-460} DEVICE=${DEVICE:-cuda} INIT=${INIT:-checkpoints/train-state/best.pt}
# a skills stage: SKILL_BOOST=2 RESPOND_PROB=0.7 (export.train); ARITHMETIC_BOOST multiplies arithmetic's
SKILL_BOOST=${SKILL_BOOST:-1} ARITHMETIC_BOOST=${ARITHMETIC_BOOST:-1} RESPOND_PROB=${RESPOND_PROB:-0.5}
DRILL=${DRILL:-0} DRILL_HOME=${DRILL_HOME:-0.25}  # text-only skill examples per step (export.train.Drill)
# Training starts once MIN_SHARDS training shards (500 utterances each) are in: a run that started on 6k
# utterances with 5 synthesis processes (~250 utt/s against ~1200 consumed) overfitted them (held-out loss
# rose) before the corpus caught up; one that started on 8.5k with 7 (~470 utt/s) recovered.
MIN_SHARDS=${MIN_SHARDS:-$SYNTH} WORK=${WORK:-/tmp/rawwave}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
say() { echo "$(date +%H:%M:%S) gpu_train: $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
say "unpacking into $WORK"
mkdir -p "$WORK/site" "$WORK/run"
python3 - "$WORK" <<'EOF' || exit 1
import sys, tarfile
work = sys.argv[1]
tarfile.open(".dev/av.tar.xz").extractall(f"{work}/site")
tarfile.open(".dev/gpu-bundle.tar.xz").extractall(work)
EOF
export PYTHONPATH="$WORK/site" LD_LIBRARY_PATH="$WORK/lib" ESPEAK_DATA_PATH="$WORK"
# export.speech and export.corpus read these system paths; fill them only where the machine lacks them.
install_dir() { [ -e "$2" ] || { mkdir -p "$(dirname "$2")" && cp -r "$1" "$2"; }; }
install_dir "$WORK/espeak-ng-data" /usr/lib/x86_64-linux-gnu/espeak-ng-data
install_dir "$WORK/share/wordnet" /usr/share/wordnet
install_dir "$WORK/share/fortunes" /usr/share/games/fortunes
install_dir "$WORK/share/dict/american-english" /usr/share/dict/american-english

python3 - <<'EOF' || exit 1
import random, torch
from export import corpus, speech
rng = random.Random(0)
for engine in ("espeak", "flite"):
    voice = speech.sample_voice(rng)
    while voice.engine != engine:
        voice = speech.sample_voice(rng)
    spoken = speech.synthesize("check one two three", voice)
    print(f"synthesis ok: {voice.label} {len(spoken.audio) / 16000:.2f} s, {len(spoken.words)} words")
print("espeak variants:", len(speech.espeak_variants()), "| sentences:", len(corpus.wordnet_sentences()),
      len(corpus.fortune_sentences()), len(corpus.docstring_sentences()))
print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF

say "synthesizing $COUNT utterances with $SYNTH processes, in the background"
python3 -m export.dataset --out "$WORK/corpus" --count "$COUNT" --workers "$SYNTH" >"$OUT/data.log" 2>&1 &
synth=$!
until [ "$(ls "$WORK"/corpus/train-*.jsonl 2>/dev/null | wc -l)" -ge "$MIN_SHARDS" ] &&
  [ -e "$WORK/corpus/eval-heldout-00000.jsonl" ]; do
  kill -0 $synth 2>/dev/null || { cat "$OUT/data.log"; exit 1; }
  sleep 1
done
say "first shards in; training for $TRAIN_SECONDS s"
[ -e "$WORK/run/tokenizer.json" ] || cp checkpoints/train-state/tokenizer.json "$WORK/run/"
# --seconds fits the cosine schedule to the pace it measures; the timeout only guards the call's limit
timeout --signal=INT $((TRAIN_SECONDS + 45)) python3 -m export.train --data "$WORK/corpus" --run "$WORK/run" \
  --init "$INIT" --layers "$LAYERS" --batch "$BATCH" --lr "$LR" --warmup "$WARMUP" --steps 1000000 \
  --workers "$WORKERS" --device "$DEVICE" --bf16 --threads 2 --curriculum-steps 1 \
  --skill-boost "$SKILL_BOOST" --arithmetic-boost "$ARITHMETIC_BOOST" --respond-prob "$RESPOND_PROB" \
  --drill "$DRILL" --drill-home "$DRILL_HOME" \
  --seconds "$TRAIN_SECONDS" --eval-every "$EVAL_EVERY" --eval-cer-count 8 --checkpoint-seconds 45 \
  >"$OUT/train.log" 2>&1
say "training exited with $?"
kill $synth 2>/dev/null
tail -1 "$OUT/data.log"
cp "$WORK"/run/{metrics.jsonl,settings.json,tokenizer.json} "$OUT/"
python3 -m export.gpu_weights split "$WORK/run/state.pt" "$OUT" && say "weights in $OUT" && ls -l "$OUT"
