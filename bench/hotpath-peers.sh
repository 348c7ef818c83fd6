#!/usr/bin/env bash
# Side-by-side hot-path comparison: a proxied GET (keep-alive unless
# WRK_HEADER says otherwise) with a 64-byte body through edgelb, nginx and
# HAProxy, each pinned to CPU 0 with one worker; the origin and wrk share
# CPU 1. Reports requests/s, p99 and CPU
# time per request of the proxy process (from /proc/PID/stat).
#
# The three proxies run side by side on their own ports and wrk visits them
# in turn, ROUNDS times: on a shared or virtual machine the noise drifts
# over seconds, and alternating short runs lets each round compare the
# proxies under the same conditions. The summary gives each proxy's median
# over the rounds and the median of the per-round ratios.
#
#   bench/hotpath-peers.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#
# WRK_HEADER, when set, is a header line wrk sends with every request:
# WRK_HEADER='Connection: close' measures one request per connection.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONNS=${2:-64}
ROUNDS=${3:-1}
hdr=()
if [ -n "${WRK_HEADER:-}" ]; then hdr=(-H "$WRK_HEADER"); fi
make -s build peers >/dev/null
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

ORIGIN=127.0.0.1:18901
declare -A ADDR=([edgelb]=127.0.0.1:18900 [nginx]=127.0.0.1:18902 [haproxy]=127.0.0.1:18903)
declare -A PID
BODY=$(head -c 64 /dev/zero | tr '\0' 'x')

# Origin: nginx answering a fixed 64-byte body, on CPU 1.
cat > "$work/origin.conf" <<CONF
worker_processes 1; daemon off; pid $work/origin.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { default_type text/plain; return 200 "$BODY"; } } }
CONF
taskset -c 1 nginx -c "$work/origin.conf" -e stderr & pids+=($!)

# edgelb: the config any user starts from, one core.
cat > "$work/edgelb.yaml" <<CONF
listen: ${ADDR[edgelb]}
admin: 127.0.0.1:18999
state_dir: $work/state
services:
  web: {static: [$ORIGIN]}
routes: [{service: web}]
CONF
GOMAXPROCS=1 taskset -c 0 ./bin/edgelb -config "$work/edgelb.yaml" -log-level warn & PID[edgelb]=$!; pids+=($!)

# nginx: one worker, upstream keepalive.
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

# HAProxy: one thread, server-side keep-alive.
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
frontend fe
  bind ${ADDR[haproxy]}
  default_backend be
backend be
  http-reuse always
  server o1 $ORIGIN
CONF
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & PID[haproxy]=$!; pids+=($!)
sleep 1

clk=$(getconf CLK_TCK)
# tree_cpu sums user or user+system ticks of a process and its children
# (nginx workers).
tree_cpu() { # pid field(user|both)
	local total=0 p
	for p in $1 $(pgrep -P "$1" || true); do
		total=$((total + $(awk -v f="$2" '{ print (f=="user") ? $14 : $14+$15 }' "/proc/$p/stat")))
	done
	echo "$total"
}

for name in edgelb nginx haproxy; do # warm up
	wrk -t1 -c"$CONNS" -d2s "${hdr[@]}" "http://${ADDR[$name]}/" >/dev/null
done

run() { # round name
	local r=$1 name=$2 pid=${PID[$2]}
	local c0 u0 c1 u1
	c0=$(tree_cpu "$pid" both); u0=$(tree_cpu "$pid" user)
	taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "${hdr[@]}" "http://${ADDR[$name]}/" > "$work/$name.wrk"
	c1=$(tree_cpu "$pid" both); u1=$(tree_cpu "$pid" user)
	local reqs rps p99 non2xx
	reqs=$(awk '/requests in/ {print $1}' "$work/$name.wrk")
	rps=$(awk '/Requests\/sec/ {print $2}' "$work/$name.wrk")
	p99=$(awk '$1=="99%" {v=$2; if (v ~ /ms$/) {sub("ms","",v); v*=1000} else if (v ~ /us$/) {sub("us","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000000}; print v}' "$work/$name.wrk")
	non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$name.wrk"); non2xx=${non2xx:-0}
	local us uus
	us=$(echo "($c1 - $c0) * 1000000 / $clk / $reqs" | bc -l); uus=$(echo "($u1 - $u0) * 1000000 / $clk / $reqs" | bc -l)
	printf 'round %d  %-8s %10s req/s  p99 %7.0f us  cpu/req %6.2f us (user %5.2f)  non-2xx %s\n' "$r" "$name" "$rps" "$p99" "$us" "$uus" "$non2xx"
	echo "$r $name $rps $p99 $us" >> "$work/summary"
}

for r in $(seq 1 "$ROUNDS"); do
	for name in edgelb nginx haproxy; do run "$r" "$name"; done
done

awk '
function median(a, n,   i, j, t) {
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ rps[$2, $1] = $3; p99[$2, $1] = $4; cpu[$2, $1] = $5; if ($1 > rounds) rounds = $1 }
END {
	printf "\nmedians over %d round(s):\n", rounds
	split("edgelb nginx haproxy", names, " ")
	for (k = 1; k <= 3; k++) {
		nm = names[k]
		for (r = 1; r <= rounds; r++) { a[r] = cpu[nm, r]; b[r] = rps[nm, r]; c[r] = p99[nm, r] }
		printf "%-8s cpu/req %6.2f us  %9.0f req/s  p99 %6.0f us\n", nm, median(a, rounds), median(b, rounds), median(c, rounds)
	}
	for (k = 2; k <= 3; k++) {
		nm = names[k]
		for (r = 1; r <= rounds; r++) { a[r] = cpu["edgelb", r] / cpu[nm, r]; b[r] = p99["edgelb", r] / p99[nm, r] }
		printf "edgelb / %-7s cpu per request %.2fx, p99 %.2fx (medians of the per-round ratios)\n", nm, median(a, rounds), median(b, rounds)
	}
}' "$work/summary"
