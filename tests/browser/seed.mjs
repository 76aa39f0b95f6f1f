// Test data for the browser test, through the platform's own interfaces:
//   node seed.mjs registry          → the registry CSV on stdout (for `pipeline registry import`)
//   node seed.mjs push              → 3 days of hourly reads pushed to the API (IF-METER-004,
//                                     signed like any platform client); env BASE, CLIENT, SECRET
// The fleet: 2 DMAs, 60 CJ/T 188 and 20 M-Bus customer meters, one inlet meter per DMA, five
// hydrants with positions. Reads are made so the pipeline's own VEE and detectors produce
// estimated reads (a gap), rejected reads (a decrease, an impossible jump) and alarms (a leak,
// reverse flow, low hydrant pressure).
import { createHash, createHmac, randomBytes } from 'node:crypto';

const CUSTOMERS = 80;
const HOURS = 72;
const DMAS = 2;

export function meters() {
  const out = [];
  for (let i = 1; i <= CUSTOMERS; i++) {
    const mbus = i > 60;
    const d = i % DMAS;
    out.push({
      meter_no: `NA-${String(i).padStart(4, '0')}`,
      meter_id: mbus ? `mbus:WMS${String(i).padStart(8, '0')}` : `cjt188:783300000${String(i).padStart(5, '0')}`,
      protocol: mbus ? 'mbus' : 'cjt188',
      role: 'customer', dma: `DMA-${d}`, book: `BOOK-${d}`, area: d ? 'south' : 'north', gw: d ? 'gw-south' : 'gw-north',
      lat: '', lon: '', address: `南安市 ${d ? '南' : '北'}区 ${i} 号`,
    });
  }
  for (let d = 0; d < DMAS; d++) {
    out.push({
      meter_no: `IN-${d}`, meter_id: `cjt188:7833999990000${d}`, protocol: 'cjt188', role: 'inlet',
      dma: `DMA-${d}`, book: '', area: d ? 'south' : 'north', gw: d ? 'gw-south' : 'gw-north', lat: '', lon: '',
      address: `DMA-${d} 进水口`,
    });
  }
  for (let k = 1; k <= 5; k++) {
    out.push({
      meter_no: `HY-${k}`, meter_id: `hydrant:hyd-000${k}`, protocol: 'hydrant', role: 'hydrant', dma: '',
      book: '', area: 'north', gw: 'gw-north',
      lat: (24.95 + 0.004 * Math.sin(k * 1.7)).toFixed(6), lon: (118.58 + 0.006 * k).toFixed(6),
      address: `消火栓 ${k} 号`,
    });
  }
  return out;
}

function registryCsv() {
  const head = 'meter_no,meter_id,protocol,status,org,area,latitude,longitude,address,role,dma,meter_book,customer_class,gateway_id,q3,installed_at';
  const since = new Date(Date.now() - 30 * 86400e3).toISOString().replace(/\.\d+Z$/, 'Z');
  const rows = meters().map((m) => [m.meter_no, m.meter_id, m.protocol, 'active', 'nanan', m.area, m.lat, m.lon,
    `"${m.address}"`, m.role, m.dma, m.book, m.role === 'customer' ? 'residential' : '', m.gw, m.role === 'inlet' ? '40' : '', since].join(','));
  return [head, ...rows].join('\n') + '\n';
}

// Hourly use in m³ by local hour (UTC+8): dry at night, peaks morning and evening.
function use(i, hourLocal) {
  if (hourLocal >= 1 && hourLocal <= 4) return 0;
  const peak = hourLocal === 7 || hourLocal === 8 || hourLocal === 19 || hourLocal === 20 ? 3 : 1;
  return (0.006 + ((i * 7) % 10) * 0.001) * peak;
}

function reads() {
  const end = Math.floor(Date.now() / 3600e3) * 3600e3; // the current hour: nothing in the future
  const start = end - (HOURS - 1) * 3600e3;
  const perMeter = new Map();
  const all = meters();
  const inflow = new Array(HOURS).fill(0).map(() => [0, 0]);
  for (const [idx, m] of all.entries()) {
    if (m.role !== 'customer') continue;
    const i = idx + 1;
    let v = 100 + i * 3.5;
    const list = [];
    for (let hI = 0; hI < HOURS; hI++) {
      const ts = start + hI * 3600e3;
      const local = (new Date(ts).getUTCHours() + 8) % 24;
      let u = use(i, local);
      if (i === 3) u += 0.03; // a leak: flow every hour, night included
      v += u;
      inflow[hI][Number(m.dma.slice(4))] += u;
      if (i === 1 && hI >= 40 && hI < 46) continue; // a gap: VEE estimates it
      let value = v;
      if (i === 5 && hI === 60) value = v - 0.08; // a decrease: rejected, reverse flow
      if (i === 1 && hI === 56) value = v + 40; // an impossible jump: rejected
      list.push({ meter: m.meter_id, ts: new Date(ts).toISOString(), value: value.toFixed(3), unit: 'm3' });
    }
    if (m.protocol === 'cjt188') {
      // NB-IoT signal of the newest uplink.
      list.push({ meter: m.meter_id, ts: new Date(end).toISOString(), quantity: 'signal_rsrp', value: String(-88 - (i % 30)), unit: 'dBm' });
    }
    perMeter.set(m.meter_id, list);
  }
  // Inlet meters: the DMA's consumption plus 12–18 % losses.
  for (let d = 0; d < DMAS; d++) {
    const m = all.find((x) => x.role === 'inlet' && x.dma === `DMA-${d}`);
    let v = 5000;
    const list = [];
    for (let hI = 0; hI < HOURS; hI++) {
      v += inflow[hI][d] * (1.12 + 0.06 * d) + 0.02;
      list.push({ meter: m.meter_id, ts: new Date(start + hI * 3600e3).toISOString(), value: v.toFixed(3), unit: 'm3' });
    }
    perMeter.set(m.meter_id, list);
  }
  // Hydrants: pressure and outlet state; hydrant 2 is open, hydrant 4 has low pressure.
  for (const m of all.filter((x) => x.role === 'hydrant')) {
    const k = Number(m.meter_no.slice(3));
    const list = [];
    for (let hI = HOURS - 6; hI < HOURS; hI++) {
      const ts = new Date(start + hI * 3600e3).toISOString();
      list.push({ meter: m.meter_id, ts, quantity: 'pressure', value: (k === 4 ? 0.9 : 3.1 + 0.1 * k).toFixed(2), unit: 'bar' });
      list.push({ meter: m.meter_id, ts, quantity: 'outlet_state', value: k === 2 && hI >= HOURS - 2 ? '1' : '0', unit: '1' });
    }
    perMeter.set(m.meter_id, list);
  }
  return perMeter;
}

async function push() {
  const base = process.env.BASE;
  const client = process.env.CLIENT;
  const secret = process.env.SECRET;
  const batches = [];
  let cur = [];
  for (const list of reads().values()) {
    if (cur.length + list.length > 4000) { batches.push(cur); cur = []; }
    cur.push(...list);
  }
  if (cur.length) batches.push(cur);
  let total = 0;
  for (const items of batches) {
    const body = JSON.stringify({ reads: items });
    const ts = Math.floor(Date.now() / 1000);
    const nonce = randomBytes(12).toString('hex');
    const canonical = ['WM-HMAC-SHA256-V1', 'POST', '/api/v1/push', ts, nonce,
      createHash('sha256').update(body).digest('hex')].join('\n');
    const sig = createHmac('sha256', secret).update(canonical).digest('hex');
    const r = await fetch(`${base}/api/v1/push`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Client-Id': client, 'X-Timestamp': String(ts), 'X-Nonce': nonce, 'X-Signature': sig },
      body,
    });
    if (r.status !== 202) throw new Error(`push: ${r.status} ${await r.text()}`);
    total += items.length;
  }
  console.log(`pushed ${total} reads in ${batches.length} signed requests`);
}

if (process.argv[2] === 'registry') process.stdout.write(registryCsv());
else if (process.argv[2] === 'push') await push();
else { console.error('usage: node seed.mjs registry|push'); process.exit(2); }
