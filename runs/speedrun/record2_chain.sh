#!/bin/bash
# How the records' seeds and their leave-one-out rows were run (runs/speedrun-logbook.md): one after
# another, each from a cold start, from the root of a clone with its requirements installed. Usage,
# from the repository root:
#   bash runs/speedrun/record2_chain.sh "seed1337" "seed2 --config.train.seed=2" "seed3 --config.train.seed=3"
# Each run is PRESET (default `speedrun`, record 4; `PRESET=speedrun_gpt2` for record 1's recipe) with
# the run's overrides. Records 2 and 3 ran when `speedrun` held their recipes: today they are
# `speedrun` with the overrides given in docs/speedrun.md. ENVS="NAME=VALUE ..." adds environment
# variables to each run (the scripts set mimalloc's purge delay themselves: docs/performance.md).
# Logs go to out/rec/NAME.log; each run's files to out/NAME.
set -u
cd "$(dirname "$0")/../.." || exit 1  # The repository root, wherever this is started from.
PRESET=${PRESET:-speedrun}
ENVS=${ENVS:-}
mkdir -p out/rec
run() {  # NAME OVERRIDES...
  name=$1; shift
  rm -rf data/shakespeare_char  # Cold start: data preparation is part of the timed run.
  echo "$(date -u +%FT%TZ) start $name ($PRESET): $*" >> out/rec/INDEX
  s=$(date +%s.%N)
  env $ENVS python scripts/train.py --config "configs/shakespeare.py:$PRESET" --config.out_dir="out/$name" "$@" \
    > "out/rec/$name.log" 2>&1
  e=$(date +%s.%N)
  echo "WALL train.py $(python -c "print(round($e-$s,1))") s" >> "out/rec/$name.log"
  python scripts/evaluate.py --ckpt_dir "out/$name" >> "out/rec/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> out/rec/INDEX
}
for spec in "$@"; do
  eval "run $spec"
done
