#!/usr/bin/env bash
# Reproduces the benchmark tables of docs/results.md.
# Usage: scripts/results.sh TASK [THREADS] [PROTOCOL] [BENCH OPTIONS...]
#   PROTOCOL short (default): the stored tables (results/TASK), 64 to 126 steps per run.
#   PROTOCOL long (trec, fashion): four times the training data, so four times the steps, at the
#     same epochs, validation and test splits (results/TASK-long); rates refined once.
#   BENCH OPTIONS go to both `lorapro bench` calls: --report-only rewrites the folder's reports
#     (results.md, summary.json, figures) from its stored runs and trains nothing.
# Runs are stored by config hash under the output folder's runs/ and reused, so this script can
# be interrupted and rerun at any time; it continues where it stopped.
#
# Stage 1 finishes full, lora and lorapro (tuning and all seeds) before stage 2 tunes the
# other methods, so that an interrupted run already answers the main question.
set -euo pipefail
task=${1:?usage: scripts/results.sh mr|trec|fashion|gsm [threads] [short|long]}
threads=${2:-1}
protocol=${3:-short}
extra=("${@:4}")
lorapro=${LORAPRO:-.venv/bin/lorapro}
case "$protocol" in
  short)
    # --refine 0: these runs predate the bench's refinement (each method's rate is chosen on the
    # coarse grid, 4-5x apart); refining would add two runs per method and task.
    common=(--threads "$threads" --out "results/$task" --no-progress --refine 0)
    case "$task" in
      mr|trec)
        sizes=(--train-size 1000 --val-size 300 --test-size 1000 --epochs 2 --seeds 3 --lr-grid 1e-4,5e-4,2e-3)
        all=full,lora,lorapro,lorapro-full,rslora,dora,pissa,loraplus,loraga,lorapro-factored,lorapro-factored-m
        all+=,riemannian,lorafa,lorarite
        [ "$task" = trec ] && all+=,lorapro-factored-sm3,lorapro-factored-nmf ;;
      fashion)
        sizes=(--seeds 3 --lr-grid 1e-4,5e-4,2e-3)
        all=full,lora,lorapro,lorapro-full,rslora,dora,pissa,loraplus,loraga,lorapro-factored,lorapro-factored-m
        all+=,lorapro-factored-sm3,lorapro-factored-nmf ;;
      gsm)
        sizes=(--seeds 1 --lr-grid 2e-5,2e-4,1e-3)
        all=full,lora,lorapro,lorapro-factored,lorapro-full ;;
      *) echo "unknown task $task" >&2; exit 2 ;;
    esac ;;
  long)
    common=(--threads "$threads" --out "results/$task-long" --no-progress --refine 1)
    all=full,lora,lorapro,lorapro-full,lorapro-factored,riemannian
    case "$task" in
      trec) sizes=(--train-size 4000 --val-size 300 --test-size 1000 --epochs 2 --seeds 3 --lr-grid 1e-4,5e-4,2e-3) ;;
      fashion) sizes=(--train-size 8000 --seeds 3 --lr-grid 1e-4,5e-4,2e-3) ;;
      *) echo "the long protocol is defined for trec and fashion, not $task" >&2; exit 2 ;;
    esac ;;
  *) echo "unknown protocol $protocol (short or long)" >&2; exit 2 ;;
esac
"$lorapro" bench --task "$task" --methods full,lora,lorapro "${sizes[@]}" "${common[@]}" "${extra[@]}"
"$lorapro" bench --task "$task" --methods "$all" "${sizes[@]}" "${common[@]}" "${extra[@]}"
