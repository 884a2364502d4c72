#!/bin/sh
# Digitclutter (3 digits), lambda 0, Lipschitz constraint on with a smaller bound c than the
# grid's 0.9; everything else is the grid's Digitclutter budget (experiments/sweep.py).
# Resumable: rerunning skips finished runs and resumes a killed one from its checkpoint.
set -e
cd "$(dirname "$0")"
for c in 0.5 0.25 0.1; do
    run="c$c-s0"
    if [ ! -f "$run/metrics.json" ]; then
        resume=""
        [ -f "$run/config.json" ] && resume="--resume"
        iterconv train --dataset digitclutter --clutter-digits 3 --fresh-data --train-size 100000 \
            --epochs 10 --spectral-norm --lipschitz "$c" --coupling 0 --seed 0 --out "$run" $resume
    fi
    [ -f "$run/eval.json" ] || iterconv eval "$run" --out "$run/eval.json"
done
