// The muster dashboard: plain JavaScript, no framework, nothing loaded from elsewhere.
// Everything comes from this server's /api/v1 with the session cookie (and the CSRF token on
// every write); live updates arrive over /api/v1/events/ws. Pages are never polled.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const PAGE = 25;
  const JOB_STATES = ['waiting', 'running', 'succeeded', 'failed', 'aborted'];

  const RANK = { viewer: 1, operator: 2, admin: 3 };
  const SCOPE_OF = { viewer: 'read', operator: 'operate', admin: 'admin' };
  const LOG_TAIL = 64 * 1024; // what a log opens with (its end)
  const LOG_PAGE = 256 * 1024; // what "Load earlier" adds
  const LOG_KEEP = 512 * 1024; // what a followed log keeps on the page (characters)

  const st = {
    // Who the caller is (GET /api/v1/me): cluster admin, role by workspace, token scopes.
    user: null, admin: false, roles: new Map(), scopes: new Set(),
    events: null, eventsRetry: 500, eventsWanted: false, eventsEverOpen: false,
    view: null,
    jobs: { query: '', cursors: [null], idx: 0, next: null, ids: new Set() },
    nodes: new Map(),
    tree: null, // {id, root, jobs: Map(id -> job)}
    recent: [], // {tree, t}: when job/tree events arrived (a view loaded meanwhile reloads once)
    log: null, // {id, attempt, sock}
    refreshTimers: {},
  };

  // ---- helpers ------------------------------------------------------------------------------

  /** Builds an element; strings become text (never HTML), so nothing from the API is markup. */
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return e;
  }

  function badge(state) {
    const s = String(state || 'unknown');
    return el('span', { class: 'state state-' + s, text: s, dataset: { state: s } });
  }

  function setBadge(node, state) {
    node.className = 'state state-' + state;
    node.textContent = state;
    node.dataset.state = state;
  }

  function showMsg(id, text) {
    const m = $(id);
    m.textContent = text;
    m.hidden = false;
  }

  function hideMsg(id) {
    $(id).hidden = true;
  }

  /** A join command's hint (the server named an address other machines cannot reach). */
  function showHint(id, hint) {
    if (hint) showMsg(id, 'Note: ' + hint + '.'); else hideMsg(id);
  }

  function csrf() {
    const m = document.cookie.match(/(?:^|;\s*)muster_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : '';
  }

  function when(ts) {
    if (!ts) return '';
    const d = new Date(ts);
    return isNaN(d) ? String(ts) : d.toLocaleString();
  }

  /** A time relative to now: "12 s ago", "in 3 d". */
  function ago(ts) {
    if (!ts) return 'never';
    const d = Math.round((Date.now() - new Date(ts).getTime()) / 1000);
    if (isNaN(d)) return String(ts);
    const s = Math.abs(d);
    if (s < 5) return 'just now';
    let n;
    if (s < 90) n = s + ' s';
    else if (s < 5400) n = Math.round(s / 60) + ' min';
    else if (s < 129600) n = Math.round(s / 3600) + ' h';
    else n = Math.round(s / 86400) + ' d';
    return d >= 0 ? n + ' ago' : 'in ' + n;
  }

  /** The one way the page shows a time: relative, with the absolute time on hover. */
  function timeCell(ts) {
    if (!ts) return el('span', { class: 'muted' }, '—');
    return el('time', { datetime: ts, title: when(ts), class: 'rel', dataset: { ts } }, ago(ts));
  }

  /** How long from one time to another, for people. */
  function span(from, to) {
    const s = (new Date(to) - new Date(from)) / 1000;
    if (isNaN(s) || s < 0) return '';
    if (s < 60) return s.toFixed(1) + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.round((s % 3600) / 60) + ' min';
  }

  /** Whether the caller may act as `role` in workspace `ws` (and the token has the scope). */
  function may(ws, role) {
    if (!st.scopes.has(SCOPE_OF[role])) return false;
    return st.admin || (RANK[st.roles.get(ws)] || 0) >= RANK[role];
  }

  /** The workspaces where the caller may run jobs. */
  function runWorkspaces() {
    return [...st.roles.keys()].filter((w) => may(w, 'operator')).sort();
  }

  function tagList(tags) {
    const out = [];
    for (const k of ['workspace', 'application', 'version', 'instance']) {
      if (tags && tags[k]) out.push(el('span', { class: 'tag', title: k }, k === 'workspace' ? tags[k] : k + '=' + tags[k]));
    }
    for (const [k, v] of Object.entries((tags && tags.labels) || {})) out.push(el('span', { class: 'tag' }, k + '=' + v));
    return out;
  }

  /** A button that acts on the second click within 4 s (no modal dialogs). */
  function twoStep(button, label, confirmLabel, action) {
    let armed = null;
    button.textContent = label;
    button.addEventListener('click', async () => {
      if (!armed) {
        button.textContent = confirmLabel;
        button.classList.add('confirming');
        armed = setTimeout(() => {
          armed = null;
          button.textContent = label;
          button.classList.remove('confirming');
        }, 4000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      button.classList.remove('confirming');
      button.textContent = label;
      button.disabled = true;
      try {
        await action();
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  /** One API call. With opts.token: as that bearer token; else the session cookie (+ CSRF).
   *  The body is sent as JSON, or as it is with opts.type (e.g. a TOML tree). */
  async function api(method, path, body, opts = {}) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = opts.type || 'application/json';
    if (opts.token) headers.Authorization = 'Bearer ' + opts.token;
    else if (method !== 'GET') headers['X-CSRF-Token'] = csrf();
    let resp;
    try {
      resp = await fetch(path, {
        method, headers, credentials: 'same-origin',
        body: body === undefined ? undefined : (opts.type ? body : JSON.stringify(body)),
      });
    } catch (e) {
      throw new ApiError(0, 'network', 'the server cannot be reached (' + e.message + ')');
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!resp.ok) {
      const err = data && data.error ? data.error
        : { code: 'http_' + resp.status, message: (typeof data === 'string' && data) || resp.statusText };
      if (resp.status === 401 && !opts.token && !opts.quiet401) loggedOut('Your session ended: log in again.');
      throw new ApiError(resp.status, err.code, err.message, resp.headers.get('Retry-After'));
    }
    return data;
  }

  function wsUrl(path) {
    return (location.protocol === 'https:' ? 'wss:' : 'ws:') + '//' + location.host + path;
  }

  // ---- views and routing ----------------------------------------------------------------------

  function show(name) {
    for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== 'view-' + name;
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('active', a.dataset.view === name || (name === 'tree' && a.dataset.view === 'jobs'));
    }
    if (st.view === 'tree' && name !== 'tree') leaveTree();
    if (st.view === 'procs' && name !== 'procs') closeProcLog();
    st.view = name;
    document.title = 'muster · ' + name;
  }

  function parseHash() {
    const h = location.hash.replace(/^#\/?/, '');
    const [path, query] = h.split('?');
    return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query || '') };
  }

  async function route() {
    if (!st.user) return;
    // Only the newest navigation shows: an older one still on its way is dropped.
    const nav = (st.nav = (st.nav || 0) + 1);
    // Roles change (an admin grants one): look again at each change of view.
    try {
      await whoami();
    } catch (e) {
      if (e.status === 401) return loggedOut('Your session ended: log in again.');
    }
    if (nav !== st.nav) return;
    const { parts, query } = parseHash();
    const view = parts[0] || 'jobs';
    try {
      if (view === 'nodes') { show('nodes'); await loadNodes(); }
      else if (view === 'tree' && parts[1]) { show('tree'); await openTree(parts[1], parts[2]); }
      else if (view === 'run') { show('run'); await loadRun(); }
      else if (view === 'hq') { show('hq'); await loadHq(); }
      else if (view === 'procs') { show('procs'); await loadProcs(parts[1]); }
      else if (view === 'models') { show('models'); await loadModels(parts[1], parts[2]); }
      else if (view === 'services') {
        show('services');
        // Statuses change on the pulse too (monitors): looked at again while the view shows.
        if (!st.svcTimer) st.svcTimer = setInterval(() => { if (st.view === 'services') loadServices(st.svcOpen); }, 2000);
        await loadServices(parts.slice(1).join('/'));
      }
      else if (view === 'workspaces') { show('workspaces'); await loadWorkspaces(); }
      else if (view === 'tokens') { show('tokens'); await loadTokens(); }
      else { show('jobs'); await loadJobs(query); }
    } catch (e) {
      if (e.status !== 401) console.error(e);
    }
  }

  // ---- session -------------------------------------------------------------------------------

  /** Who the caller is and what they may do; the page shows only the controls that allows. */
  async function whoami() {
    const me = await api('GET', '/api/v1/me', undefined, { quiet401: true });
    st.user = me.user;
    st.scopes = new Set(me.scopes || []);
    st.admin = !!me.admin && st.scopes.has('admin');
    st.roles = new Map((me.workspaces || []).map((w) => [w.name, w.role]));
    applyRoles();
  }

  function applyRoles() {
    $('whoami').textContent = st.user + (st.admin ? ' (admin)' : '');
    document.body.classList.toggle('is-admin', st.admin);
    const runs = runWorkspaces().length > 0;
    for (const a of document.querySelectorAll('[data-needs=run]')) a.hidden = !runs;
    $('ws-form').hidden = !st.scopes.has('admin');
  }

  async function enterApp() {
    document.body.dataset.mode = 'app';
    $('nav').hidden = false;
    $('who').hidden = false;
    applyRoles();
    connectEvents();
    await route();
  }

  function loggedOut(message) {
    st.user = null;
    st.eventsWanted = false;
    if (st.events) st.events.close();
    leaveTree();
    $('nav').hidden = true;
    $('who').hidden = true;
    show('login');
    if (message) showMsg('login-error', message); else hideMsg('login-error');
    $('login-username').focus();
  }

  async function login(username, password) {
    await api('POST', '/api/v1/login', { username, password }, { quiet401: true });
  }

  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('login-error');
    const button = $('login-submit');
    button.disabled = true;
    try {
      await login($('login-username').value.trim(), $('login-password').value);
      $('login-password').value = '';
      await whoami();
      await enterApp();
    } catch (e) {
      if (e.status === 401) showMsg('login-error', 'Wrong user name or password.');
      else if (e.status === 429) showMsg('login-error', 'Too many failed logins: try again in ' + (e.retryAfter || 'a few') + ' s.');
      else showMsg('login-error', e.message);
    } finally {
      button.disabled = false;
    }
  });

  $('logout').addEventListener('click', async () => {
    try {
      await api('POST', '/api/v1/logout');
    } catch (_) { /* the cookie is cleared or already invalid either way */ }
    loggedOut('You are logged out.');
  });

  // ---- setup ---------------------------------------------------------------------------------

  $('setup-form').noValidate = true;
  $('setup-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('setup-error');
    const code = $('setup-code').value.trim();
    const username = $('setup-username').value.trim();
    const password = $('setup-password').value;
    const cluster = $('setup-cluster').value.trim();
    if (!code) return showMsg('setup-error', 'Give the setup code (in <data-dir>/setup-code on the server).');
    if (!username) return showMsg('setup-error', 'Give the admin\'s name.');
    if (password !== $('setup-password2').value) return showMsg('setup-error', 'The two passwords differ: type the same password twice.');
    const button = $('setup-submit');
    button.disabled = true;
    let token;
    try {
      const body = { setup_code: code, username, password };
      if (cluster) body.cluster_name = cluster;
      token = (await api('POST', '/api/v1/setup', body, { quiet401: true })).token;
    } catch (e) {
      button.disabled = false;
      if (e.code === 'setup_refused') {
        return showMsg('setup-error', 'The setup code is wrong (or setup was already done): nothing was created. ' +
          'Copy the code from <data-dir>/setup-code on the server.');
      }
      return showMsg('setup-error', 'Nothing was created: ' + e.message + '.');
    }
    // The admin exists. A join command for the next node, with the setup token; then that token is
    // revoked (logout) and the page logs in with the session cookie like any later visit.
    $('setup-done-user').textContent = username;
    show('setup-done');
    try {
      const jt = await api('POST', '/api/v1/nodes/join-token', { ttl_s: 3600, uses: 1 }, { token });
      $('join-command').textContent = jt.command;
      showHint('join-hint', jt.hint);
    } catch (e) {
      $('join-command').textContent = '(no join token: ' + e.message + ')';
    }
    // "Go to the dashboard" waits for this login, however early it is clicked.
    st.setupLogin = (async () => {
      try {
        await api('POST', '/api/v1/logout', undefined, { token });
      } catch (_) { /* it expires anyway */ }
      try {
        await login(username, password);
      } catch (e) {
        showMsg('setup-done-error', 'Logging in failed (' + e.message + '): log in on the next page.');
      }
    })();
    await st.setupLogin;
    $('setup-password').value = '';
    $('setup-password2').value = '';
  });

  $('setup-continue').addEventListener('click', async () => {
    if (st.setupLogin) await st.setupLogin;
    document.body.dataset.mode = 'app';
    location.hash = '#/nodes';
    await boot();
  });

  // ---- live events ---------------------------------------------------------------------------

  function setLive(on) {
    const l = $('live');
    l.classList.toggle('on', on);
    l.classList.toggle('off', !on);
    l.textContent = on ? 'live' : 'offline';
  }

  function connectEvents() {
    st.eventsWanted = true;
    if (st.events && st.events.readyState <= 1) return;
    const sock = new WebSocket(wsUrl('/api/v1/events/ws'));
    st.events = sock;
    sock.onopen = () => {
      setLive(true);
      st.eventsRetry = 500;
      // After a drop, what was missed is fetched once.
      if (st.eventsEverOpen) route();
      st.eventsEverOpen = true;
    };
    sock.onmessage = (m) => {
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      onEvent(ev);
    };
    sock.onclose = () => {
      setLive(false);
      if (st.events === sock) st.events = null;
      if (st.eventsWanted) {
        setTimeout(() => { if (st.eventsWanted) connectEvents(); }, st.eventsRetry);
        st.eventsRetry = Math.min(st.eventsRetry * 2, 10000);
      }
    };
  }

  /** Runs `f` once after a burst of events (a refetch caused by events, never a timer poll). */
  function soon(name, f, ms = 250) {
    clearTimeout(st.refreshTimers[name]);
    st.refreshTimers[name] = setTimeout(f, ms);
  }

  function onEvent(ev) {
    if (ev.type === 'job' || ev.type === 'tree') {
      st.recent.push({ kind: ev.type, tree: ev.type === 'job' ? ev.tree : ev.id, t: performance.now() });
      if (st.recent.length > 1000) st.recent.splice(0, 500);
    }
    if (ev.type === 'job') onJobEvent(ev);
    else if (ev.type === 'tree') onTreeEvent(ev);
    else if (ev.type === 'node') onNodeEvent(ev);
    else if (ev.type === 'process' && st.view === 'procs') soon('procs', () => loadProcs(st.procLog && st.procLog.id));
    else if ((ev.type === 'model' || ev.type === 'process') && st.view === 'models') soon('models', () => loadModels(...(st.model || [])));
    else if (ev.type === 'lagged') soon('route', route);
    if ((ev.type === 'job' || ev.type === 'tree') && st.view === 'services') soon('services', () => loadServices(st.svcOpen), 500);
  }

  function onTreeEvent(ev) {
    if (st.view === 'jobs') {
      const row = document.querySelector('#jobs-body tr[data-tree="' + CSS.escape(ev.id) + '"]');
      if (row) {
        setBadge(row.querySelector('.state'), ev.state);
        if (ev.state !== 'running') {
          const fin = row.querySelector('.finished');
          fin.replaceChildren(timeCell(ev.at));
        }
      } else if (st.jobs.idx === 0) {
        soon('jobs', () => loadJobs(parseHash().query, true));
      }
    }
    if (st.tree && st.tree.id === ev.id) {
      st.tree.state = ev.state;
      setBadge($('tree-state'), ev.state);
      showAbort();
    }
  }

  function onJobEvent(ev) {
    if (!st.tree || st.tree.id !== ev.tree) return;
    const job = st.tree.jobs.get(ev.id);
    if (!job) return soon('tree', () => openTree(st.tree.id, st.log && st.log.id, true));
    const before = { state: job.state, attempt: job.attempt };
    job.state = ev.state;
    job.attempt = ev.attempt;
    if (ev.node) job.node = ev.node;
    if (ev.state === 'running' && before.state !== 'running') job.started_at = ev.at;
    if (ev.state !== 'running' && ev.state !== 'waiting' && !job.finished_at) job.finished_at = ev.at;
    const row = document.querySelector('#tree .job[data-job="' + CSS.escape(ev.id) + '"]');
    if (row) {
      setBadge(row.querySelector('.state'), ev.state);
      row.querySelector('.meta').textContent = jobMeta(job);
    }
    if (st.log && st.log.id === ev.id) showDetails(job);
    soon('edges', drawEdges, 100);
    // Exit codes and errors are not in events: fetch the tree once when a job ends.
    if (['succeeded', 'failed', 'aborted'].includes(ev.state)) {
      soon('tree', () => openTree(st.tree.id, st.log && st.log.id, true), 400);
    }
    if (st.log && st.log.id === ev.id) {
      const started = ev.state !== 'waiting' && (before.state === 'waiting' || ev.attempt !== st.log.attempt);
      if (started && !st.log.sock) followLog(job);
      else if (ev.attempt !== st.log.attempt && ev.state === 'running') followLog(job);
    }
  }

  function onNodeEvent(ev) {
    const row = document.querySelector('#nodes-body tr[data-node="' + CSS.escape(ev.id) + '"]');
    const n = st.nodes.get(ev.id);
    if (row && n) {
      n.state = ev.state;
      n.last_seen = ev.at;
      row.replaceWith(nodeRow(n));
    } else if (st.view === 'nodes') {
      soon('nodes', loadNodes);
    }
  }

  // Relative times ("12 s ago") are redrawn from the times already on the page (no requests).
  setInterval(() => {
    for (const t of document.querySelectorAll('time.rel')) t.textContent = ago(t.dataset.ts);
  }, 10000);

  // ---- processes -----------------------------------------------------------------------------

  function portsText(ports) {
    const p = Object.entries(ports || {}).map(([k, v]) => k + '=' + v);
    return p.length ? p.join(', ') : '—';
  }

  function uptime(p) {
    if (!p.started_at || !['starting', 'healthy', 'unhealthy'].includes(p.state)) return '—';
    return ago(p.started_at).replace(/ ago$/, '');
  }

  function procRow(p) {
    const actions = [];
    if (may(p.workspace, 'operator')) {
      const verbs = ['starting', 'healthy', 'unhealthy', 'restarting', 'pending'].includes(p.state) && p.want !== 'stopped'
        ? [['stop', 'Stop'], ['restart', 'Restart']] : [['start', 'Start']];
      for (const [verb, label] of verbs) {
        actions.push(el('button', {
          type: 'button', class: 'small secondary', dataset: { action: verb },
          onclick: async (e) => {
            e.stopPropagation();
            e.target.disabled = true;
            try {
              await api('POST', '/api/v1/processes/' + encodeURIComponent(p.id) + '/' + verb);
              hideMsg('procs-error');
              soon('procs', () => loadProcs(st.procLog && st.procLog.id));
            } catch (err) {
              e.target.disabled = false;
              showMsg('procs-error', p.name + ': ' + err.message);
            }
          },
        }, label));
      }
    }
    return el('tr', { dataset: { proc: p.id }, class: 'clickable', onclick: () => { location.hash = '#/procs/' + p.id; } },
      el('td', { class: 'name' }, el('a', { href: '#/procs/' + p.id }, el('b', {}, p.name))),
      el('td', {}, badge(p.state)),
      el('td', {}, p.node || '—'),
      el('td', { class: 'mono ports' }, portsText(p.ports)),
      el('td', { class: 'restarts' }, String(p.restarts ?? 0)),
      el('td', { class: 'uptime' }, uptime(p)),
      el('td', { class: 'reason' }, p.reason || ''),
      el('td', {}, actions));
  }

  function closeProcLog() {
    if (st.procLog && st.procLog.sock) st.procLog.sock.close();
    st.procLog = null;
  }

  /** Follows a process's log over its websocket, keeping the last 512 KiB on the page. */
  function followProcLog(p) {
    if (st.procLog && st.procLog.id === p.id && st.procLog.sock && st.procLog.sock.readyState <= 1) return;
    closeProcLog();
    const pre = $('proc-log');
    pre.textContent = '';
    pre.dataset.proc = p.id;
    $('proc-log-name').textContent = p.name;
    $('proc-log-box').hidden = false;
    if (!p.node) { pre.textContent = '(not started on a node yet)'; st.procLog = { id: p.id }; return; }
    const sock = new WebSocket(wsUrl('/api/v1/processes/' + encodeURIComponent(p.id) + '/log/ws'));
    st.procLog = { id: p.id, sock };
    sock.onmessage = (m) => {
      pre.textContent += m.data;
      if (pre.textContent.length > 512 * 1024) pre.textContent = pre.textContent.slice(-512 * 1024);
      pre.scrollTop = pre.scrollHeight;
    };
  }

  async function loadProcs(open) {
    hideMsg('procs-error');
    try {
      const r = await api('GET', '/api/v1/processes');
      $('procs-body').replaceChildren(...r.items.map(procRow));
      $('procs-empty').hidden = r.items.length > 0;
      for (const row of document.querySelectorAll('#procs-body tr')) row.classList.toggle('selected', row.dataset.proc === open);
      const p = open && r.items.find((x) => x.id === open);
      if (p) followProcLog(p);
      else { closeProcLog(); $('proc-log-box').hidden = true; }
    } catch (e) {
      if (e.status !== 401) showMsg('procs-error', e.message);
    }
  }

  // ---- services ------------------------------------------------------------------------------

  /** A service's row: its path indented under its parent's, its status, its last action. */
  function serviceRow(v) {
    const depth = v.path.split('/').length - 1;
    const leaf = v.path.split('/').pop();
    const href = '#/services/' + v.path.split('/').map(encodeURIComponent).join('/');
    const name = el('td', { class: 'name', title: v.path }, el('a', { href }, el('b', {}, leaf)));
    // Children under their parent (CSSOM: the page's CSP allows no inline style attribute).
    name.style.paddingLeft = (0.5 + 1.5 * depth) + 'em';
    return el('tr', { dataset: { service: v.path }, class: 'clickable', onclick: () => { location.hash = href; } },
      name,
      el('td', { class: 'status' }, badge(v.status)),
      el('td', {}, v.node || '—'),
      el('td', { class: 'last' }, v.last_action || '—'),
      el('td', {}, timeCell(v.updated_at)),
      el('td', { class: 'message' }, v.message || ''));
  }

  async function loadServices(open) {
    st.svcOpen = open;
    hideMsg('services-error');
    try {
      const r = await api('GET', '/api/v1/services');
      const items = [...r.items].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
      $('services-body').replaceChildren(...items.map(serviceRow));
      $('services-empty').hidden = items.length > 0;
      for (const row of document.querySelectorAll('#services-body tr')) row.classList.toggle('selected', row.dataset.service === open);
      const v = open && items.find((x) => x.path === open);
      if (v && v.last_job) await showServiceLog(v, st.svcJob && st.svcJob.path === v.path ? st.svcJob.job : null);
      else $('svc-log-box').hidden = true;
    } catch (e) {
      if (e.status !== 401) showMsg('services-error', e.message);
    }
  }

  /** A service's recent actions (newest first), and the log of one: the chosen, else the last. */
  async function showServiceLog(v, chosen) {
    $('svc-log-box').hidden = false;
    const history = v.history && v.history.length ? v.history
      : [{ action: v.last_action || '', job: v.last_job, state: '', at: v.updated_at }];
    const id = chosen && history.some((h) => h.job === chosen) ? chosen : history[0].job;
    const run = history.find((h) => h.job === id);
    $('svc-log-name').textContent = v.path + ' · ' + run.action;
    $('svc-history').replaceChildren(...history.map((h) => el('li', { dataset: { job: h.job }, class: h.job === id ? 'selected' : '' },
      el('a', { href: location.hash, onclick: (e) => { e.preventDefault(); st.svcJob = { path: v.path, job: h.job }; showServiceLog(v, h.job); } },
        h.action), ' ', badge(h.state || 'unknown'), ' ', timeCell(h.at))));
    const job = await api('GET', '/api/v1/jobs/' + encodeURIComponent(id));
    const tree = job.tree;
    $('svc-log-tree').textContent = tree ? 'tree ' + String(tree).slice(0, 8) : '';
    $('svc-log-tree').href = tree ? '#/tree/' + tree + '/' + id : '#/services';
    const part = await logPart({ id, attempt: job.attempt || 1 }, {});
    $('svc-log').textContent = new TextDecoder().decode(part.bytes);
  }

  function showPlan(p) {
    st.svcPlan = p;
    $('svc-plan-box').hidden = false;
    $('svc-plan-id').textContent = p.id.slice(0, 8);
    $('svc-plan-commit').textContent = (p.commit || '').slice(0, 12);
    const steps = p.steps || [];
    $('svc-plan-body').replaceChildren(...steps.map((s) => el('tr', { dataset: { step: s.path } },
      el('td', { class: 'action' }, s.action),
      el('td', { class: 'mono' }, s.path),
      el('td', {}, s.node || '—'),
      el('td', {}, s.reason || ''))));
    $('svc-plan-empty').hidden = steps.length > 0;
    $('svc-apply').hidden = steps.length === 0;
    $('svc-apply').disabled = false;
    $('svc-apply-tree').hidden = true;
  }

  $('svc-plan').addEventListener('click', async () => {
    hideMsg('services-error');
    try {
      showPlan(await api('POST', '/api/v1/services/plan', {}));
    } catch (e) {
      if (e.status !== 401) showMsg('services-error', e.message);
    }
  });

  $('svc-apply').addEventListener('click', async () => {
    const p = st.svcPlan;
    if (!p) return;
    hideMsg('services-error');
    $('svc-apply').disabled = true;
    try {
      const a = await api('POST', '/api/v1/services/apply', { plan: p.id });
      if (a.tree) {
        $('svc-apply-tree').hidden = false;
        $('svc-apply-tree').textContent = 'applying in tree ' + a.tree.slice(0, 8);
        $('svc-apply-tree').href = '#/tree/' + a.tree;
        $('svc-apply-tree').dataset.tree = a.tree;
      }
      soon('services', () => loadServices(st.svcOpen));
    } catch (e) {
      $('svc-apply').disabled = false;
      if (e.status !== 401) showMsg('services-error', e.message);
    }
  });

  // ---- models --------------------------------------------------------------------------------

  function modelRow(m) {
    const href = '#/models/' + encodeURIComponent(m.workspace) + '/' + encodeURIComponent(m.name);
    return el('tr', { dataset: { model: m.workspace + '/' + m.name }, class: 'clickable', onclick: () => { location.hash = href; } },
      el('td', { class: 'name' }, el('a', { href }, el('b', {}, m.workspace + '/' + m.name))),
      el('td', { class: 'live-version' }, m.live ? 'v' + m.live : '—'),
      el('td', {}, String(m.versions)),
      el('td', {}, String(m.replicas)),
      el('td', {}, 'v' + m.last_version + ' ', badge(m.state)),
      el('td', {}, ago(m.updated_at)));
  }

  function versionRow(m, v) {
    const actions = [];
    if (v.state === 'stopped' && may(m.workspace, 'operator')) {
      actions.push(el('button', {
        type: 'button', class: 'small secondary', dataset: { action: 'revert' },
        onclick: async (e) => {
          e.target.disabled = true;
          try {
            await api('POST', modelPath(m) + '/revert', { version: v.version });
            hideMsg('models-error');
          } catch (err) {
            e.target.disabled = false;
            showMsg('models-error', 'v' + v.version + ': ' + err.message);
          }
        },
      }, 'Revert'));
    }
    return el('tr', { dataset: { version: String(v.version) } },
      el('td', {}, 'v' + v.version),
      el('td', { class: 'vstate' }, badge(v.state)),
      el('td', {}, ago(v.created_at)),
      el('td', {}, v.created_by || ''),
      el('td', {}, v.node || '—'),
      el('td', {}, v.tree ? el('a', { href: '#/tree/' + v.tree, class: 'mono tree' }, v.tree.slice(0, 8)) : '—'),
      el('td', { class: 'error' }, v.error || ''),
      el('td', {}, actions));
  }

  function ms(x) {
    return x === null || x === undefined ? '—' : x + ' ms';
  }

  function replicaRow(r) {
    return el('tr', { dataset: { process: r.process, version: String(r.version) } },
      el('td', {}, 'v' + r.version),
      el('td', {}, el('a', { href: '#/procs/' + r.process, class: 'mono' }, r.process.slice(0, 8))),
      el('td', { class: 'rstate' }, badge(r.state)),
      el('td', {}, r.node || '—'),
      el('td', { class: 'mono' }, r.address || '—'),
      el('td', { class: 'requests' }, String(r.requests)),
      el('td', {}, ms(r.p50_ms)),
      el('td', {}, ms(r.p99_ms)));
  }

  function modelPath(m) {
    return '/api/v1/models/' + encodeURIComponent(m.workspace) + '/' + encodeURIComponent(m.name);
  }

  async function loadModels(ws, name) {
    hideMsg('models-error');
    st.model = ws && name ? [ws, name] : null;
    try {
      const r = await api('GET', '/api/v1/models');
      $('models-body').replaceChildren(...r.items.map(modelRow));
      $('models-empty').hidden = r.items.length > 0;
      for (const row of document.querySelectorAll('#models-body tr')) row.classList.toggle('selected', row.dataset.model === ws + '/' + name);
      if (!st.model) { $('model-box').hidden = true; return; }
      const m = await api('GET', '/api/v1/models/' + encodeURIComponent(ws) + '/' + encodeURIComponent(name));
      $('model-name').textContent = m.workspace + '/' + m.name;
      $('model-live').textContent = m.live ? 'v' + m.live : '—';
      $('model-versions-body').replaceChildren(...m.versions.map((v) => versionRow(m, v)));
      const replicas = m.replicas.slice().sort((a, b) => b.version - a.version);
      $('model-replicas-body').replaceChildren(...replicas.map(replicaRow));
      $('model-box').hidden = false;
    } catch (e) {
      if (e.status !== 401) showMsg('models-error', e.message);
    }
  }

  $('predict-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    hideMsg('predict-error');
    if (!st.model) return;
    let data;
    try {
      data = JSON.parse($('predict-data').value);
    } catch (err) {
      showMsg('predict-error', 'data is not JSON: ' + err.message);
      return;
    }
    const b = $('predict-submit');
    b.disabled = true;
    try {
      const [ws, name] = st.model;
      const r = await api('POST', '/api/v1/models/' + encodeURIComponent(ws) + '/' + encodeURIComponent(name) + '/predict', { data });
      $('predict-result').textContent = JSON.stringify(r.result) + '  (v' + r.version + ')';
      $('predict-result').hidden = false;
    } catch (err) {
      showMsg('predict-error', err.message);
    } finally {
      b.disabled = false;
    }
  });

  // ---- nodes ---------------------------------------------------------------------------------

  function nodeRow(n) {
    const labels = Object.entries(n.labels || {}).filter(([k]) => k !== 'type')
      .map(([k, v]) => el('span', { class: 'tag' }, k + '=' + v));
    let action = null;
    if (st.admin) {
      const draining = n.state === 'draining';
      action = el('button', {
        type: 'button', class: 'small ' + (draining ? 'secondary' : ''),
        dataset: { action: draining ? 'undrain' : 'drain' },
        onclick: async (e) => {
          e.target.disabled = true;
          try {
            const upd = await api('PATCH', '/api/v1/nodes/' + encodeURIComponent(n.id), { state: draining ? 'ready' : 'draining' });
            st.nodes.set(upd.id, upd);
            document.querySelector('#nodes-body tr[data-node="' + CSS.escape(n.id) + '"]').replaceWith(nodeRow(upd));
            hideMsg('nodes-error');
          } catch (err) {
            e.target.disabled = false;
            showMsg('nodes-error', 'Node ' + n.name + ': ' + err.message);
          }
        },
      }, draining ? 'Undrain' : 'Drain');
    }
    return el('tr', { dataset: { node: n.id } },
      el('td', { class: 'name' }, el('b', {}, n.name)),
      el('td', {}, badge(n.state)),
      el('td', {}, (n.labels && n.labels.type) || '—'),
      el('td', {}, labels.length ? labels : '—'),
      el('td', {}, String(n.slots ?? '')),
      el('td', {}, timeCell(n.last_seen)),
      el('td', { class: 'mono' }, n.version || ''),
      el('td', {}, action));
  }

  async function loadNodes() {
    hideMsg('nodes-error');
    $('add-node').hidden = !st.admin;
    try {
      const r = await api('GET', '/api/v1/nodes');
      st.nodes = new Map(r.items.map((n) => [n.id, n]));
      $('nodes-body').replaceChildren(...r.items.map(nodeRow));
      $('nodes-empty').hidden = r.items.length > 0;
    } catch (e) {
      if (e.status !== 401) showMsg('nodes-error', e.message);
    }
  }

  $('add-node').addEventListener('click', async () => {
    try {
      const jt = await api('POST', '/api/v1/nodes/join-token', { ttl_s: 3600, uses: 1 });
      $('node-join-command').textContent = jt.command;
      showHint('node-join-hint', jt.hint);
      $('node-join').hidden = false;
    } catch (e) {
      showMsg('nodes-error', e.message);
    }
  });

  // ---- jobs ----------------------------------------------------------------------------------

  function filtersFromForm() {
    const q = new URLSearchParams();
    for (const [k, v] of new FormData($('jobs-filter'))) if (String(v).trim()) q.set(k, String(v).trim());
    return q;
  }

  $('jobs-filter').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = filtersFromForm().toString();
    const target = '#/jobs' + (q ? '?' + q : '');
    if (location.hash === target) loadJobs(parseHash().query); else location.hash = target;
  });
  $('jobs-filter').addEventListener('reset', () => { setTimeout(() => { location.hash = '#/jobs'; }, 0); });

  async function loadJobs(query, keepPage) {
    const qs = query.toString();
    if (qs !== st.jobs.query) {
      st.jobs = { query: qs, cursors: [null], idx: 0, next: null };
    }
    if (!keepPage) {
      // Fill the filter form from the address.
      for (const input of $('jobs-filter').elements) if (input.name) input.value = query.get(input.name) || '';
    }
    const q = new URLSearchParams(query);
    q.set('limit', PAGE);
    const cursor = st.jobs.cursors[st.jobs.idx];
    if (cursor) q.set('cursor', cursor);
    hideMsg('jobs-error');
    const asked = performance.now();
    let r;
    try {
      r = await api('GET', '/api/v1/jobs?' + q);
    } catch (e) {
      if (e.status !== 401) showMsg('jobs-error', e.message);
      return;
    }
    st.jobs.next = r.next_cursor || null;
    // A tree event that came while the answer was on its way: look once more.
    if (st.recent.some((e) => e.kind === 'tree' && e.t >= asked && r.items.some((t) => t.id === e.tree))) {
      soon('jobs', () => loadJobs(parseHash().query, true), 100);
    }
    $('jobs-body').replaceChildren(...r.items.map((t) => el('tr', {
      class: 'clickable', dataset: { tree: t.id },
      onclick: () => { location.hash = '#/tree/' + t.id; },
    },
    el('td', {}, el('a', { href: '#/tree/' + t.id }, t.name)),
    el('td', {}, badge(t.state)),
    el('td', {}, tagList(t.tags)),
    el('td', {}, String(t.jobs ?? '')),
    el('td', {}, (t.nodes || []).join(', ')),
    el('td', {}, timeCell(t.created_at)),
    el('td', { class: 'finished' }, t.finished_at ? timeCell(t.finished_at) : ''))));
    $('jobs-empty').hidden = r.items.length > 0;
    $('jobs-older').disabled = !st.jobs.next;
    $('jobs-newer').disabled = st.jobs.idx === 0;
    $('jobs-newest').disabled = st.jobs.idx === 0;
    $('jobs-page').textContent = 'page ' + (st.jobs.idx + 1);
  }

  $('jobs-older').addEventListener('click', () => {
    if (!st.jobs.next) return;
    st.jobs.cursors[st.jobs.idx + 1] = st.jobs.next;
    st.jobs.idx += 1;
    loadJobs(parseHash().query, true);
  });
  $('jobs-newer').addEventListener('click', () => {
    if (st.jobs.idx === 0) return;
    st.jobs.idx -= 1;
    loadJobs(parseHash().query, true);
  });
  $('jobs-newest').addEventListener('click', () => {
    st.jobs.idx = 0;
    loadJobs(parseHash().query, true);
  });

  // ---- one tree ------------------------------------------------------------------------------

  function jobKind(j) {
    if (j.exec) return 'exec';
    if (j.shell !== undefined) return 'shell';
    if (j.noop) return 'noop';
    return 'group';
  }

  /** What a job runs, as one line. */
  function command(j) {
    if (j.exec) return j.exec.map((w) => (/^[\w@%+=:,./-]+$/.test(w) ? w : "'" + w.replace(/'/g, "'\\''") + "'")).join(' ');
    if (j.shell !== undefined) return j.shell;
    if (j.noop) return '(no-op)';
    return '(a group: it waits for its children)';
  }

  function keyOf(id) {
    const j = st.tree && st.tree.jobs.get(id);
    return j ? j.key : id;
  }

  function jobMeta(j) {
    const parts = [];
    if (j.key && j.key !== j.name) parts.push('key ' + j.key);
    if (j.node) parts.push('on ' + j.node);
    if (j.attempt > 1 || j.retries > 0) parts.push('attempt ' + j.attempt + (j.retries > 0 ? '/' + (j.retries + 1) : ''));
    if (j.exit_code !== null && j.exit_code !== undefined) parts.push('exit ' + j.exit_code);
    if (j.started_at && j.finished_at) parts.push(span(j.started_at, j.finished_at));
    if (j.needs && j.needs.length) parts.push('needs ' + j.needs.map(keyOf).join(', '));
    return parts.join(' · ');
  }

  function jobItem(j) {
    st.tree.jobs.set(j.id, j);
    const selected = st.log && st.log.id === j.id;
    const row = el('div', {
      class: 'job' + (selected ? ' selected' : ''), tabindex: '0', role: 'button',
      dataset: { job: j.id, key: j.key || '', kind: jobKind(j) },
      title: command(j),
      onclick: () => selectJob(j.id),
      onkeydown: (e) => { if (e.key === 'Enter') selectJob(j.id); },
    }, badge(j.state), el('span', { class: 'name' }, j.name), el('span', { class: 'meta' }, ''),
    j.error ? el('span', { class: 'err' }, j.error) : null);
    const kids = (j.children || []).map(jobItem);
    return el('li', {}, row, kids.length ? el('ul', {}, kids) : null);
  }

  function firstJob(root, pred) {
    const stack = [root];
    while (stack.length) {
      const j = stack.pop();
      if (pred(j)) return j;
      stack.push(...(j.children || []).slice().reverse());
    }
    return null;
  }

  /** The job a failed tree is about: the failed job that ended first (the others were aborted
   *  because of it, or failed after it). */
  function cause(root) {
    let best = null;
    firstJob(root, (j) => {
      if (j.state === 'failed' && (!best || String(j.finished_at || '') < String(best.finished_at || ''))) best = j;
      return false;
    });
    return best;
  }

  /** Draws the `needs` edges beside the tree: an arrow from each needed job to the job that
   *  needs it, on the right of the rows (the nesting already shows children). */
  function drawEdges() {
    const svg = $('tree-edges');
    const box = $('tree-box');
    svg.replaceChildren(svg.querySelector('defs'));
    $('edges-note').hidden = true;
    if (!st.tree || box.offsetParent === null) return;
    const base = box.getBoundingClientRect();
    svg.setAttribute('width', String(box.clientWidth));
    svg.setAttribute('height', String(box.scrollHeight));
    // New SVG paths are copies of the one in the page (so no namespace is spelled out here).
    const proto = svg.querySelector('#edge-proto');
    const right = box.clientWidth - 30;
    let n = 0;
    for (const j of st.tree.jobs.values()) {
      for (const need of j.needs || []) {
        const from = box.querySelector('.job[data-job="' + CSS.escape(need) + '"]');
        const to = box.querySelector('.job[data-job="' + CSS.escape(j.id) + '"]');
        if (!from || !to) continue;
        const y1 = from.getBoundingClientRect().top - base.top + box.scrollTop + from.offsetHeight / 2;
        const y2 = to.getBoundingClientRect().top - base.top + box.scrollTop + to.offsetHeight / 2;
        const bend = 10 + Math.min(18, Math.abs(y2 - y1) / 6) + (n % 3) * 3;
        n += 1;
        const path = proto.cloneNode(false);
        path.removeAttribute('id');
        path.setAttribute('d', `M ${right} ${y1} C ${right + bend} ${y1}, ${right + bend} ${y2}, ${right} ${y2}`);
        path.dataset.from = keyOf(need);
        path.dataset.to = j.key;
        svg.append(path);
      }
    }
    $('edges-note').hidden = n === 0;
  }
  window.addEventListener('resize', () => soon('edges', drawEdges, 100));

  function showAbort() {
    const t = st.tree;
    $('tree-abort').hidden = !t || t.state !== 'running' || !may(t.root.tags && t.root.tags.workspace, 'operator');
  }

  /** Empties the tree view (a tree that cannot be shown must not leave the last one there). */
  function clearTree() {
    leaveTree();
    $('tree-name').textContent = '';
    $('tree-state').replaceChildren();
    $('tree-state').className = '';
    $('tree-state').removeAttribute('data-state');
    $('tree-tags').replaceChildren();
    $('tree-id').textContent = '';
    $('tree').replaceChildren();
    $('tree-abort').hidden = true;
    $('job-details').replaceChildren();
    $('log').textContent = '';
    $('log-job').textContent = '';
    $('log-earlier').hidden = true;
    $('log-download').hidden = true;
    logStatus('');
    drawEdges();
  }

  async function openTree(id, jobId, refresh) {
    const asked = performance.now();
    // Answers that come back out of order: only the last asked is shown.
    const ask = (st.treeAsk = (st.treeAsk || 0) + 1);
    let root;
    try {
      root = await api('GET', '/api/v1/jobs/' + encodeURIComponent(id) + '/tree');
      if (ask !== st.treeAsk) return;
      hideMsg('tree-error');
      // A child's id: open its tree, on that job.
      if (root.tree && root.tree !== root.id) {
        return openTree(root.tree, jobId || root.id, refresh);
      }
    } catch (e) {
      if (e.status === 401 || ask !== st.treeAsk) return;
      if (st.view === 'tree' && !refresh) clearTree();
      showMsg('tree-error', e.status === 404 || e.status === 400 ? 'No such tree: ' + e.message + '.' : e.message);
      return;
    }
    if (st.view !== 'tree') return;
    const treeId = root.tree || root.id;
    if (!refresh || !st.tree || st.tree.id !== treeId) leaveTree();
    st.tree = { id: treeId, root, state: root.tree_state, jobs: new Map() };
    $('tree-name').textContent = root.name;
    setBadge($('tree-state'), root.tree_state);
    $('tree-tags').replaceChildren(...tagList(root.tags));
    $('tree-id').textContent = treeId;
    $('tree').replaceChildren(jobItem(root));
    for (const row of document.querySelectorAll('#tree .job')) {
      row.querySelector('.meta').textContent = jobMeta(st.tree.jobs.get(row.dataset.job));
    }
    showAbort();
    drawEdges();
    // Events of this tree that came while the answer was on its way were not applied to it:
    // look once more, so no state change is missed.
    if (st.recent.some((e) => e.tree === treeId && e.t >= asked)) {
      soon('tree', () => openTree(treeId, st.log && st.log.id, true), 50);
    }
    if (refresh && st.log) {
      const j = st.tree.jobs.get(st.log.id);
      if (j) showDetails(j);
      if (j && !st.log.sock && !st.log.loaded && j.state !== 'waiting' && st.log.ended !== j.attempt) followLog(j);
      return;
    }
    const pick = (jobId && st.tree.jobs.get(jobId))
      || firstJob(root, (j) => j.state === 'running' && jobKind(j) !== 'group')
      || cause(root)
      || firstJob(root, (j) => jobKind(j) === 'exec' || jobKind(j) === 'shell')
      || root;
    selectJob(pick.id);
  }

  function selectJob(id) {
    const j = st.tree && st.tree.jobs.get(id);
    if (!j) return;
    for (const r of document.querySelectorAll('#tree .job')) r.classList.toggle('selected', r.dataset.job === id);
    const target = '#/tree/' + st.tree.id + '/' + id;
    if (location.hash !== target) history.replaceState(null, '', target);
    showDetails(j);
    followLog(j);
  }

  /** The selected job: what it runs, where, when, its attempts and how it ended. */
  function showDetails(j) {
    const rows = [
      ['State', badge(j.state)],
      ['Key', j.key],
      ['Id', el('span', { class: 'mono' }, j.id)],
      ['Runs', el('code', {}, command(j))],
      ['Node', j.node || (j.want_node ? j.want_node + ' (pinned; not placed yet)' : '—')],
      ['Attempt', String(j.attempt) + (j.retries > 0 ? ' of ' + (j.retries + 1) : '')],
      ['Started', timeCell(j.started_at)],
      ['Finished', timeCell(j.finished_at)],
    ];
    if (j.started_at && j.finished_at) rows.push(['Took', span(j.started_at, j.finished_at)]);
    if (j.retry_at) rows.push(['Retry', timeCell(j.retry_at)]);
    if (j.timeout_s) rows.push(['Timeout', j.timeout_s + ' s']);
    if (j.exit_code !== null && j.exit_code !== undefined) rows.push(['Exit code', String(j.exit_code)]);
    if (j.error) rows.push(['Error', el('span', { class: 'err' }, j.error)]);
    if (j.needs && j.needs.length) rows.push(['Needs', j.needs.map(keyOf).join(', ')]);
    $('job-details').replaceChildren(...rows.flatMap(([k, v]) => [
      el('dt', {}, k), el('dd', { dataset: { field: k.toLowerCase().replace(' ', '-') } }, v)]));
  }

  function closeLog() {
    if (st.log && st.log.sock) {
      const s = st.log.sock;
      st.log.sock = null;
      s.onclose = null;
      s.close();
    }
  }

  function leaveTree() {
    closeLog();
    st.log = null;
    st.tree = null;
  }

  function logStatus(text) {
    $('log-status').textContent = text;
  }

  function logUrl(log, params) {
    const q = new URLSearchParams({ attempt: String(log.attempt), ...params });
    return '/api/v1/jobs/' + encodeURIComponent(log.id) + '/log?' + q;
  }

  /** A part of a log: its bytes, where they start, and how big the whole log is. */
  async function logPart(log, params) {
    const resp = await fetch(logUrl(log, params), { credentials: 'same-origin' });
    if (!resp.ok) {
      let m = resp.statusText;
      try { m = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
      throw new ApiError(resp.status, 'http_' + resp.status, m);
    }
    return {
      bytes: new Uint8Array(await resp.arrayBuffer()),
      offset: Number(resp.headers.get('X-Log-Offset') || 0),
      size: Number(resp.headers.get('X-Log-Size') || 0),
    };
  }

  /** Bytes from `offset` as text starting at a whole line (0x0A never occurs inside a UTF-8
   *  character, so cutting there is safe); gives the text and where it starts. */
  function wholeLines(bytes, offset) {
    let cut = 0;
    if (offset > 0) {
      const nl = bytes.indexOf(10);
      if (nl >= 0 && nl + 1 < bytes.length) cut = nl + 1;
    }
    return { text: new TextDecoder().decode(bytes.subarray(cut)), start: offset + cut };
  }

  function showEarlier(log) {
    const b = $('log-earlier');
    b.hidden = !(log.start > 0);
    b.textContent = 'Load earlier (' + Math.ceil(log.start / 1024) + ' KiB before)';
  }

  /** An ended attempt's log: its end first (a big log opens at once), earlier parts on demand. */
  async function loadTail(log) {
    const pre = $('log');
    logStatus('loading…');
    let part;
    try {
      part = await logPart(log, { tail: String(LOG_TAIL) });
    } catch (e) {
      if (st.log !== log) return;
      pre.dataset.status = 'error';
      return logStatus('the log cannot be read: ' + e.message);
    }
    if (st.log !== log) return;
    const { text, start } = wholeLines(part.bytes, part.offset);
    pre.textContent = text;
    pre.scrollTop = pre.scrollHeight;
    log.start = start;
    log.loaded = true;
    showEarlier(log);
    const j = st.tree && st.tree.jobs.get(log.id);
    pre.dataset.status = 'ended';
    logStatus('log complete' + (j ? ' (' + j.state + ')' : '') + ' · ' + Math.ceil(part.size / 1024) + ' KiB');
  }

  $('log-earlier').addEventListener('click', async () => {
    const log = st.log;
    if (!log || !(log.start > 0)) return;
    const b = $('log-earlier');
    b.disabled = true;
    try {
      const offset = Math.max(0, log.start - LOG_PAGE);
      const part = await logPart(log, { offset: String(offset), limit: String(log.start - offset) });
      if (st.log !== log) return;
      const { text, start } = wholeLines(part.bytes, part.offset);
      const pre = $('log');
      const before = pre.scrollHeight;
      pre.prepend(document.createTextNode(text));
      pre.scrollTop += pre.scrollHeight - before;
      log.start = start;
      showEarlier(log);
    } catch (e) {
      logStatus('the earlier part cannot be read: ' + e.message);
    } finally {
      b.disabled = false;
    }
  });

  function followLog(j) {
    closeLog();
    st.logOpens = (st.logOpens || 0) + 1;
    st.log = { id: j.id, attempt: j.attempt, sock: null, ended: null, start: 0, loaded: false };
    const pre = $('log');
    pre.textContent = '';
    pre.dataset.job = j.id;
    $('log-job').textContent = '· ' + j.name;
    $('log-earlier').hidden = true;
    const kind = jobKind(j);
    const dl = $('log-download');
    dl.hidden = kind === 'group' || kind === 'noop' || j.state === 'waiting';
    dl.href = logUrl(st.log, {});
    dl.setAttribute('download', 'muster-' + j.key + '-' + j.id + '.' + j.attempt + '.log');
    if (kind === 'group' || kind === 'noop') {
      logStatus('');
      pre.textContent = kind === 'group' ? '(a group of jobs: it has no log of its own)' : '(a no-op job: no log)';
      return;
    }
    if (j.state === 'waiting') {
      logStatus(j.retry_at ? 'waiting to retry…' : 'waiting to start…');
      pre.dataset.status = 'waiting';
      return; // Opened when the job's "running" event arrives.
    }
    const log = st.log;
    if (j.state !== 'running') {
      loadTail(log);
      return;
    }
    // A running attempt is followed live; the page keeps its last LOG_KEEP characters.
    const sock = new WebSocket(wsUrl('/api/v1/jobs/' + encodeURIComponent(j.id) + '/log/ws?attempt=' + j.attempt));
    const utf8 = new TextEncoder();
    log.sock = sock;
    pre.dataset.status = 'following';
    logStatus('following live…');
    // Chunks are put on the page once per frame: a big log arrives in thousands of messages,
    // and laying the page out for each one would freeze it.
    let chars = 0; // on the page, counted as it comes (reading textContent each time is slow)
    let pending = [];
    const flush = () => {
      const data = pending.join('');
      pending = [];
      if (log.sock !== sock && !log.draining) return;
      const nearBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
      pre.append(document.createTextNode(data));
      chars += data.length;
      if (chars > LOG_KEEP * 1.25) {
        const t = pre.textContent;
        // At a line's start when there is one (a line longer than LOG_KEEP is cut in two).
        const cut = t.indexOf('\n', t.length - LOG_KEEP) + 1 || t.length - LOG_KEEP;
        log.start += utf8.encode(t.slice(0, cut)).length;
        pre.textContent = t.slice(cut);
        showEarlier(log);
        chars = t.length - cut;
      }
      if (nearBottom) pre.scrollTop = pre.scrollHeight;
      log.draining = false;
    };
    sock.onmessage = (m) => {
      if (typeof m.data !== 'string' || !m.data) return;
      if (!pending.length) requestAnimationFrame(flush);
      pending.push(m.data);
    };
    sock.onclose = (e) => {
      if (log.sock !== sock) return;
      log.sock = null;
      if (pending.length) {
        // What came last is still to be shown.
        log.draining = true;
        flush();
      }
      const now = st.tree && st.tree.jobs.get(j.id);
      const state = now ? now.state : j.state;
      if (e.code === 1000 || e.code === 1005) {
        log.ended = now ? now.attempt : j.attempt;
        pre.dataset.status = 'ended';
        logStatus('log complete' + (state === 'running' ? '' : ' (' + state + ')'));
      } else {
        pre.dataset.status = 'error';
        logStatus('the log stream closed (code ' + e.code + ')');
      }
    };
  }

  twoStep($('tree-abort'), 'Abort', 'Click again to abort', async () => {
    if (!st.tree) return;
    try {
      await api('POST', '/api/v1/jobs/' + encodeURIComponent(st.tree.id) + '/abort');
    } catch (e) {
      showMsg('tree-error', 'Abort failed: ' + e.message);
    }
  });

  // ---- run -----------------------------------------------------------------------------------

  async function loadRun() {
    hideMsg('run-error');
    hideMsg('script-error');
    hideMsg('tree-form-error');
    const nodes = await api('GET', '/api/v1/nodes').catch(() => ({ items: [] }));
    // Only the workspaces where the caller may run jobs.
    const mine = runWorkspaces();
    $('run-none').hidden = mine.length > 0;
    for (const f of ['run-form', 'tree-form']) $(f).querySelector('button[type=submit]').disabled = mine.length === 0;
    $('tree-workspaces').textContent = mine.length ? mine.join(', ') : 'none';
    const wsSel = $('run-workspace');
    const keep = wsSel.value;
    wsSel.replaceChildren(...mine.map((w) => el('option', { value: w }, w + ' (' + st.roles.get(w) + ')')));
    if (keep && mine.includes(keep)) wsSel.value = keep;
    else if (mine.includes(st.user)) wsSel.value = st.user;
    const nodeSel = $('run-node');
    const keepNode = nodeSel.value;
    nodeSel.replaceChildren(el('option', { value: '' }, 'any node'),
      ...nodes.items.map((n) => el('option', { value: n.name }, n.name + ' (' + n.state + ')')));
    nodeSel.value = keepNode;
    // Node control scripts: a server without them answers 404.
    const sel = $('script-name');
    try {
      const s = await api('GET', '/api/v1/scripts');
      sel.replaceChildren(...s.items.map((x) => el('option', { value: x.name }, x.name)));
      $('scripts-fields').hidden = s.items.length === 0;
      $('scripts-none').hidden = s.items.length > 0;
      $('scripts-none').textContent = 'No node control scripts are installed on this server' +
        (s.dir ? ': put executable files in ' + s.dir + ' on the server.' : '.');
    } catch (e) {
      if (e.status === 401) return;
      $('scripts-fields').hidden = true;
      $('scripts-none').hidden = false;
      $('scripts-none').textContent = e.status === 404
        ? 'This server has no node control scripts.' : 'Scripts cannot be listed: ' + e.message;
    }
  }

  $('run-form').noValidate = true;
  $('run-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('run-error');
    const name = $('run-name').value.trim();
    const shell = $('run-shell').value;
    if (!name) return showMsg('run-error', 'Give the job a name.');
    if (!shell.trim()) return showMsg('run-error', 'Give the command to run.');
    const tags = { workspace: $('run-workspace').value };
    for (const k of ['application', 'version', 'instance']) {
      const v = $('run-' + k).value.trim();
      if (v) tags[k] = v;
    }
    const body = { name, shell, tags };
    if ($('run-node').value) body.node = $('run-node').value;
    const timeout = $('run-timeout').value.trim();
    if (timeout) {
      if (!/^[0-9]+$/.test(timeout) || Number(timeout) < 1) return showMsg('run-error', 'The timeout is a whole number of seconds, at least 1.');
      body.timeout_s = Number(timeout);
    }
    const retries = $('run-retries').value.trim();
    if (retries && retries !== '0') {
      if (!/^[0-9]+$/.test(retries) || Number(retries) > 100) return showMsg('run-error', 'Retries is a whole number from 0 to 100.');
      body.retries = Number(retries);
    }
    const button = $('run-submit');
    button.disabled = true;
    try {
      const r = await api('POST', '/api/v1/jobs', body);
      location.hash = '#/tree/' + r.id;
    } catch (e) {
      showMsg('run-error', e.message);
    } finally {
      button.disabled = false;
    }
  });

  // The two ways to run: a command, or a whole tree.
  for (const tab of document.querySelectorAll('#view-run .tab')) {
    tab.addEventListener('click', () => {
      for (const t of document.querySelectorAll('#view-run .tab')) {
        const on = t === tab;
        t.classList.toggle('active', on);
        t.setAttribute('aria-selected', String(on));
        $(t.dataset.tab).hidden = !on;
      }
    });
  }

  $('tree-file').addEventListener('change', async () => {
    const f = $('tree-file').files[0];
    if (!f) return;
    $('tree-text').value = await f.text();
    const ext = f.name.toLowerCase().split('.').pop();
    $('tree-format').value = ext === 'toml' || ext === 'json' ? ext : 'auto';
  });

  $('tree-form').noValidate = true;
  $('tree-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('tree-form-error');
    const text = $('tree-text').value;
    if (!text.trim()) return showMsg('tree-form-error', 'Give the tree: paste it, or choose a file.');
    let format = $('tree-format').value;
    if (format === 'auto') format = text.trim().startsWith('{') ? 'json' : 'toml';
    let body;
    let opts = {};
    if (format === 'json') {
      try {
        body = JSON.parse(text);
      } catch (e) {
        return showMsg('tree-form-error', 'The tree is not valid JSON: ' + e.message + '. Nothing was run.');
      }
    } else {
      // TOML goes as it is: the server reads it as the CLI does, and names the line of a mistake.
      body = text;
      opts = { type: 'application/toml' };
    }
    const button = $('tree-submit');
    button.disabled = true;
    try {
      const r = await api('POST', '/api/v1/jobs', body, opts);
      location.hash = '#/tree/' + r.id;
    } catch (e) {
      showMsg('tree-form-error', e.message + '. Nothing was run.');
    } finally {
      button.disabled = false;
    }
  });

  function lines(text) {
    return text.split('\n').map((l) => l.trim()).filter(Boolean);
  }

  $('script-form').noValidate = true;
  $('script-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('script-error');
    const nodes = {};
    for (const l of lines($('script-nodes').value)) {
      const i = l.indexOf('=');
      if (i <= 0) return showMsg('script-error', 'Write each node label as label=value (not ' + JSON.stringify(l) + ').');
      nodes[l.slice(0, i).trim()] = l.slice(i + 1).trim();
    }
    const args = $('script-args').value.split('\n').filter((l) => l.length > 0);
    const name = $('script-name').value;
    if (!name) return showMsg('script-error', 'Choose a script.');
    const button = $('script-submit');
    button.disabled = true;
    try {
      const r = await api('POST', '/api/v1/scripts/' + encodeURIComponent(name) + '/run', { nodes, args });
      location.hash = '#/tree/' + r.id;
    } catch (e) {
      showMsg('script-error', e.message);
    } finally {
      button.disabled = false;
    }
  });

  // ---- headquarters --------------------------------------------------------------------------

  function hqWatcherRow(w) {
    return el('tr', { 'data-watcher': w.name },
      el('td', {}, w.name),
      el('td', {}, badge(w.outcome)),
      el('td', {}, timeCell(w.started_at)),
      el('td', { class: 'num' }, w.duration_ms + ' ms'),
      el('td', {}, w.message || ''));
  }

  function hqOrderRow(o) {
    const tree = o.tree ? el('a', { href: '#/tree/' + o.tree, class: 'mono' }, o.tree.slice(0, 8)) : '';
    return el('tr', { 'data-line': String(o.line), 'data-file': o.file },
      el('td', { class: 'mono' }, o.file),
      el('td', { class: 'num' }, String(o.line)),
      el('td', { class: 'mono' }, o.text),
      el('td', {}, badge(o.state)),
      el('td', {}, tree),
      el('td', {}, timeCell(o.finished_at)),
      el('td', {}, o.message || ''));
  }

  async function loadHq() {
    hideMsg('hq-error');
    $('hq-sync').hidden = !st.scopes.has('operate');
    try {
      const [h, o] = await Promise.all([api('GET', '/api/v1/hq'), api('GET', '/api/v1/hq/orders?limit=200')]);
      $('hq-head-id').textContent = h.head ? h.head.id.slice(0, 12) : '';
      $('hq-head-message').textContent = h.head ? h.head.message : '(no commit)';
      $('hq-branch').textContent = h.branch;
      $('hq-remote').textContent = h.remote || '(none: HQ is local only)';
      $('hq-path').textContent = h.path;
      $('hq-last-sync').textContent = h.last_sync
        ? (h.last_sync.ok ? 'ok' : 'failed') + ', ' + ago(h.last_sync.at) + ': ' + h.last_sync.message
        : (h.remote ? 'not yet' : 'no remote');
      if (h.error) showMsg('hq-repo-error', h.error); else hideMsg('hq-repo-error');
      const c = $('hq-conflict');
      c.hidden = !h.conflict;
      c.textContent = h.conflict ? 'Conflict in ' + h.conflict.files.join(', ') + ': ' + h.conflict.message : '';
      $('hq-problems').replaceChildren(...(h.problems || []).map((p) => el('li', { class: 'msg error' }, p.message)));
      $('hq-watchers-body').replaceChildren(...h.watchers.map(hqWatcherRow), ...(h.reaper || []).map((t) => hqWatcherRow({
        name: 'reaper: ' + t.name, outcome: t.ok ? 'ok' : 'failed', started_at: t.started_at, duration_ms: t.duration_ms, message: t.message })));
      const items = o.items.slice().reverse();
      $('hq-orders-body').replaceChildren(...items.map(hqOrderRow));
      $('hq-orders-empty').hidden = items.length > 0;
    } catch (e) {
      if (e.status !== 401) showMsg('hq-error', e.message);
    }
  }

  $('hq-sync').addEventListener('click', async () => {
    const b = $('hq-sync');
    b.disabled = true;
    try {
      await api('POST', '/api/v1/hq/sync');
      await loadHq();
    } catch (e) {
      showMsg('hq-error', e.message);
    } finally {
      b.disabled = false;
    }
  });

  // ---- workspaces ----------------------------------------------------------------------------

  const ROLES = ['viewer', 'operator', 'admin'];

  function roleSelect(value, onchange) {
    const s = el('select', { onchange }, ROLES.map((r) => el('option', { value: r }, r)));
    s.value = value;
    return s;
  }

  async function setMember(ws, user, role, errId) {
    try {
      await api('PUT', '/api/v1/workspaces/' + encodeURIComponent(ws) + '/members/' + encodeURIComponent(user), { role });
      await loadWorkspaces();
    } catch (e) {
      showMsg(errId, e.message);
    }
  }

  function workspaceCard(w) {
    const errId = 'ws-error-' + w.name;
    const err = el('p', { id: errId, class: 'msg error', role: 'alert', hidden: true });
    // Only the workspace's admins manage its members; the others see who is in it.
    const manage = may(w.name, 'admin');
    const rows = (w.members || []).map((m) => {
      if (!manage) {
        return el('tr', { dataset: { member: m.user } }, el('td', {}, m.user), el('td', {}, m.role), el('td', {}));
      }
      const remove = el('button', { type: 'button', class: 'small secondary' });
      twoStep(remove, 'Remove', 'Click again to remove', async () => {
        try {
          await api('DELETE', '/api/v1/workspaces/' + encodeURIComponent(w.name) + '/members/' + encodeURIComponent(m.user));
          await loadWorkspaces();
        } catch (e) {
          showMsg(errId, e.message);
        }
      });
      return el('tr', { dataset: { member: m.user } },
        el('td', {}, m.user),
        el('td', {}, roleSelect(m.role, (e) => setMember(w.name, m.user, e.target.value, errId))),
        el('td', {}, remove));
    });
    const user = el('input', { name: 'user', required: true, placeholder: 'user name' });
    const role = roleSelect('viewer');
    const form = el('form', {
      class: 'inline',
      onsubmit: (e) => {
        e.preventDefault();
        if (user.value.trim()) setMember(w.name, user.value.trim(), role.value, errId);
      },
    }, el('label', {}, 'Add a member', user), el('label', {}, 'Role', role),
    el('button', { type: 'submit', class: 'small' }, 'Add'));
    form.hidden = !manage;
    return el('div', { class: 'card ws', dataset: { workspace: w.name } },
      el('h2', {}, w.name, w.role ? el('span', { class: 'tag' }, 'you: ' + w.role) : null),
      err,
      rows.length ? el('div', { class: 'scroll' }, el('table', { class: 'list' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Member'), el('th', {}, 'Role'), el('th', {}))),
        el('tbody', {}, rows))) : el('p', { class: 'muted' }, 'No members (cluster admins see every workspace).'),
      form);
  }

  async function loadWorkspaces() {
    hideMsg('ws-error');
    const r = await api('GET', '/api/v1/workspaces');
    $('ws-list').replaceChildren(...r.items.map(workspaceCard));
  }

  $('ws-form').noValidate = true;
  $('ws-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('ws-error');
    try {
      await api('POST', '/api/v1/workspaces', { name: $('ws-name').value.trim() });
      $('ws-name').value = '';
      await loadWorkspaces();
    } catch (e) {
      showMsg('ws-error', e.message);
    }
  });

  // ---- tokens --------------------------------------------------------------------------------

  async function loadTokens() {
    const r = await api('GET', '/api/v1/tokens');
    $('tokens-body').replaceChildren(...r.items.map((t) => {
      const revoke = el('button', { type: 'button', class: 'small secondary', dataset: { action: 'revoke' } });
      twoStep(revoke, 'Revoke', 'Click again to revoke', async () => {
        try {
          await api('DELETE', '/api/v1/tokens/' + encodeURIComponent(t.id));
          await loadTokens();
        } catch (e) {
          if (e.status !== 401) showMsg('token-error', e.message);
        }
      });
      return el('tr', { dataset: { token: t.id } },
        el('td', { class: 'mono' }, t.prefix + '…'),
        el('td', {}, t.name),
        el('td', {}, t.user || ''),
        el('td', {}, (t.scopes || []).map((s) => el('span', { class: 'tag' }, s))),
        el('td', {}, timeCell(t.created_at)),
        el('td', {}, t.expires_at ? timeCell(t.expires_at) : 'never'),
        el('td', {}, revoke));
    }));
  }

  $('token-form').noValidate = true;
  $('token-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    hideMsg('token-error');
    const name = $('token-name').value.trim();
    const scopes = [...document.querySelectorAll('#token-form input[name=scope]:checked')].map((c) => c.value);
    if (!name) return showMsg('token-error', 'Give the token a name.');
    if (!scopes.length) return showMsg('token-error', 'Choose at least one scope.');
    const body = { name, scopes };
    if ($('token-expiry').value) body.expires_in_s = Number($('token-expiry').value);
    try {
      const t = await api('POST', '/api/v1/tokens', body);
      $('token-secret').textContent = t.token;
      $('token-new').hidden = false;
      $('token-name').value = '';
      await loadTokens();
    } catch (e) {
      showMsg('token-error', e.message);
    }
  });

  // ---- copy buttons --------------------------------------------------------------------------

  document.addEventListener('click', async (ev) => {
    const b = ev.target.closest('[data-copy]');
    if (!b) return;
    const text = $(b.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const r = document.createRange();
      r.selectNodeContents($(b.dataset.copy));
      const sel = getSelection();
      sel.removeAllRanges();
      sel.addRange(r);
      document.execCommand('copy');
    }
    b.textContent = 'Copied';
    setTimeout(() => { b.textContent = 'Copy'; }, 1500);
  });

  // ---- start ---------------------------------------------------------------------------------

  async function boot() {
    if (document.body.dataset.mode === 'setup') {
      show('setup');
      $('setup-code').focus();
      return;
    }
    try {
      await whoami();
    } catch (e) {
      loggedOut(e.status === 401 ? null : e.message);
      return;
    }
    await enterApp();
  }

  window.addEventListener('hashchange', route);
  window.muster = { state: st, JOB_STATES }; // for the browser tests and the curious
  boot();
})();
