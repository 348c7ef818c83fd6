#!/usr/bin/env bash
# Side-by-side hot-path comparison: a proxied GET (keep-alive unless
# WRK_HEADER says otherwise) with a 64-byte body through edgelb, nginx and
# HAProxy, each pinned to CPU 0 with one worker; the origin and wrk share
# CPU 1. Reports requests/s, p99 and CPU
# time per request of the proxy process (from /proc/PID/stat).
#
# The three proxies run side by side on their own ports and wrk visits them
# in turn, ROUNDS times, each round starting with the next proxy: on a
# shared or virtual machine the noise drifts over seconds, and alternating
# short runs lets each round compare the proxies under the same conditions. The summary gives each proxy's median
# over the rounds and the median of the per-round ratios.
#
#   bench/hotpath-peers.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#
# WRK_HEADER, when set, is a header line wrk sends with every request:
# WRK_HEADER='Connection: close' measures one request per connection.
#
# ACCESS_LOG=1 measures what an access log costs: edgelb and nginx each run
# twice, without a log and with one written to a file (edgelb's JSON log;
# nginx's buffered like edgelb's, in a JSON format of the same fields), and
# HAProxy is left out. The summary then gives each one's CPU per request
# with the log over without it.
#
# REQUEST_ID=compare measures what request IDs cost: edgelb runs twice,
# with them (the default) and with request_id: false (edgelb-noid), beside
# nginx. REQUEST_ID=0 turns them off for every edgelb of the run.
#
# EDGELB_B='yaml' measures a configuration change: a second edgelb
# (edgelb-b) runs with these lines added to its configuration, beside
# edgelb and nginx, e.g. EDGELB_B='server: {batch_wait: 25us}'.
#
# PEERS_DEFERRED=1 has nginx and HAProxy accept a connection once its first
# bytes have come too (nginx `listen ... deferred`, HAProxy `defer-accept`),
# as edgelb does on Linux; by default they run as configured out of the box.
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
declare -A ADDR=([edgelb]=127.0.0.1:18900 [nginx]=127.0.0.1:18902 [haproxy]=127.0.0.1:18903
	[edgelb-log]=127.0.0.1:18904 [nginx-log]=127.0.0.1:18905 [edgelb-noid]=127.0.0.1:18906 [edgelb-b]=127.0.0.1:18907)
declare -A PID
NAMES=(edgelb nginx haproxy)
if [ "${ACCESS_LOG:-0}" = 1 ]; then NAMES=(edgelb edgelb-log nginx nginx-log); fi
if [ "${REQUEST_ID:-1}" = compare ]; then NAMES=(edgelb edgelb-noid nginx); fi
if [ -n "${EDGELB_B:-}" ]; then NAMES=(edgelb edgelb-b nginx); fi
has() { local n; for n in "${NAMES[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }
REQID=""
if [ "${REQUEST_ID:-1}" = 0 ]; then REQID="request_id: false"; fi
BODY=$(head -c 64 /dev/zero | tr '\0' 'x')
NGINX_DEFER="" HAPROXY_DEFER=""
if [ "${PEERS_DEFERRED:-0}" = 1 ]; then NGINX_DEFER=" deferred" HAPROXY_DEFER=" defer-accept"; fi

# Origin: nginx answering a fixed 64-byte body, on CPU 1.
cat > "$work/origin.conf" <<CONF
worker_processes 1; daemon off; pid $work/origin.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { default_type text/plain; return 200 "$BODY"; } } }
CONF
taskset -c 1 nginx -c "$work/origin.conf" -e stderr & pids+=($!)

# edgelb: the config any user starts from, one core; edgelb-log adds the
# access log.
start_edgelb() { # name admin-port extra-yaml
	cat > "$work/$1.yaml" <<CONF
listen: ${ADDR[$1]}
admin: 127.0.0.1:$2
state_dir: $work/state-$1
services:
  web: {static: [$ORIGIN]}
routes: [{service: web}]
$REQID
$3
CONF
	GOMAXPROCS=1 taskset -c 0 ./bin/edgelb -config "$work/$1.yaml" -log-level warn & PID[$1]=$!; pids+=($!)
}
start_edgelb edgelb 18999 ""
if has edgelb-log; then start_edgelb edgelb-log 18998 "access_log: {path: $work/edgelb-access.log, format: json}"; fi
if has edgelb-noid; then start_edgelb edgelb-noid 18997 "request_id: false"; fi
if has edgelb-b; then start_edgelb edgelb-b 18996 "$EDGELB_B"; fi

# nginx: one worker, upstream keepalive; nginx-log adds an access log
# buffered as edgelb's is (256 KiB, written every 100ms), with the fields
# of edgelb's JSON line that nginx has.
nginx_conf() { # name access-log-directive
	cat > "$work/$1.conf" <<CONF
worker_processes 1; daemon off; pid $work/$1.pid; error_log stderr error;
events { worker_connections 4096; }
http { keepalive_requests 1000000;
  log_format edge escape=json '{"time":"\$time_iso8601","request_id":"\$request_id","client":"\$remote_addr:\$remote_port",'
    '"method":"\$request_method","host":"\$host","uri":"\$request_uri","proto":"\$server_protocol","status":\$status,'
    '"bytes_in":\$request_length,"bytes_out":\$body_bytes_sent,"duration_s":\$request_time,'
    '"upstream":"\$upstream_addr","upstream_status":"\$upstream_status","upstream_s":"\$upstream_response_time"}';
  $2
  upstream origin { server $ORIGIN; keepalive 128; }
  server { listen ${ADDR[$1]}${NGINX_DEFER}; location / { proxy_pass http://origin; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
	taskset -c 0 nginx -c "$work/$1.conf" -e stderr & PID[$1]=$!; pids+=($!)
}
nginx_conf nginx "access_log off;"
if has nginx-log; then nginx_conf nginx-log "access_log $work/nginx-access.log edge buffer=256k flush=100ms;"; fi

# HAProxy: one thread, server-side keep-alive.
if has haproxy; then
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
  bind ${ADDR[haproxy]}${HAPROXY_DEFER}
  default_backend be
backend be
  http-reuse always
  server o1 $ORIGIN
CONF
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & PID[haproxy]=$!; pids+=($!)
fi
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

for name in "${NAMES[@]}"; do # warm up
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

# Each round starts with the next proxy, so that none always runs first
# (or right after the same one).
for r in $(seq 1 "$ROUNDS"); do
	for i in $(seq 0 $((${#NAMES[@]} - 1))); do
		run "$r" "${NAMES[$(((r - 1 + i) % ${#NAMES[@]}))]}"
	done
done

awk -v names="${NAMES[*]}" '
function median(a, n,   i, j, t) {
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ rps[$2, $1] = $3; p99[$2, $1] = $4; cpu[$2, $1] = $5; if ($1 > rounds) rounds = $1 }
END {
	printf "\nmedians over %d round(s):\n", rounds
	n = split(names, nms, " ")
	for (k = 1; k <= n; k++) {
		nm = nms[k]
		for (r = 1; r <= rounds; r++) { a[r] = cpu[nm, r]; b[r] = rps[nm, r]; c[r] = p99[nm, r] }
		printf "%-10s cpu/req %6.2f us  %9.0f req/s  p99 %6.0f us\n", nm, median(a, rounds), median(b, rounds), median(c, rounds)
	}
	# Ratios of the per-round figures: edgelb to each peer, and with an
	# access log to without.
	for (k = 1; k <= n; k++) {
		nm = nms[k]; base = ""
		if (nm == "edgelb") continue
		if (nm ~ /-log$/) { base = nm; sub(/-log$/, "", base) }
		if (nm == "edgelb-noid" || nm == "edgelb-b") base = nm
		if (nm == "edgelb-noid") { x = "edgelb"; y = nm } else if (nm == "edgelb-b") { x = nm; y = "edgelb" } else if (base != "") { x = nm; y = base } else { x = "edgelb"; y = nm }
		for (r = 1; r <= rounds; r++) { a[r] = cpu[x, r] / cpu[y, r]; b[r] = p99[x, r] / p99[y, r] }
		printf "%-10s / %-8s cpu per request %.2fx, p99 %.2fx (medians of the per-round ratios)\n", x, y, median(a, rounds), median(b, rounds)
	}
	if (names ~ /edgelb-b/) {
		for (r = 1; r <= rounds; r++) { a[r] = cpu["edgelb-b", r] / cpu["nginx", r]; b[r] = p99["edgelb-b", r] / p99["nginx", r] }
		printf "%-10s / %-8s cpu per request %.2fx, p99 %.2fx (medians of the per-round ratios)\n", "edgelb-b", "nginx", median(a, rounds), median(b, rounds)
	}
	if (names ~ /edgelb-log/ && names ~ /nginx-log/) {
		for (r = 1; r <= rounds; r++) { a[r] = cpu["edgelb-log", r] / cpu["nginx-log", r]; b[r] = p99["edgelb-log", r] / p99["nginx-log", r] }
		printf "%-10s / %-8s cpu per request %.2fx, p99 %.2fx (medians of the per-round ratios)\n", "edgelb-log", "nginx-log", median(a, rounds), median(b, rounds)
	}
}' "$work/summary"
if [ "${ACCESS_LOG:-0}" = 1 ]; then
	dropped=$(curl -s http://127.0.0.1:18998/metrics | awk '/^edgelb_access_log_dropped_total / {print $2}')
	printf '\naccess log lines: edgelb %s (%s dropped), nginx %s (last lines follow)\n' \
		"$(wc -l < "$work/edgelb-access.log")" "${dropped:-?}" "$(wc -l < "$work/nginx-access.log")"
	tail -n 1 "$work/edgelb-access.log" "$work/nginx-access.log"
fi
