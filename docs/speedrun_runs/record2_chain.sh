#!/bin/bash
# How record 2's seeds were run (docs/speedrun.md): one after another, each from a cold start, from the
# root of a fresh clone with its requirements installed. Usage:
#   ENVS="MIMALLOC_PURGE_DELAY=-1" bash record2_chain.sh "seed1337" "seed2 --config.train.seed=2" "seed3 --config.train.seed=3"
# Logs go to out/rec/NAME.log; each run's files to out/NAME.
mkdir -p out/rec
run() {  # NAME OVERRIDES...
  name=$1; shift
  rm -rf data/shakespeare_char  # Cold start: data preparation is part of the timed run.
  echo "$(date -u +%FT%TZ) start $name: $*" >> out/rec/INDEX
  s=$(date +%s.%N)
  env $ENVS python scripts/train.py --config configs/shakespeare.py:speedrun --config.out_dir=out/$name "$@" > out/rec/$name.log 2>&1
  e=$(date +%s.%N)
  echo "WALL train.py $(python -c "print(round($e-$s,1))") s" >> out/rec/$name.log
  python scripts/evaluate.py --ckpt_dir out/$name >> out/rec/$name.log 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> out/rec/INDEX
}
for spec in "$@"; do
  eval "run $spec"
done
