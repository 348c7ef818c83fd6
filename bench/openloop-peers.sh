#!/usr/bin/env bash
# Side-by-side open-loop latency: a proxied keep-alive GET with a 64-byte
# body through edgelb (default config), edgelb with batch_wait: 0s and
# nginx, each pinned to CPU 0 with one worker (GOMAXPROCS=1 for edgelb);
# the origin and the load generator share CPU 1.
#
# It first finds nginx's saturation rate with wrk (closed loop), then sends
# requests at a fixed rate (FRACTION of it unless RATE is given) with
# bin/edgelb-load, whose latencies count from when each request was due, so
# that queueing shows. The three proxies are visited in turn, ROUNDS times,
# and the summary gives each one's median p50, p99 and CPU time per request
# (from /proc/PID/stat) over the rounds, and the medians of the per-round
# ratios to nginx's p50 and p99. Each round's line also shows edgelb's
# batched waits per request.
#
#   bench/openloop-peers.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#
# RATE=20000 fixes the rate; FRACTION=0.5 (the default) sets it from
# nginx's closed-loop rate.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
CONNS=${2:-64}
ROUNDS=${3:-3}
FRACTION=${FRACTION:-0.5}
make -s build peers >/dev/null
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

ORIGIN=127.0.0.1:18911
NAMES="edgelb edgelb-nobatch nginx"
declare -A ADDR=([edgelb]=127.0.0.1:18910 [edgelb-nobatch]=127.0.0.1:18914 [nginx]=127.0.0.1:18912)
declare -A PID ADMIN
BODY=$(head -c 64 /dev/zero | tr '\0' 'x')

cat > "$work/origin.conf" <<CONF
worker_processes 1; daemon off; pid $work/origin.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { default_type text/plain; return 200 "$BODY"; } } }
CONF
taskset -c 1 nginx -c "$work/origin.conf" -e stderr & pids+=($!)

edgelb() { # name admin-port extra-server-config
	cat > "$work/$1.yaml" <<CONF
listen: ${ADDR[$1]}
admin: 127.0.0.1:$2
state_dir: $work/state-$1
server: {$3}
services:
  web: {static: [$ORIGIN]}
routes: [{service: web}]
CONF
	GOMAXPROCS=1 taskset -c 0 ./bin/edgelb -config "$work/$1.yaml" -log-level warn & PID[$1]=$!; pids+=($!)
	ADMIN[$1]=127.0.0.1:$2
}
edgelb edgelb 18919 ""
edgelb edgelb-nobatch 18918 "batch_wait: 0s"

cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream origin { server $ORIGIN; keepalive 128; }
  server { listen ${ADDR[nginx]}; location / { proxy_pass http://origin; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
taskset -c 0 nginx -c "$work/nginx.conf" -e stderr & PID[nginx]=$!; pids+=($!)
sleep 1

clk=$(getconf CLK_TCK)
tree_cpu() { # pid: user+system ticks of it and its children (nginx workers)
	local total=0 p
	for p in $1 $(pgrep -P "$1" || true); do
		total=$((total + $(awk '{ print $14+$15 }' "/proc/$p/stat")))
	done
	echo "$total"
}

for name in $NAMES; do # warm up
	taskset -c 1 wrk -t1 -c"$CONNS" -d1s "http://${ADDR[$name]}/" >/dev/null
done

if [ -z "${RATE:-}" ]; then
	taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" "http://${ADDR[nginx]}/" > "$work/sat.wrk"
	sat=$(awk '/Requests\/sec/ {print $2}' "$work/sat.wrk")
	RATE=$(echo "$sat * $FRACTION" | bc -l | awk '{printf "%d", $1}')
	echo "nginx closed loop (wrk -c$CONNS): $sat req/s; open loop at $RATE req/s"
fi

# waits prints edgelb's batched waits so far (0 for nginx).
waits() { # name
	if [ -z "${ADMIN[$1]:-}" ]; then echo 0; return; fi
	curl -s "http://${ADMIN[$1]}/metrics" | awk '/^edgelb_event_loop_batch_waits_total/ { print $2; f = 1 } END { if (!f) print 0 }'
}

run() { # round name
	local r=$1 name=$2 pid=${PID[$2]} c0 c1 w0 w1
	c0=$(tree_cpu "$pid"); w0=$(waits "$name")
	taskset -c 1 ./bin/edgelb-load -quiet -url "http://${ADDR[$name]}/" -rate "$RATE" -c "$CONNS" -d "${DUR}s" -json "$work/$name.json" > "$work/$name.out"
	c1=$(tree_cpu "$pid"); w1=$(waits "$name")
	jq -r --arg r "$r" --arg n "$name" --arg cpu "$((c1 - c0))" --arg clk "$clk" --arg w "$((w1 - w0))" \
		'[$r, $n, .rps, .latency.p50_ms, .latency.p99_ms, (($cpu|tonumber) * 1e6 / ($clk|tonumber) / .requests), .errors, (($w|tonumber) / .requests)] | @tsv' \
		"$work/$name.json" | tee -a "$work/summary" |
		awk '{ printf "round %d  %-15s %8.0f req/s  p50 %6.3f ms  p99 %6.3f ms  cpu/req %6.2f us  errors %s  batched waits/req %.2f\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
}

for r in $(seq 1 "$ROUNDS"); do
	for name in $NAMES; do run "$r" "$name"; done
done

awk -v names="$NAMES" '
function median(a, n,   i, j, t) {
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ p50[$2, $1] = $4; p99[$2, $1] = $5; cpu[$2, $1] = $6; if ($1 > rounds) rounds = $1 }
END {
	printf "\nmedians over %d round(s):\n", rounds
	n = split(names, nm, " ")
	for (k = 1; k <= n; k++) {
		for (r = 1; r <= rounds; r++) { a[r] = p50[nm[k], r]; b[r] = p99[nm[k], r]; c[r] = cpu[nm[k], r] }
		printf "%-15s p50 %6.3f ms  p99 %6.3f ms  cpu/req %6.2f us\n", nm[k], median(a, rounds), median(b, rounds), median(c, rounds)
	}
	last = nm[n]
	for (k = 1; k < n; k++) {
		for (r = 1; r <= rounds; r++) { a[r] = p50[nm[k], r] / p50[last, r]; b[r] = p99[nm[k], r] / p99[last, r] }
		printf "%s / %s p50 %.2fx, p99 %.2fx (medians of the per-round ratios)\n", nm[k], last, median(a, rounds), median(b, rounds)
	}
}' "$work/summary"
