// The pages. Each page is render(root, params) → optional { onEvent(kind, data), dispose() }.
// DOM is built with h() (text nodes only, never innerHTML with data). Charts are uPlot
// instances kept in window.wmCharts by name, so the browser test can read their data.
import { api, can, hasSecondFactor } from './api.js';
import { t } from './i18n.js';

/* global uPlot */

window.wmCharts = window.wmCharts || {};

/** Builds an element: h('td', {class: 'num'}, 'text', child...). */
export function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

const card = (title, ...kids) => h('div', { class: 'card' }, h('h3', {}, title), ...kids);
const badge = (s, label) => h('span', { class: `badge ${s}` }, t(label || s));
const fmtTime = (s) => (s ? new Date(s).toLocaleString() : '');
const num = (v, d = 2) => (v === null || v === undefined ? '' : Number(v).toFixed(d));

function table(cols, rows) {
  return h('div', { class: 'scroll' }, h('table', {},
    h('thead', {}, h('tr', {}, cols.map((c) => h('th', { class: c.num ? 'num' : undefined }, c.label)))),
    h('tbody', {}, rows)));
}

function message(root, e) {
  root.append(h('p', { class: 'error' }, e.status === 403 ? t('forbidden') : e.message));
}

function makeChart(name, el, opts, data) {
  const old = window.wmCharts[name];
  if (old) old.destroy();
  const width = Math.max(320, (el.clientWidth || 800) - 8);
  const u = new uPlot({ width, height: 260, ...opts }, data, el);
  window.wmCharts[name] = u;
  return u;
}

function destroyCharts() {
  for (const [k, u] of Object.entries(window.wmCharts)) {
    u.destroy();
    delete window.wmCharts[k];
  }
}

const countsTable = (list) => table(
  [{ label: '' }, { label: t('meters'), num: true }],
  list.map((c) => h('tr', {}, h('td', {}, t(c.key)), h('td', { class: 'num' }, c.count))),
);

// --- fleet overview -----------------------------------------------------------------------
async function fleet(root) {
  const [s, gws] = await Promise.all([api('/fleet/summary'), api('/gateways')]);
  const get = (list, k) => (list.find((c) => c.key === k) || { count: 0 }).count;
  const alarms = s.open_alarms.reduce((a, c) => a + c.count, 0);
  root.append(h('div', { class: 'kpis' },
    kpi('kpi-meters', t('meters_total'), s.meters),
    kpi('kpi-ok', t('comm_health') + ' · ' + t('ok'), get(s.comm_health, 'ok')),
    kpi('kpi-gw-online', t('gateways_online'), get(s.gateways, 'online')),
    kpi('kpi-gw-offline', t('gateways_offline'), get(s.gateways, 'offline')),
    kpi('kpi-alarms', t('open_alarms'), alarms)));
  const seenEl = h('div', { class: 'chart' });
  root.append(h('div', { class: 'grid' },
    card(t('by_status'), countsTable(s.by_status.filter((c) => c.count > 0))),
    card(t('by_protocol'), countsTable(s.by_protocol)),
    card(t('comm_health'), countsTable(s.comm_health)),
    card(t('signal'), s.signal.some((c) => c.count) ? countsTable(s.signal) : h('p', { class: 'muted' }, t('no_data')))));
  root.append(card(t('last_seen'), seenEl));
  const labels = s.last_seen.map((c) => t(c.key));
  makeChart('lastSeen', seenEl, {
    height: 200,
    scales: { x: { time: false, range: [-0.5, labels.length - 0.5] } },
    axes: [{ values: (u, ticks) => ticks.map((i) => labels[i] || ''), splits: () => labels.map((_, i) => i) }, {}],
    series: [{}, { label: t('meters'), fill: '#0d4f8b88', stroke: '#0d4f8b', paths: uPlot.paths.bars({ size: [0.6, 60] }), points: { show: false } }],
    legend: { show: false },
  }, [s.last_seen.map((_, i) => i), s.last_seen.map((c) => c.count)]);
  root.append(card(t('gateways'), table(
    [{ label: t('gateways') }, { label: t('state') }, { label: t('last_seen') }, { label: t('firmware') },
      { label: t('meters'), num: true }, { label: t('spool_depth'), num: true }, { label: t('uplink_lag'), num: true },
      { label: t('health_at') }],
    gws.map((g) => h('tr', { dataset: { gateway: g.gateway_id } },
      h('td', {}, g.gateway_id),
      h('td', {}, badge(g.online === true ? 'online' : g.online === false ? 'offline' : 'unknown')),
      h('td', {}, fmtTime(g.last_seen)), h('td', {}, g.firmware || ''),
      h('td', { class: 'num' }, g.meters),
      h('td', { class: 'num' }, g.spool_depth ?? '–'), h('td', { class: 'num' }, g.uplink_lag_s === null ? '–' : num(g.uplink_lag_s, 1)),
      h('td', {}, fmtTime(g.health_at)))),
  )));
  return { onEvent: (kind) => (kind === 'gateway' || kind === 'alarm') && 'reload' };
}

function kpi(id, label, value) {
  return h('div', { class: 'kpi', id }, h('div', { class: 'v', dataset: { value } }, value), h('div', { class: 'k' }, label));
}

// --- alarms --------------------------------------------------------------------------------
async function alarms(root, params) {
  const f = { state: params.get('state') || '', severity: params.get('severity') || '', kind: params.get('kind') || '' };
  const list = h('div');
  const sel = (name, opts) => h('select', { name, onchange: (e) => { f[name] = e.target.value; load(); } },
    opts.map((o) => { const op = h('option', { value: o }, o ? t(o) : t('all')); if (o === f[name]) op.selected = true; return op; }));
  const kindIn = h('input', { name: 'kind', placeholder: t('kind'), value: f.kind, onchange: (e) => { f.kind = e.target.value.trim(); load(); } });
  root.append(card(t('alarms'),
    h('div', { class: 'filters' }, t('filter'), sel('state', ['', 'open', 'acknowledged', 'closed']),
      sel('severity', ['', 'critical', 'warning', 'info']), kindIn),
    list));
  const writable = can('alarms_write');
  async function act(id, what) {
    try {
      await api(`/alarms/${id}/${what}`, { method: 'POST', body: { note: 'dashboard' } });
    } catch (e) { alert(e.message); }
    await load();
  }
  async function load() {
    const q = new URLSearchParams({ limit: '200' });
    for (const [k, v] of Object.entries(f)) if (v) q.set(k, v);
    const page = await api(`/alarms?${q}`);
    list.replaceChildren(table(
      [{ label: 'ID' }, { label: t('meter') }, { label: t('kind') }, { label: t('severity') }, { label: t('state') },
        { label: t('raised_at') }, { label: t('occurrences'), num: true }, { label: '' }],
      page.items.map((a) => h('tr', { dataset: { alarmId: a.alarm_id, state: a.state } },
        h('td', {}, a.alarm_id),
        h('td', {}, h('a', { href: `#/meter/${encodeURIComponent(a.meter_id)}` }, a.meter_id)),
        h('td', {}, a.kind), h('td', {}, badge(a.severity)), h('td', { class: 'state' }, badge(a.state)),
        h('td', {}, fmtTime(a.raised_at)), h('td', { class: 'num' }, a.occurrences),
        h('td', {},
          writable && a.state === 'open' ? h('button', { class: 'btn small ack', onclick: () => act(a.alarm_id, 'ack') }, t('acknowledge')) : null,
          ' ',
          writable && a.state !== 'closed' ? h('button', { class: 'btn small warn close', onclick: () => act(a.alarm_id, 'close') }, t('close')) : null))),
    ));
    if (!page.items.length) list.append(h('p', { class: 'muted' }, t('no_data')));
  }
  await load();
  return { onEvent: (kind) => { if (kind === 'alarm') load(); } };
}

// --- meter page ----------------------------------------------------------------------------
async function meter(root, params, arg) {
  let id = arg;
  if (!id) {
    const first = await api('/meters?status=active&limit=1');
    id = first.items.length ? first.items[0].meter_id : '';
  }
  let res = params.get('res') === 'daily' ? 'daily' : 'hourly';
  const input = h('input', { name: 'meter', value: id, placeholder: t('meter_id') });
  const go = () => { location.hash = `#/meter/${encodeURIComponent(input.value.trim())}?res=${res}`; };
  const resSel = h('select', { name: 'res', onchange: (e) => { res = e.target.value; go(); } },
    ['hourly', 'daily'].map((r) => { const o = h('option', { value: r }, t(r)); if (r === res) o.selected = true; return o; }));
  root.append(h('div', { class: 'card filters' }, input, h('button', { class: 'btn', onclick: go }, t('show')), resSel));
  if (!id) { root.append(h('p', { class: 'muted' }, t('no_data'))); return {}; }
  const m = await api(`/meters/${encodeURIComponent(id)}`);
  const consEl = h('div', { class: 'chart', id: 'chart-consumption' });
  const regEl = h('div', { class: 'chart', id: 'chart-register' });
  const tl = h('ul', { class: 'timeline' });
  const reg = h('table', { class: 'kv' });
  root.append(card(`${t('consumption')} · ${m.meter_no || m.meter_id}`, consEl));
  root.append(card(t('register'), regEl));
  root.append(h('div', { class: 'grid' }, card(t('timeline'), tl), card(t('registry'), reg)));
  for (const [k, v] of Object.entries(m)) {
    if (v === null || typeof v === 'object') continue;
    reg.append(h('tr', {}, h('td', {}, k), h('td', {}, String(v))));
  }
  const days = res === 'daily' ? 60 : 7;
  const from = new Date(Date.now() - days * 86400e3).toISOString();
  const key = encodeURIComponent(m.meter_id);
  const [roll, raw] = await Promise.all([
    api(`/meters/${key}/readings?resolution=${res}&from=${from}&limit=1000`),
    api(`/meters/${key}/readings?resolution=raw&quantity=volume&from=${from}&limit=1000`),
  ]);
  const rows = roll.items.slice().sort((a, b) => a.ts.localeCompare(b.ts));
  const xs = rows.map((r) => Date.parse(r.ts) / 1000);
  makeChart('consumption', consEl, {
    series: [{},
      { label: t('consumption'), stroke: '#0d4f8b', fill: '#0d4f8b55', paths: uPlot.paths.bars({ size: [0.8, 40] }), points: { show: false } },
      { label: t('estimated'), stroke: '#d97706', fill: '#d97706', paths: () => null, points: { show: true, size: 9, fill: '#d97706' } }],
  }, [xs, rows.map((r) => Number(r.value)), rows.map((r) => (r.quality === 'estimated' ? Number(r.value) : null))]);
  const reads = raw.items.slice().sort((a, b) => a.ts.localeCompare(b.ts));
  makeChart('register', regEl, {
    axes: [{}, { size: 70 }],
    series: [{},
      { label: t('validated'), stroke: '#1e7a43', spanGaps: true, points: { show: true, size: 4 } },
      { label: t('estimated'), stroke: '#d97706', paths: () => null, points: { show: true, size: 8, fill: '#d97706' } },
      { label: t('rejected'), stroke: '#b42318', paths: () => null, points: { show: true, size: 9, fill: '#b42318' } }],
  }, [reads.map((r) => Date.parse(r.ts) / 1000),
    reads.map((r) => (r.quality === 'rejected' || r.quality === 'estimated' ? null : Number(r.value))),
    reads.map((r) => (r.quality === 'estimated' ? Number(r.value) : null)),
    reads.map((r) => (r.quality === 'rejected' ? Number(r.value) : null))]);
  const events = [];
  if (can('alarms_read')) {
    const a = await api(`/alarms?meter=${key}&limit=50`);
    for (const x of a.items) events.push({ at: x.raised_at, text: `${t('alarm')} ${x.kind} · ${t(x.severity)}`, state: x.state });
  }
  if (can('commands_read')) {
    const c = await api(`/meters/${key}/commands?limit=50`);
    for (const x of c.items) events.push({ at: x.issued_at, text: `${t('command')} ${x.action_type} · ${x.issued_by}`, state: x.state });
  }
  events.sort((a, b) => b.at.localeCompare(a.at));
  tl.replaceChildren(...events.map((e) => h('li', {}, h('span', { class: 'muted' }, fmtTime(e.at)), ' ', e.text, ' ', badge(e.state))));
  if (!events.length) tl.append(h('li', { class: 'muted' }, t('no_data')));
  return {};
}

// --- DMA balance ---------------------------------------------------------------------------
async function dma(root) {
  const list = await api('/dma/balance?days=30');
  if (!list.length) root.append(h('p', { class: 'muted' }, t('no_data')));
  for (const d of list) {
    const el = h('div', { class: 'chart' });
    root.append(card(`${d.dma} · ${d.customer_meters} ${t('customer_meters')}`, el));
    // A rollup day is a local day: place it at local midnight.
    const xs = d.days.map((x) => { const [y, m, dd] = x.day.split('-').map(Number); return new Date(y, m - 1, dd).getTime() / 1000; });
    makeChart(`dma:${d.dma}`, el, {
      scales: { pct: { range: [0, 100] } },
      axes: [{}, { label: 'm³' }, { side: 1, scale: 'pct', label: '%', grid: { show: false } }],
      series: [{},
        { label: t('inflow'), stroke: '#0d4f8b', width: 2 },
        { label: t('metered'), stroke: '#1e7a43', width: 2 },
        { label: t('billed_est'), stroke: '#d97706' },
        { label: `${t('loss_share')} %`, stroke: '#b42318', scale: 'pct', dash: [6, 4], width: 2 }],
    }, [xs, d.days.map((x) => x.inflow), d.days.map((x) => x.metered), d.days.map((x) => x.estimated),
      d.days.map((x) => (x.loss_share === null ? null : x.loss_share * 100))]);
  }
  return {};
}

// --- hydrants ------------------------------------------------------------------------------
async function hydrants(root) {
  const list = await api('/hydrants');
  const writable = can('commands_write');
  const mfa = hasSecondFactor();
  const planEl = h('div', { class: 'chart', id: 'chart-plan' });
  root.append(card(t('plan'), planEl));
  const placed = list.filter((x) => x.latitude !== null && x.longitude !== null)
    .sort((a, b) => a.longitude - b.longitude);
  if (placed.length) {
    makeChart('plan', planEl, {
      height: 320,
      scales: { x: { time: false } },
      axes: [{ label: 'lon' }, { label: 'lat' }],
      series: [{},
        { label: t('locked_state'), stroke: '#1e7a43', paths: () => null, points: { show: true, size: 12, fill: '#1e7a43' } },
        { label: t('unlocked_state'), stroke: '#b42318', paths: () => null, points: { show: true, size: 12, fill: '#b42318' } }],
    }, [placed.map((x) => x.longitude),
      placed.map((x) => (x.outlet === 'open' ? null : x.latitude)),
      placed.map((x) => (x.outlet === 'open' ? x.latitude : null))]);
  } else {
    planEl.append(h('p', { class: 'muted' }, t('no_data')));
  }
  const status = h('p', { class: 'error' });
  async function unlock(x) {
    try {
      await api(`/hydrants/${encodeURIComponent(x.meter_id)}/unlock`, { method: 'POST', body: {} });
      status.textContent = `${t('unlock')} ${x.meter_no || x.meter_id}: ${t('queued')}`;
    } catch (e) { status.textContent = e.message; }
  }
  async function lock(x) {
    try {
      await api('/commands', { method: 'POST', body: { id: `ui-lock-${x.meter_id}-${Date.now()}`, device: x.meter_id, action: 'hydrant_lock', reason: 'dashboard' } });
      status.textContent = `${t('lock')} ${x.meter_no || x.meter_id}: ${t('queued')}`;
    } catch (e) { status.textContent = e.message; }
  }
  root.append(card(t('hydrants'), status, table(
    [{ label: t('hydrants') }, { label: t('outlet') }, { label: t('pressure'), num: true }, { label: t('last_seen') },
      { label: t('open_alarms'), num: true }, { label: t('permits') }, { label: '' }],
    list.map((x) => h('tr', { dataset: { hydrant: x.meter_id } },
      h('td', {}, x.meter_no || x.meter_id, h('div', { class: 'muted' }, x.address || '')),
      h('td', {}, x.outlet ? (x.outlet === 'open' ? badge('open', 'unlocked_state') : badge('closed', 'locked_state')) : '–'),
      h('td', { class: 'num' }, x.pressure_bar === null ? '–' : num(x.pressure_bar, 2)),
      h('td', {}, fmtTime(x.reported_at)),
      h('td', { class: 'num' }, x.open_alarms),
      h('td', {}, x.permits.map((p) => h('div', {}, `${p.permit_id} · ${p.holder} · ${fmtTime(p.valid_from)}–${fmtTime(p.valid_to)} `, p.active ? badge('ok', 'permit_active') : ''))),
      h('td', {},
        writable ? h('button', { class: 'btn small unlock', disabled: !mfa, title: mfa ? undefined : t('needs_otp'), onclick: () => unlock(x) }, t('unlock')) : null,
        ' ',
        writable ? h('button', { class: 'btn small warn lock', onclick: () => lock(x) }, t('lock')) : null))),
  )));
  return { onEvent: (kind) => kind === 'command' && 'reload' };
}

// --- commands ------------------------------------------------------------------------------
async function commands(root, params) {
  const f = { state: params.get('state') || '', action: params.get('action') || '', device: params.get('device') || '' };
  const list = h('div');
  const states = ['', 'queued', 'sent', 'delivered', 'acknowledged', 'confirmed', 'failed', 'expired', 'cancelled', 'superseded'];
  const stateSel = h('select', { name: 'state', onchange: (e) => { f.state = e.target.value; load(); } },
    states.map((o) => { const op = h('option', { value: o }, o ? t(o) : t('all')); if (o === f.state) op.selected = true; return op; }));
  const inp = (name) => h('input', { name, placeholder: t(name), value: f[name], onchange: (e) => { f[name] = e.target.value.trim(); load(); } });
  root.append(card(t('commands'), h('div', { class: 'filters' }, t('filter'), stateSel, inp('action'), inp('device')), list));
  async function load() {
    const q = new URLSearchParams({ limit: '200' });
    for (const [k, v] of Object.entries(f)) if (v) q.set(k, v);
    const page = await api(`/commands?${q}`);
    list.replaceChildren(table(
      [{ label: t('command') }, { label: t('device') }, { label: t('action') }, { label: t('state') },
        { label: t('issued_by') }, { label: t('issued_at') }, { label: t('updated_at') }, { label: t('reason') }],
      page.items.map((c) => h('tr', { dataset: { command: c.id } },
        h('td', {}, c.id), h('td', {}, h('a', { href: `#/meter/${encodeURIComponent(c.device)}` }, c.device)),
        h('td', {}, c.action_type), h('td', {}, badge(c.state)), h('td', {}, c.issued_by),
        h('td', {}, fmtTime(c.issued_at)), h('td', {}, fmtTime(c.updated_at)), h('td', {}, c.reason))),
    ));
    if (!page.items.length) list.append(h('p', { class: 'muted' }, t('no_data')));
  }
  await load();
  return { onEvent: (kind) => { if (kind === 'command') load(); } };
}

// --- bill runs -----------------------------------------------------------------------------
async function bills(root) {
  const list = h('div');
  root.append(card(t('bills'), list));
  let timer = null;
  async function load() {
    const page = await api('/bill-runs?limit=100');
    list.replaceChildren(table(
      [{ label: t('run') }, { label: t('book') }, { label: t('period') }, { label: t('progress') },
        { label: t('created'), num: true }, { label: t('adjusted'), num: true }, { label: t('unchanged'), num: true },
        { label: t('skipped'), num: true }, { label: t('started_at') }, { label: t('finished_at') }],
      page.items.map((r) => h('tr', { dataset: { run: r.run_id } },
        h('td', {}, r.run_id), h('td', {}, r.book), h('td', {}, `${r.period_start} – ${r.period_end}`),
        h('td', {}, h('progress', { max: '1', value: String(r.progress) }), ` ${Math.round(r.progress * 100)}%`),
        h('td', { class: 'num' }, r.created), h('td', { class: 'num' }, r.adjusted), h('td', { class: 'num' }, r.unchanged),
        h('td', { class: 'num' }, r.skipped), h('td', {}, fmtTime(r.started_at)),
        h('td', {}, r.finished_at ? fmtTime(r.finished_at) : badge('queued')))),
    ));
    if (!page.items.length) list.append(h('p', { class: 'muted' }, t('no_data')));
    clearTimeout(timer);
    if (page.items.some((r) => !r.finished_at)) timer = setTimeout(load, 3000);
  }
  await load();
  return { dispose: () => clearTimeout(timer) };
}

/** name → { render, allowed: RBAC set name }. */
export const PAGES = {
  fleet: { render: fleet, allowed: 'dashboard' },
  alarms: { render: alarms, allowed: 'alarms_read' },
  meter: { render: meter, allowed: 'readings' },
  dma: { render: dma, allowed: 'dashboard' },
  hydrants: { render: hydrants, allowed: 'commands_read' },
  commands: { render: commands, allowed: 'commands_read' },
  bills: { render: bills, allowed: 'bills_read' },
};

export { destroyCharts, message };
