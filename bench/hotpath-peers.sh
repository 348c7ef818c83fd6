#!/usr/bin/env bash
# Side-by-side hot-path comparison: a proxied keep-alive GET with a 64-byte
# body through edgelb, nginx and HAProxy, each pinned to CPU 0 with one
# worker; the origin and wrk share CPU 1. Reports requests/s, p99 and CPU
# time per request of the proxy process (from /proc/PID/stat).
#
#   bench/hotpath-peers.sh [DURATION_SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONNS=${2:-64}
make -s build peers >/dev/null
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

ORIGIN=127.0.0.1:18901
PROXY=127.0.0.1:18900
BODY=$(head -c 64 /dev/zero | tr '\0' 'x')

# Origin: nginx answering a fixed 64-byte body, on CPU 1.
cat > "$work/origin.conf" <<CONF
worker_processes 1; daemon off; pid $work/origin.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { default_type text/plain; return 200 "$BODY"; } } }
CONF
taskset -c 1 nginx -c "$work/origin.conf" -e stderr & pids+=($!)
sleep 0.5

clk=$(getconf CLK_TCK)
cpu_of() { awk -v c="$clk" -v f="${FIELD:-both}" '{ if (f=="user") print $14/c; else if (f=="sys") print $15/c; else print ($14+$15)/c }' "/proc/$1/stat"; }
# children_cpu sums the CPU of a process and its children (nginx/haproxy
# workers).
tree_cpu() {
	local total=0 p
	for p in $1 $(pgrep -P "$1" || true); do total=$(echo "$total + $(cpu_of "$p")" | bc -l); done
	echo "$total"
}

run() { # name pid
	local name=$1 pid=$2
	sleep 0.5
	wrk -t1 -c"$CONNS" -d2s "http://$PROXY/" >/dev/null # warm up
	local c0 u0; c0=$(tree_cpu "$pid"); u0=$(FIELD=user tree_cpu "$pid")
	taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "http://$PROXY/" > "$work/$name.wrk"
	local c1 u1; c1=$(tree_cpu "$pid"); u1=$(FIELD=user tree_cpu "$pid")
	local reqs rps p99 non2xx
	reqs=$(awk '/requests in/ {print $1}' "$work/$name.wrk")
	rps=$(awk '/Requests\/sec/ {print $2}' "$work/$name.wrk")
	p99=$(awk '$1=="99%" {print $2}' "$work/$name.wrk")
	non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$name.wrk"); non2xx=${non2xx:-0}
	local us uus; us=$(echo "($c1 - $c0) * 1000000 / $reqs" | bc -l); uus=$(echo "($u1 - $u0) * 1000000 / $reqs" | bc -l)
	printf '%-8s %10s req/s  p99 %8s  cpu/req %6.2f us (user %5.2f)  non-2xx %s\n' "$name" "$rps" "$p99" "$us" "$uus" "$non2xx"
	echo "$name $rps $p99 $us" >> "$work/summary"
	kill "$pid"; wait "$pid" 2>/dev/null || true
	sleep 0.5
}

# edgelb
cat > "$work/edgelb.yaml" <<CONF
listen: $PROXY
admin: 127.0.0.1:18999
state_dir: $work/state
services:
  web: {static: [$ORIGIN]}
routes: [{service: web}]
CONF
GOMAXPROCS=1 taskset -c 0 ./bin/edgelb -config "$work/edgelb.yaml" -log-level warn & run edgelb $!

# nginx: one worker, upstream keepalive.
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream origin { server $ORIGIN; keepalive 128; }
  server { listen $PROXY; location / { proxy_pass http://origin; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
taskset -c 0 nginx -c "$work/nginx.conf" -e stderr & run nginx $!

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
  bind $PROXY
  default_backend be
backend be
  http-reuse always
  server o1 $ORIGIN
CONF
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & run haproxy $!

awk '
{ rps[$1]=$2; p99[$1]=$3; cpu[$1]=$4 }
END {
  printf "\nedgelb / nginx:   cpu per request %.2fx, rps %.2fx\n", cpu["edgelb"]/cpu["nginx"], rps["edgelb"]/rps["nginx"]
  printf "edgelb / haproxy: cpu per request %.2fx, rps %.2fx\n", cpu["edgelb"]/cpu["haproxy"], rps["edgelb"]/rps["haproxy"]
}' "$work/summary"
