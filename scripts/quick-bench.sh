#!/usr/bin/env bash
# First-day throughput check until `haven bench` exists (issue 3): wrk, closed loop,
# 128-byte POST /append, against (a) the log app alone and (b) a 3-node Haven cluster on
# loopback, in the same run. Usage: scripts/quick-bench.sh [seconds] [connections]
set -euo pipefail
secs=${1:-5}; conns=${2:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
haven=$root/target/release/haven
[ -x "$haven" ] || cargo build --release --manifest-path "$root/Cargo.toml"
dir=$(mktemp -d /tmp/haven-quick-bench.XXXXXX)
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
body=$(printf 'x%.0s' $(seq 1 128))
cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.body = "$body"
LUA
run_wrk() { wrk -t"$(( conns < 2 ? 1 : 2 ))" -c"$conns" -d"${secs}s" --latency -s "$dir/post.lua" "$1/append" | grep -E "Requests/sec|  50%|  90%|  99%"; }

"$haven" logapp --listen 127.0.0.1:16000 --file "$dir/alone.txt" --prepopulate 1000 2>/dev/null & pids+=($!)
sleep 0.5
echo "== log app alone"; run_wrk http://127.0.0.1:16000

for i in 1 2 3; do
  "$haven" logapp --listen 127.0.0.1:1600$i --file "$dir/app$i.txt" --prepopulate 1000 2>/dev/null & pids+=($!)
  cat > "$dir/n$i.toml" <<TOML
[node]
id = $i
client_addr = "127.0.0.1:1610$i"
raft_addr = "127.0.0.1:1620$i"
admin_addr = "127.0.0.1:1630$i"
data_dir = "$dir/data$i"
[app]
url = "http://127.0.0.1:1600$i"
TOML
  for j in 1 2 3; do printf '[[peers]]\nid = %s\nraft_addr = "127.0.0.1:1620%s"\nclient_addr = "127.0.0.1:1610%s"\n' $j $j $j >> "$dir/n$i.toml"; done
done
for i in 1 2 3; do RUST_LOG=warn "$haven" node --config "$dir/n$i.toml" 2>"$dir/n$i.log" & pids+=($!); done
sleep 3
leader=$("$haven" status --admin 127.0.0.1:16301 --json | sed -n 's/.*"leader_id": \([0-9]*\).*/\1/p')
echo "== haven 3 nodes, writes to the leader (node $leader)"; run_wrk "http://127.0.0.1:1610$leader"
follower=$(( leader % 3 + 1 ))
echo "== haven 3 nodes, writes to a follower (node $follower)"; run_wrk "http://127.0.0.1:1610$follower"
cmp "$dir/app1.txt" "$dir/app2.txt" >/dev/null 2>&1 || sleep 2
cmp "$dir/app1.txt" "$dir/app2.txt" && cmp "$dir/app1.txt" "$dir/app3.txt" && echo "replicas identical after the run"
