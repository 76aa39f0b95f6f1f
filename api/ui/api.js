// The API's own auth and endpoints: the login token is kept in sessionStorage, every call
// sends it as a bearer header, and the live stream is read with fetch (EventSource cannot send
// headers). Role checks here only hide buttons; the server enforces every rule.

const KEY = 'wm.token';

/** Role sets, mirroring api/src/rbac.rs. */
export const RBAC = {
  alarms_read: ['meter_operator', 'meter_admin', 'auditor'],
  alarms_write: ['meter_operator', 'meter_admin'],
  commands_read: ['meter_operator', 'meter_admin', 'billing', 'auditor'],
  commands_write: ['meter_operator', 'meter_admin'],
  bills_read: ['billing', 'auditor'],
  dashboard: ['meter_operator', 'meter_admin', 'meter_reader', 'billing', 'auditor'],
  readings: ['meter_operator', 'meter_admin', 'meter_reader', 'billing', 'auditor', 'integration'],
};

/** An API error with its problem+json body. */
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && problem.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = problem && problem.code;
  }
}

export function token() { return sessionStorage.getItem(KEY); }

/** The token's claims (not verified here: the server does that on every call). */
export function claims() {
  const tok = token();
  if (!tok) return null;
  try {
    const b64 = tok.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(Array.from(atob(b64), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''));
    const c = JSON.parse(json);
    if (c.exp && c.exp * 1000 < Date.now()) return null;
    return c;
  } catch (_) {
    return null;
  }
}

/** Whether the logged-in role is in the set `name` of RBAC. */
export function can(name) {
  const c = claims();
  return !!c && (c.roles || []).some((r) => RBAC[name].includes(r));
}

/** Whether the login carried a second factor (needed for unlock and valve commands). */
export function hasSecondFactor() {
  const c = claims();
  return !!c && (c.amr || []).some((m) => m === 'otp' || m === 'mfa');
}

export async function login(username, password, otp) {
  const body = { username, password };
  if (otp) body.otp = otp;
  const r = await fetch('/api/v1/auth/login', {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  const v = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, v);
  sessionStorage.setItem(KEY, v.token);
  return v;
}

export function logout() { sessionStorage.removeItem(KEY); }

/** GET (or another method with a JSON body) under /api/v1. */
export async function api(path, { method = 'GET', body } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(`/api/v1${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const v = await r.json().catch(() => null);
  if (r.status === 401) {
    logout();
    window.dispatchEvent(new Event('wm-logout'));
  }
  if (!r.ok) throw new ApiError(r.status, v);
  return v;
}

/**
 * Follows GET /api/v1/events: calls onEvent(kind, data) per event and onState(connected).
 * Reconnects after the server closes the stream (max_s) or an error, while logged in.
 */
export function followEvents(onEvent, onState) {
  let stopped = false;
  let ctrl = null;
  async function run() {
    while (!stopped && token()) {
      ctrl = new AbortController();
      try {
        const r = await fetch('/api/v1/events?max_s=600', {
          headers: { Authorization: `Bearer ${token()}`, Accept: 'text/event-stream' },
          signal: ctrl.signal,
        });
        if (!r.ok) throw new ApiError(r.status, null);
        onState(true);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            let kind = 'message';
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) kind = line.slice(6).trim();
              else if (line.startsWith('data:')) data += line.slice(5).trim();
            }
            if (data) {
              try { onEvent(kind, JSON.parse(data)); } catch (_) { /* not JSON: ignore */ }
            }
          }
        }
      } catch (e) {
        if (e.status === 401) { stopped = true; break; }
      }
      onState(false);
      if (!stopped) await new Promise((res) => setTimeout(res, 2000));
    }
  }
  run();
  return () => { stopped = true; if (ctrl) ctrl.abort(); };
}
