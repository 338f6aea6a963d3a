#!/usr/bin/env bash
# Reproduces the benchmark tables of docs/results.md. Usage: scripts/results.sh TASK [THREADS]
# Runs are stored by config hash under results/TASK/runs and reused, so this script can be
# interrupted and rerun at any time; it continues where it stopped.
#
# Stage 1 finishes full, lora and lorapro (tuning and all seeds) before stage 2 tunes the
# other methods, so that an interrupted run already answers the main question.
set -euo pipefail
task=${1:?usage: scripts/results.sh mr|trec|fashion|gsm [threads]}
threads=${2:-1}
lorapro=${LORAPRO:-.venv/bin/lorapro}
# --refine 0: these runs predate the bench's refinement (each method's rate is chosen on the
# coarse grid, 4-5x apart); refining would add two runs per method and task.
common=(--threads "$threads" --out "results/$task" --no-progress --refine 0)
case "$task" in
  mr|trec)
    sizes=(--train-size 1000 --val-size 300 --test-size 1000 --epochs 2 --seeds 3 --lr-grid 1e-4,5e-4,2e-3)
    all=full,lora,lorapro,lorapro-full,rslora,dora,pissa,loraplus,loraga,lorapro-factored,lorapro-factored-m
    all+=,riemannian,lorafa,lorarite ;;
  fashion)
    sizes=(--seeds 3 --lr-grid 1e-4,5e-4,2e-3)
    all=full,lora,lorapro,lorapro-full,rslora,dora,pissa,loraplus,loraga,lorapro-factored,lorapro-factored-m ;;
  gsm)
    sizes=(--seeds 1 --lr-grid 2e-5,2e-4,1e-3)
    all=full,lora,lorapro,lorapro-factored,lorapro-full ;;
  *) echo "unknown task $task" >&2; exit 2 ;;
esac
"$lorapro" bench --task "$task" --methods full,lora,lorapro "${sizes[@]}" "${common[@]}"
"$lorapro" bench --task "$task" --methods "$all" "${sizes[@]}" "${common[@]}"
