// The muster dashboard: plain JavaScript, no framework, nothing loaded from elsewhere.
// Everything comes from this server's /api/v1 with the session cookie (and the CSRF token on
// every write); live updates arrive over /api/v1/events/ws. Pages are never polled.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const PAGE = 25;
  const JOB_STATES = ['waiting', 'running', 'succeeded', 'failed', 'aborted'];

  const st = {
    user: null, admin: false,
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

  function csrf() {
    const m = document.cookie.match(/(?:^|;\s*)muster_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : '';
  }

  function when(ts) {
    if (!ts) return '';
    const d = new Date(ts);
    return isNaN(d) ? String(ts) : d.toLocaleString();
  }

  function ago(ts) {
    if (!ts) return 'never';
    const s = Math.round((Date.now() - new Date(ts).getTime()) / 1000);
    if (isNaN(s)) return String(ts);
    if (s < 5) return 'just now';
    if (s < 90) return s + ' s ago';
    if (s < 5400) return Math.round(s / 60) + ' min ago';
    if (s < 129600) return Math.round(s / 3600) + ' h ago';
    return Math.round(s / 86400) + ' d ago';
  }

  function timeCell(ts, relative) {
    return el('time', { datetime: ts || '', title: when(ts), class: relative ? 'rel' : null, dataset: { ts: ts || '' } },
      relative ? ago(ts) : when(ts));
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

  /** One API call. With opts.token: as that bearer token; else the session cookie (+ CSRF). */
  async function api(method, path, body, opts = {}) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (opts.token) headers.Authorization = 'Bearer ' + opts.token;
    else if (method !== 'GET') headers['X-CSRF-Token'] = csrf();
    let resp;
    try {
      resp = await fetch(path, {
        method, headers, credentials: 'same-origin',
        body: body === undefined ? undefined : JSON.stringify(body),
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
    const { parts, query } = parseHash();
    const view = parts[0] || 'jobs';
    try {
      if (view === 'nodes') { show('nodes'); await loadNodes(); }
      else if (view === 'tree' && parts[1]) { show('tree'); await openTree(parts[1], parts[2]); }
      else if (view === 'run') { show('run'); await loadRun(); }
      else if (view === 'workspaces') { show('workspaces'); await loadWorkspaces(); }
      else if (view === 'tokens') { show('tokens'); await loadTokens(); }
      else { show('jobs'); await loadJobs(query); }
    } catch (e) {
      if (e.status !== 401) console.error(e);
    }
  }

  // ---- session -------------------------------------------------------------------------------

  async function whoami() {
    const t = await api('GET', '/api/v1/tokens', undefined, { quiet401: true });
    const mine = (t.items || []).find((x) => x.user);
    st.user = mine ? mine.user : '?';
    try {
      await api('GET', '/api/v1/users', undefined, { quiet401: true });
      st.admin = true;
    } catch (_) {
      st.admin = false;
    }
  }

  async function enterApp() {
    document.body.dataset.mode = 'app';
    $('nav').hidden = false;
    $('who').hidden = false;
    $('whoami').textContent = st.user + (st.admin ? ' (admin)' : '');
    document.body.classList.toggle('is-admin', st.admin);
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
    else if (ev.type === 'lagged') soon('route', route);
  }

  function onTreeEvent(ev) {
    if (st.view === 'jobs') {
      const row = document.querySelector('#jobs-body tr[data-tree="' + CSS.escape(ev.id) + '"]');
      if (row) {
        setBadge(row.querySelector('.state'), ev.state);
        if (ev.state !== 'running') {
          const fin = row.querySelector('.finished');
          fin.replaceChildren(timeCell(ev.at, false));
        }
      } else if (st.jobs.idx === 0) {
        soon('jobs', () => loadJobs(parseHash().query, true));
      }
    }
    if (st.tree && st.tree.id === ev.id) {
      st.tree.state = ev.state;
      setBadge($('tree-state'), ev.state);
      $('tree-abort').hidden = ev.state !== 'running';
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
    const row = document.querySelector('#tree .job[data-job="' + CSS.escape(ev.id) + '"]');
    if (row) {
      setBadge(row.querySelector('.state'), ev.state);
      row.querySelector('.meta').textContent = jobMeta(job);
    }
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
      el('td', {}, timeCell(n.last_seen, true)),
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
    el('td', {}, timeCell(t.created_at, true)),
    el('td', { class: 'finished' }, t.finished_at ? timeCell(t.finished_at, false) : ''))));
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

  function jobMeta(j) {
    const parts = [];
    if (j.key && j.key !== j.name) parts.push('key ' + j.key);
    if (j.node) parts.push('on ' + j.node);
    if (j.attempt > 1) parts.push('attempt ' + j.attempt);
    if (j.exit_code !== null && j.exit_code !== undefined) parts.push('exit ' + j.exit_code);
    if (j.started_at && j.finished_at) {
      const s = (new Date(j.finished_at) - new Date(j.started_at)) / 1000;
      if (!isNaN(s)) parts.push(s.toFixed(1) + ' s');
    }
    return parts.join(' · ');
  }

  function jobItem(j) {
    st.tree.jobs.set(j.id, j);
    const selected = st.log && st.log.id === j.id;
    const row = el('div', {
      class: 'job' + (selected ? ' selected' : ''), tabindex: '0', role: 'button',
      dataset: { job: j.id, key: j.key || '', kind: jobKind(j) },
      title: j.exec ? j.exec.join(' ') : (j.shell || ''),
      onclick: () => selectJob(j.id),
      onkeydown: (e) => { if (e.key === 'Enter') selectJob(j.id); },
    }, badge(j.state), el('span', { class: 'name' }, j.name), el('span', { class: 'meta' }, jobMeta(j)),
    j.error ? el('span', { class: 'err' }, j.error) : null);
    const kids = (j.children || []).map(jobItem);
    return el('li', {}, row, kids.length ? el('ul', {}, kids) : null);
  }

  function firstJob(root, pred) {
    if (pred(root)) return root;
    for (const c of root.children || []) {
      const f = firstJob(c, pred);
      if (f) return f;
    }
    return null;
  }

  async function openTree(id, jobId, refresh) {
    hideMsg('tree-error');
    const asked = performance.now();
    let root;
    try {
      root = await api('GET', '/api/v1/jobs/' + encodeURIComponent(id) + '/tree');
    } catch (e) {
      if (e.status !== 401) showMsg('tree-error', e.message);
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
    $('tree-abort').hidden = root.tree_state !== 'running';
    $('tree').replaceChildren(jobItem(root));
    // Events of this tree that came while the answer was on its way were not applied to it:
    // look once more, so no state change is missed.
    if (st.recent.some((e) => e.tree === treeId && e.t >= asked)) {
      soon('tree', () => openTree(treeId, st.log && st.log.id, true), 50);
    }
    if (refresh && st.log) {
      const j = st.tree.jobs.get(st.log.id);
      if (j && !st.log.sock && j.state !== 'waiting' && st.log.ended !== j.attempt) followLog(j);
      return;
    }
    const pick = (jobId && st.tree.jobs.get(jobId))
      || firstJob(root, (j) => j.state === 'running' && jobKind(j) !== 'group')
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
    followLog(j);
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

  function followLog(j) {
    closeLog();
    st.log = { id: j.id, attempt: j.attempt, sock: null, ended: null };
    const pre = $('log');
    pre.textContent = '';
    pre.dataset.job = j.id;
    $('log-job').textContent = '· ' + j.name;
    const kind = jobKind(j);
    if (kind === 'group' || kind === 'noop') {
      logStatus('');
      pre.textContent = kind === 'group' ? '(a group of jobs: it has no log of its own)' : '(a no-op job: no log)';
      return;
    }
    if (j.state === 'waiting') {
      logStatus('waiting to start…');
      pre.dataset.status = 'waiting';
      return; // Opened when the job's "running" event arrives.
    }
    const log = st.log;
    const sock = new WebSocket(wsUrl('/api/v1/jobs/' + encodeURIComponent(j.id) + '/log/ws'));
    log.sock = sock;
    pre.dataset.status = 'following';
    logStatus(j.state === 'running' ? 'following live…' : 'loading…');
    sock.onmessage = (m) => {
      const nearBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
      pre.append(document.createTextNode(typeof m.data === 'string' ? m.data : ''));
      if (nearBottom) pre.scrollTop = pre.scrollHeight;
    };
    sock.onclose = (e) => {
      if (log.sock !== sock) return;
      log.sock = null;
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
    const [ws, nodes] = await Promise.all([
      api('GET', '/api/v1/workspaces'),
      api('GET', '/api/v1/nodes').catch(() => ({ items: [] })),
    ]);
    const wsSel = $('run-workspace');
    const keep = wsSel.value;
    wsSel.replaceChildren(...ws.items.map((w) => el('option', { value: w.name }, w.name + (w.role ? ' (' + w.role + ')' : ''))));
    if (keep) wsSel.value = keep;
    if (!wsSel.value && st.user) wsSel.value = st.user;
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
    const rows = (w.members || []).map((m) => {
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
        el('td', {}, timeCell(t.created_at, true)),
        el('td', {}, t.expires_at ? timeCell(t.expires_at, false) : 'never'),
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
