// The dashboard shell: login, hash routing (#/page/arg?query), the language switch, the live
// event stream, and which pages a role sees.
import { claims, can, login, logout, followEvents, ApiError } from './api.js';
import { t, setLang, currentLang, applyLabels } from './i18n.js';
import { PAGES, destroyCharts, message } from './pages.js';

const $ = (id) => document.getElementById(id);
let current = null;       // { name, handle }
let stopEvents = null;
let reloadTimer = null;

function showLogin() {
  if (stopEvents) { stopEvents(); stopEvents = null; }
  destroyCharts();
  $('page').replaceChildren();
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('who').textContent = '';
  $('login').hidden = false;
}

function showApp() {
  const c = claims();
  $('login').hidden = true;
  $('nav').hidden = false;
  $('logout').hidden = false;
  $('who').textContent = `${c.sub} · ${(c.roles || []).join(',')}`;
  for (const a of document.querySelectorAll('#nav a')) {
    a.hidden = !can(PAGES[a.dataset.page].allowed);
  }
  if (!stopEvents) {
    stopEvents = followEvents(onEvent, (on) => {
      const el = $('live');
      el.className = `live ${on ? 'on' : 'off'}`;
      el.dataset.i18n = on ? 'live' : 'disconnected';
      el.textContent = t(el.dataset.i18n);
    });
  }
  route();
}

function onEvent(kind, data) {
  window.dispatchEvent(new CustomEvent('wm-event', { detail: { kind, data } }));
  if (!current || !current.handle || !current.handle.onEvent) return;
  if (kind === 'resync' || current.handle.onEvent(kind, data) === 'reload') {
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(route, 500);
  }
}

async function route() {
  if (!claims()) { showLogin(); return; }
  const hash = location.hash.replace(/^#\/?/, '');
  const [path, query] = hash.split('?');
  const [name0, ...rest] = path.split('/');
  let name = PAGES[name0] ? name0 : 'fleet';
  if (!can(PAGES[name].allowed)) name = Object.keys(PAGES).find((p) => can(PAGES[p].allowed)) || 'meter';
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('current', a.dataset.page === name);
  if (current && current.handle && current.handle.dispose) current.handle.dispose();
  destroyCharts();
  const root = $('page');
  root.replaceChildren();
  root.dataset.page = name;
  root.dataset.ready = 'false';
  current = { name, handle: null };
  try {
    const handle = await PAGES[name].render(root, new URLSearchParams(query || ''), decodeURIComponent(rest.join('/')));
    if (current.name === name) current.handle = handle || {};
  } catch (e) {
    message(root, e instanceof ApiError ? e : { message: String(e) });
  }
  root.dataset.ready = 'true';
}

$('login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  $('login-error').textContent = '';
  try {
    await login(f.get('username'), f.get('password'), f.get('otp'));
    ev.target.reset();
    showApp();
  } catch (e) {
    $('login-error').textContent = e.status === 429 ? t('too_many') : t('login_failed');
  }
});
$('logout').addEventListener('click', () => { logout(); showLogin(); });
$('lang').addEventListener('click', () => { setLang(currentLang() === 'zh' ? 'en' : 'zh'); if (claims()) route(); });
window.addEventListener('hashchange', route);
window.addEventListener('wm-logout', showLogin);

setLang(currentLang());
applyLabels();
if (claims()) showApp(); else showLogin();
