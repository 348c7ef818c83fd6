// edgelb status page: polls /status?rates=1 every second and shows it.
// Plain JavaScript, no libraries, nothing loaded from elsewhere.
'use strict';

const POLL_MS = 1000;
const KEEP = 300; // seconds of history kept, as the server does
const TOKEN_KEY = 'edgelb-admin-token';
const STATE_NAMES = { h: 'healthy', u: 'unhealthy', e: 'ejected', d: 'draining' };

// hist holds the per-second series, aligned with hist.times.
let hist = { startedAt: '', times: [], services: {} };
let last = null; // the last /status answer
let lastOK = 0; // when it came (ms)
let paused = false;
let timer = 0;
let polling = false; // a request is out: one at a time, so samples never double
const events = [];

// The admin token. Given once as #token=... it moves to sessionStorage
// (this tab, this origin) and leaves the address bar and history. It is
// only ever sent to this origin, in an Authorization header.
function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  history.replaceState(null, '', location.pathname + location.search);
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }

function adminGet(path) {
  const headers = {};
  if (token()) headers.Authorization = 'Bearer ' + token();
  // Relative paths: same origin only. No redirects, which could carry the
  // request elsewhere.
  return fetch(path, { headers, cache: 'no-store', credentials: 'omit', redirect: 'error', referrerPolicy: 'no-referrer' });
}

async function poll() {
  clearTimeout(timer);
  timer = 0;
  if (paused || polling) return;
  polling = true;
  try {
    if (await pollOnce()) schedule();
  } finally {
    polling = false;
  }
}

// pollOnce reads /status once and shows it; false when polling must wait
// for a token.
async function pollOnce() {
  const since = hist.times.length ? hist.times[hist.times.length - 1] : 0;
  try {
    const resp = await adminGet('status?rates=1&since=' + since);
    if (resp.status === 401) {
      showLogin((await resp.text()).replace(/^edgelb admin: /, ''));
      return false; // no more requests until a token is given
    }
    if (!resp.ok) throw new Error('/status answered ' + resp.status + ': ' + (await resp.text()).trim());
    const st = await resp.json();
    hideProblem();
    merge(st);
    last = st;
    lastOK = Date.now();
    render();
  } catch (err) {
    showProblem('Cannot read the admin API: ' + err.message + '. Retrying every second.');
  }
  return true;
}

function schedule() {
  if (!timer && !paused) timer = setTimeout(poll, POLL_MS);
}

// merge appends the new samples of st to history and notes state changes.
function merge(st) {
  // A new process (restarted edgelb) starts a new history.
  const fresh = !last || st.started_at !== hist.startedAt;
  if (fresh) {
    hist = { startedAt: st.started_at, times: [], services: {} };
    events.length = 0;
  }
  const n = st.samples.times.length;
  const oldTimes = hist.times;
  hist.times = oldTimes.concat(st.samples.times);
  const cut = Math.max(0, hist.times.length - KEEP);
  hist.times = hist.times.slice(cut);
  const services = {};
  for (const [name, svc] of Object.entries(st.services)) {
    const prev = hist.services[name] || { series: {}, backends: {} };
    const h = { series: extend(prev.series, svc.history, oldTimes.length, n, cut), backends: {} };
    for (const b of svc.backends) {
      const pb = prev.backends[b.addr] || { series: {} };
      h.backends[b.addr] = { series: extend(pb.series, b.history, oldTimes.length, n, cut) };
      if (fresh) eventsFromHistory(name, b.addr, b.history.states, st.samples.times);
    }
    services[name] = h;
  }
  hist.services = services;
  if (!fresh) noteChanges(last, st);
}

// extend appends the n new values of each series in add to those in old
// (which covers had samples; missing ones are null), then drops cut.
function extend(old, add, had, n, cut) {
  const out = {};
  for (const [key, vals] of Object.entries(add || {})) {
    let prev = old[key];
    if (typeof vals === 'string') {
      prev = prev !== undefined ? prev : '-'.repeat(had);
      out[key] = (prev + vals).slice(cut);
    } else {
      prev = prev !== undefined ? prev : new Array(had).fill(null);
      out[key] = prev.concat(vals).slice(cut);
    }
  }
  return out;
}

function eventsFromHistory(service, addr, states, times) {
  let prev = '';
  for (let i = 0; i < states.length; i++) {
    const c = states[i];
    if (c === '-') continue;
    if (prev && c !== prev) {
      events.push({ at: times[i], text: `${service} ${addr}: ${STATE_NAMES[prev]} → ${STATE_NAMES[c]}` });
    }
    prev = c;
  }
  events.sort((a, b) => a.at - b.at);
}

function noteChanges(before, now) {
  const at = Date.now();
  for (const [name, svc] of Object.entries(now.services)) {
    const old = before.services[name];
    if (!old) {
      events.push({ at, text: `${name}: service added` });
      continue;
    }
    if (svc.panic !== old.panic) {
      events.push({ at, text: `${name}: panic mode ${svc.panic ? 'entered (too few backends available: all get traffic)' : 'left'}`, bad: svc.panic });
    }
    const oldBackends = Object.fromEntries(old.backends.map(b => [b.addr, b]));
    for (const b of svc.backends) {
      const ob = oldBackends[b.addr];
      if (!ob) {
        events.push({ at, text: `${name} ${b.addr}: added, ${b.state}` });
      } else if (ob.state !== b.state || ob.since !== b.since) {
        events.push({ at, text: `${name} ${b.addr}: ${ob.state} → ${b.state}: ${b.reason}`, bad: b.state !== 'healthy' });
      }
      delete oldBackends[b.addr];
    }
    for (const addr of Object.keys(oldBackends)) events.push({ at, text: `${name} ${addr}: gone` });
  }
  for (const name of Object.keys(before.services)) {
    if (!now.services[name]) events.push({ at, text: `${name}: service removed` });
  }
  const oldDisc = Object.fromEntries((before.discovery || []).map(d => [d.source + '/' + (d.service || ''), d]));
  for (const d of now.discovery || []) {
    const od = oldDisc[d.source + '/' + (d.service || '')];
    if (od && od.stale !== d.stale) {
      events.push({ at, text: `discovery ${d.source} ${d.service || ''}: ${d.stale ? 'stale' + (d.last_error ? ': ' + d.last_error : '') : 'fresh again'}`, bad: d.stale });
    }
  }
  events.splice(0, Math.max(0, events.length - 200));
}

// ---- rendering ----

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function set(id, text) { document.getElementById(id).textContent = text; }

function render() {
  const st = last;
  set('version', st.version);
  const ready = document.getElementById('ready');
  ready.textContent = st.ready ? 'ready' : 'not ready';
  ready.className = 'badge ' + (st.ready ? 'ok' : 'bad');
  set('uptime', 'up ' + ago(parseTime(st.started_at)));
  renderServices(st);
  renderEvents();
  renderDiscovery(st);
  renderRoutes(st);
  renderUpdated();
}

function renderServices(st) {
  const box = document.getElementById('services');
  const names = Object.keys(st.services).sort();
  const keep = new Set(names);
  for (const sec of [...box.children]) if (!keep.has(sec.dataset.service)) sec.remove();
  names.forEach((name, i) => {
    let sec = box.querySelector(`section[data-service="${CSS.escape(name)}"]`);
    if (!sec) sec = newServiceSection(name);
    if (box.children[i] !== sec) box.insertBefore(sec, box.children[i] || null);
    fillService(sec, name, st.services[name]);
  });
  if (names.length === 0) box.replaceChildren(el('p', { class: 'muted' }, 'No services.'));
}

function newServiceSection(name) {
  const thead = el('thead', {}, el('tr', {},
    ...['backend', 'state', 'since', 'reason', 'in flight', 'req/s', 'failed/s', '5xx/s', 'mean', 'weight', 'last 5 minutes']
      .map(h => el('th', {}, h))));
  const spark = svgEl('svg', { class: 'spark', viewBox: `0 0 ${KEEP} 100`, preserveAspectRatio: 'none' });
  spark.append(svgEl('polyline', { class: 'requests' }), svgEl('polyline', { class: 'errors' }));
  return el('section', { class: 'service', 'data-service': name },
    el('h2', {}, el('span', {}, name), el('span', { class: 'muted source' }), el('span', { class: 'badge panic', hidden: true })),
    el('div', { class: 'kpis' }),
    spark,
    el('div', { class: 'legend' }, el('span', { class: 'requests' }, '— requests/s'), ' ', el('span', { class: 'errors' }, '— errors/s (generated by edgelb)'), el('span', { class: 'scale' })),
    el('table', { class: 'backends' }, thead, el('tbody')));
}

function fillService(sec, name, svc) {
  const r = svc.rates || {};
  sec.querySelector('.source').textContent = svc.source + (svc.updated_at ? ', updated ' + ago(parseTime(svc.updated_at)) + ' ago' : '');
  const panic = sec.querySelector('.badge.panic');
  panic.hidden = !svc.panic;
  panic.textContent = 'PANIC MODE' + (svc.panic_since ? ' for ' + ago(parseTime(svc.panic_since)) : '');
  panic.title = 'Too few backends are available, so every backend that is not draining or failing to answer gets traffic.';
  const inflight = svc.backends.reduce((n, b) => n + b.inflight, 0);
  const kpis = [
    ['requests/s', rate(r.requests_per_s)],
    ['errors/s', rate(r.errors_per_s), r.errors_per_s > 0],
    ['stale answers/s', rate(r.stale_per_s), r.stale_per_s > 0],
    ['retries/s', rate(r.retries_per_s)],
    ['p50', ms(r.p50_ms)], ['p90', ms(r.p90_ms)], ['p99', ms(r.p99_ms)],
    ['in flight', String(inflight)],
    ['available', `${svc.available} of ${svc.backends.length}`, svc.available < svc.backends.length],
    ['tunnels', String(svc.tunnels)],
  ];
  sec.querySelector('.kpis').replaceChildren(...kpis.map(([label, value, alert]) =>
    el('div', { class: 'kpi' + (alert ? ' alert' : '') }, el('b', {}, value), el('span', {}, label))));

  const h = (hist.services[name] || { series: {}, backends: {} });
  const max = drawSpark(sec.querySelector('svg.spark'), h.series.requests_per_s || [], h.series.errors_per_s || []);
  sec.querySelector('.scale').textContent = `  (top: ${rate(max)}/s)`;

  const tbody = sec.querySelector('tbody');
  const rows = {};
  for (const tr of tbody.children) rows[tr.dataset.backend] = tr;
  const order = svc.backends.map(b => b.addr);
  for (const [addr, tr] of Object.entries(rows)) if (!order.includes(addr)) tr.remove();
  svc.backends.forEach((b, i) => {
    let tr = rows[b.addr];
    if (!tr) tr = newBackendRow(b.addr);
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    fillBackend(tr, b, (h.backends[b.addr] || { series: {} }).series);
  });
}

function newBackendRow(addr) {
  const tl = svgEl('svg', { class: 'timeline', viewBox: `0 0 ${KEEP} 1`, preserveAspectRatio: 'none' });
  return el('tr', { 'data-backend': addr },
    el('td', { class: 'addr' }, addr), el('td', {}, el('span', { class: 'badge state' })),
    el('td', { class: 'since' }), el('td', { class: 'reason' }),
    el('td', { class: 'num inflight' }), el('td', { class: 'num req' }), el('td', { class: 'num fail' }),
    el('td', { class: 'num s5xx' }), el('td', { class: 'num mean' }), el('td', { class: 'num weight' }),
    el('td', {}, tl));
}

function fillBackend(tr, b, series) {
  const r = b.rates || {};
  tr.dataset.state = b.state;
  const badge = tr.querySelector('.badge.state');
  badge.textContent = b.state;
  badge.className = 'badge state state-' + b.state;
  const since = parseTime(b.since);
  const sinceTd = tr.querySelector('.since');
  sinceTd.textContent = ago(since) + ' ago';
  sinceTd.title = new Date(since).toLocaleString();
  tr.querySelector('.reason').textContent = b.reason;
  tr.querySelector('.inflight').textContent = String(b.inflight);
  tr.querySelector('.req').textContent = rate(r.requests_per_s);
  tr.querySelector('.fail').textContent = rate(r.failures_per_s);
  tr.querySelector('.s5xx').textContent = rate(r['5xx_per_s']);
  tr.querySelector('.mean').textContent = ms(r.mean_ms);
  tr.querySelector('.weight').textContent = String(b.weight) +
    (b.slow_start_percent !== undefined ? ` (slow start ${b.slow_start_percent}%)` : '') +
    (b.tunnels ? `, ${b.tunnels} tunnels` : '');
  drawTimeline(tr.querySelector('svg.timeline'), series.states || '');
}

// drawTimeline draws one rectangle per run of the same state, right-aligned
// so that the right edge is now.
function drawTimeline(svg, states) {
  const off = KEEP - states.length;
  const rects = [];
  for (let i = 0; i < states.length;) {
    let j = i;
    while (j < states.length && states[j] === states[i]) j++;
    if (states[i] !== '-') {
      const r = svgEl('rect', { class: states[i], x: off + i, y: 0, width: j - i, height: 1 });
      const t = svgEl('title');
      t.textContent = `${STATE_NAMES[states[i]]} ${timeOf(i)} – ${timeOf(j - 1)}`;
      r.append(t);
      rects.push(r);
    }
    i = j;
  }
  svg.replaceChildren(...rects);
}

function timeOf(i) {
  const t = hist.times[i];
  return t ? new Date(t).toLocaleTimeString() : '';
}

// drawSpark draws the requests and errors lines on a shared scale and
// returns its top.
function drawSpark(svg, requests, errors) {
  const max = Math.max(1, ...requests.filter(v => v !== null), ...errors.filter(v => v !== null));
  const points = vals => {
    const off = KEEP - vals.length;
    return vals.map((v, i) => v === null ? null : `${off + i},${(100 - v / max * 96).toFixed(1)}`).filter(p => p).join(' ');
  };
  svg.querySelector('.requests').setAttribute('points', points(requests));
  svg.querySelector('.errors').setAttribute('points', points(errors));
  return max;
}

function renderEvents() {
  const ol = document.getElementById('events');
  if (events.length === 0) return;
  ol.replaceChildren(...events.slice(-50).reverse().map(e =>
    el('li', { class: e.bad ? 'problems' : '' }, el('time', {}, new Date(e.at).toLocaleTimeString()), e.text)));
}

function renderDiscovery(st) {
  const rows = (st.discovery || []).map(d => {
    const data = d.from_disk ? 'stale, loaded from state_dir' : d.stale ? 'stale' : 'fresh';
    const err = d.last_error ? `${ago(parseTime(d.last_error_at))} ago: ${d.last_error}` : '';
    const problems = (d.problems || []).join('; ');
    return el('tr', { 'data-source': d.source, 'data-service': d.service || '' },
      el('td', {}, d.source), el('td', {}, d.service || '(all)'),
      el('td', { class: d.stale ? 'stale-data' : '' }, data),
      el('td', {}, d.last_update && !d.last_update.startsWith('0001') ? ago(parseTime(d.last_update)) + ' ago' : 'never'),
      el('td', { class: 'reason' }, [err, problems].filter(x => x).join(' — ')));
  });
  document.querySelector('#discovery tbody').replaceChildren(...rows);
}

function renderRoutes(st) {
  document.querySelector('#routes tbody').replaceChildren(...(st.routes || []).map(r =>
    el('tr', {}, el('td', {}, r.host), el('td', {}, r.path), el('td', {}, r.service))));
  document.getElementById('conflicts').replaceChildren(...(st.conflicts || []).map(c => el('li', {}, 'conflict: ' + c)));
}

function renderUpdated() {
  const age = lastOK ? Date.now() - lastOK : 0;
  const u = document.getElementById('updated');
  u.textContent = paused ? 'paused' : lastOK ? `updated ${(age / 1000).toFixed(0)}s ago` : 'loading…';
  u.className = age > 3 * POLL_MS && !paused ? 'stale-data' : 'muted';
}

// ---- formatting ----

function rate(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (v === 0) return '0';
  return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0);
}

function ms(v) {
  if (v === null || v === undefined) return '–';
  if (v >= 1000) return (v / 1000).toFixed(2) + ' s';
  return (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) + ' ms';
}

// parseTime reads a time of /status: RFC 3339 with up to nanoseconds, of
// which Date keeps milliseconds.
function parseTime(s) {
  return Date.parse(s.replace(/(\.\d{3})\d+/, '$1'));
}

function ago(t) {
  let s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 60) return s + 's';
  const units = [[86400, 'd'], [3600, 'h'], [60, 'm'], [1, 's']];
  const parts = [];
  for (const [n, u] of units) {
    if (s >= n && parts.length < 2) { parts.push(Math.floor(s / n) + u); s %= n; }
  }
  return parts.join(' ');
}

// ---- login, problems, controls ----

function showLogin(why) {
  document.getElementById('login').hidden = false;
  document.getElementById('main').hidden = true;
  document.getElementById('login-why').textContent = token()
    ? `The admin API refused the token (${why.trim()}). Enter the current admin_token.`
    : 'This admin API has an admin_token. Enter it to see the status; it is kept in this tab only and sent to this admin API only.';
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('forget').hidden = true;
  set('updated', 'waiting for the token');
  document.getElementById('token').focus();
}

function showProblem(text) {
  const p = document.getElementById('problem');
  p.textContent = text;
  p.hidden = false;
  renderUpdated();
}

function hideProblem() {
  document.getElementById('problem').hidden = true;
  document.getElementById('login').hidden = true;
  document.getElementById('main').hidden = false;
  document.getElementById('forget').hidden = !token();
}

document.addEventListener('DOMContentLoaded', () => {
  takeTokenFromFragment();
  document.getElementById('login-form').addEventListener('submit', ev => {
    ev.preventDefault();
    const input = document.getElementById('token');
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = '';
    set('updated', 'loading…');
    poll();
  });
  document.getElementById('forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  document.getElementById('pause').addEventListener('click', ev => {
    paused = !paused;
    ev.target.textContent = paused ? 'Resume' : 'Pause';
    if (paused) { clearTimeout(timer); timer = 0; } else poll();
    renderUpdated();
  });
  setInterval(() => { if (last) renderUpdated(); }, 1000);
  window.addEventListener('hashchange', () => { takeTokenFromFragment(); if (token()) poll(); });
  poll();
});
