#!/usr/bin/env bash
# A torture batch as docs/RELIABILITY.md reports them: one `haven torture` run per seed,
# one JSON line each. Usage: docs/bench/torture-batch.sh FIRST LAST [NODES] [SECONDS] > batch.jsonl
set -euo pipefail
first=${1:?first seed}
last=${2:?last seed}
nodes=${3:-3}
seconds=${4:-20}
haven=${HAVEN:-target/release/haven}
for seed in $(seq "$first" "$last"); do
  "$haven" torture --seed "$seed" --nodes "$nodes" --duration "$seconds" --json
done
