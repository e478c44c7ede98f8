// websocket_chat demo client. Plain JS, no dependencies.
// User-supplied data (names, rooms, message text) only ever reaches the DOM
// through textContent / createTextNode, never through innerHTML.
//
// What it does (see README.md, "Wire protocol"):
// * history on entering (history event), members (welcome.members + join /
//   leave), told apart by session id (nickname only when the server sends no
//   session ids);
// * every message id is shown at most once, messages kept in id order;
// * sent messages show "sending…" until their own message event is back
//   (matched by text and one of this tab's session ids, oldest first); they
//   stay at the bottom of the log meanwhile, in the order they were typed;
// * reconnects by itself (exponential backoff with jitter, at once after a
//   1001), resuming with since=<last shown id>; shows gap notes;
// * room and nickname in the URL (?room=&nick=, auto-join) and localStorage.
(function () {
  'use strict';

  var el = function (id) { return document.getElementById(id); };
  var nickInput = el('nick');
  var roomInput = el('room');
  var joinButton = el('join');
  var leaveButton = el('leave');
  var textInput = el('text');
  var sendButton = el('send');
  var log = el('log');
  var statusLine = el('status');
  var joinForm = el('join-form');
  var composeForm = el('compose-form');
  var memberList = el('members');
  var memberCountNode = el('member-count');
  var membersBox = el('members-box');
  var membersNote = el('members-note');
  var app = document.querySelector('.app');

  var MAX_LOG = 1000;              // oldest lines are dropped past this
  var MAX_SEEN = 5000;             // message / presence ids remembered
  var BACKOFF_MIN_MS = 250;
  var BACKOFF_MAX_MS = 4000;        // back within 4 s of the server, whatever the outage
  var HEALTHY_MS = 5000;           // a connection this old resets the backoff
  var GOING_AWAY_MAX_MS = 300;     // after a 1001: reconnect within this
  var WELCOME_TIMEOUT_MS = 10000;  // no welcome this long after connecting: retry
  var HISTORY_WAIT_MS = 1500;      // no history event this long after welcome: none coming
  var STORE_NICK = 'wschat.nick';
  var STORE_ROOM = 'wschat.room';
  var STORE_SESSIONS = 'wschat.sessions';

  var state = {
    want: null,        // {room, nick} the user asked for; null once they leave
    conn: null,        // the current connection (see connect())
    gen: 0,            // bumps on every new socket; stale callbacks compare and bail
    everWelcomed: false, // a welcome since the user pressed Join ("joined" vs "reconnected")
    me: null,          // {user, session} from the last welcome
    room: null,        // room name from the last welcome
    mySessions: [],    // every session id this tab has held, newest last
    members: new Map(), // key -> {user, session, n}
    memberCount: null, // from welcome.count, kept up to date; null: count the list
    ownJoinPending: false,
    seen: new Set(),   // ids of the events shown
    seenOrder: [],
    lastId: null,      // id of the last message shown (the largest, when ids are ordered)
    pending: [],       // sent messages not confirmed yet: {text, el, state, gen, tries, reason, refused}
    attempt: 0,        // reconnects since the last healthy connection
    retryAt: 0,
    retryTimer: null,
    tickTimer: null,
    closeNote: ''
  };

  // ---- storage -------------------------------------------------------------

  function storeGet(store, key) {
    try { return window[store].getItem(key); } catch (e) { return null; }
  }
  function storeSet(store, key, value) {
    try { window[store].setItem(key, value); } catch (e) { /* storage off: fine */ }
  }

  (function loadSessions() {
    try {
      var s = JSON.parse(storeGet('sessionStorage', STORE_SESSIONS) || '[]');
      if (Array.isArray(s)) state.mySessions = s.filter(function (x) { return typeof x === 'string'; });
    } catch (e) { /* ignore */ }
  })();

  function rememberSession(session) {
    if (!session || state.mySessions.indexOf(session) >= 0) return;
    state.mySessions.push(session);
    if (state.mySessions.length > 50) state.mySessions.splice(0, state.mySessions.length - 50);
    storeSet('sessionStorage', STORE_SESSIONS, JSON.stringify(state.mySessions));
  }

  // ---- helpers -------------------------------------------------------------

  function pad2(n) { return (n < 10 ? '0' : '') + n; }
  function str(v) { return v === undefined || v === null ? '' : String(v); }

  function eventDate(ts) {
    var d = typeof ts === 'number' && isFinite(ts) ? new Date(ts) : new Date();
    return isNaN(d.getTime()) ? new Date() : d;
  }

  function timeNode(ts) {
    var d = eventDate(ts);
    var now = new Date();
    var t = document.createElement('time');
    t.className = 'time';
    t.dateTime = d.toISOString();
    t.title = d.toLocaleString();
    var hms = pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
    if (d.toDateString() !== now.toDateString()) {
      hms = d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' + hms;
    }
    t.textContent = hms;
    return t;
  }

  function userHue(name) {
    var h = 0;
    for (var i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return h % 360;
  }

  function userNode(name) {
    var s = document.createElement('span');
    var n = typeof name === 'string' && name !== '' ? name : '?';
    s.className = 'user';
    s.textContent = n;
    s.style.color = 'hsl(' + userHue(n) + ', 60%, 36%)';
    return s;
  }

  function strong(text) {
    var b = document.createElement('strong');
    b.textContent = text;
    return b;
  }

  function classSafe(type) {
    return str(type).toLowerCase().replace(/[^a-z0-9_-]/g, '') || 'unknown';
  }

  // Ids look like "1733050000000-3": compared as (ms, seq). null when either
  // is not of that form (then only "seen or not" is known).
  function parseId(id) {
    var m = /^(\d{1,15})-(\d{1,15})$/.exec(str(id));
    return m ? [Number(m[1]), Number(m[2])] : null;
  }
  function cmpId(a, b) {
    var x = parseId(a), y = parseId(b);
    if (!x || !y) return null;
    return x[0] - y[0] || x[1] - y[1];
  }

  function markSeen(id) {
    state.seen.add(id);
    state.seenOrder.push(id);
    if (state.seenOrder.length > MAX_SEEN) state.seen.delete(state.seenOrder.shift());
  }

  // ---- the log ---------------------------------------------------------------

  // One line: <div class="event event-TYPE">time ...parts</div>. `parts` are
  // DOM nodes or plain strings (inserted as text).
  function makeLine(type, ts, parts, extraClass) {
    var div = document.createElement('div');
    div.className = 'event event-' + classSafe(type) + (extraClass ? ' ' + extraClass : '');
    div.appendChild(timeNode(ts));
    div.appendChild(document.createTextNode(' '));
    for (var i = 0; i < parts.length; i++) {
      var p = parts[i];
      div.appendChild(typeof p === 'string' ? document.createTextNode(p) : p);
    }
    return div;
  }

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  }

  function trimLog() {
    while (log.childElementCount > MAX_LOG) {
      var first = log.firstElementChild;
      if (first.classList.contains('pending')) break;
      log.removeChild(first);
    }
  }

  // The view follows the newest line while it is at the bottom: lines added,
  // lines that grow (a pending line's state), a smaller window. Scrolling up
  // stops that until the reader is back at the bottom.
  var stickToBottom = true;
  function followBottom() {
    if (stickToBottom) log.scrollTop = log.scrollHeight;
  }
  log.addEventListener('scroll', function () { stickToBottom = nearBottom(); });
  if (window.MutationObserver) {
    new MutationObserver(followBottom).observe(log, { childList: true, subtree: true, characterData: true });
  }
  if (window.ResizeObserver) new ResizeObserver(followBottom).observe(log);

  // Put (or move) a line before `ref` (null: at the end); with `stick`, back
  // to the bottom of the log (the user's own message).
  function place(div, ref, stick) {
    log.insertBefore(div, ref && ref.parentNode === log ? ref : null);
    trimLog();
    if (stick) stickToBottom = true;
    followBottom();
    return div;
  }

  // Unconfirmed messages stay at the bottom: everything else goes above them.
  function firstPendingLine() {
    for (var i = 0; i < state.pending.length; i++) {
      if (state.pending[i].el.parentNode === log) return state.pending[i].el;
    }
    return null;
  }

  function addLine(type, ts, parts, extraClass, ref) {
    return place(makeLine(type, ts, parts, extraClass), ref || firstPendingLine());
  }

  // Lines produced by the page itself (connection state), not by the server.
  function addLocal(text, extraClass) {
    return addLine('local', Date.now(), [text], extraClass);
  }

  // Where a message with this id goes: above the pending lines, above any
  // message with a larger id, and above `anchor` (the welcome line, for the
  // history of a fresh join).
  function refFor(id, anchor, self) {
    var ref = anchor && anchor.parentNode === log ? anchor : null;
    var node = ref ? ref.previousElementSibling : log.lastElementChild;
    if (!ref) ref = firstPendingLine();
    for (var steps = 0; node && steps < 500; steps++, node = node.previousElementSibling) {
      if (node === self) continue;
      if (node.classList.contains('pending')) { ref = node; continue; }
      if (!node.classList.contains('event-message') || !node.dataset.id) continue;
      var c = cmpId(node.dataset.id, id);
      if (c !== null && c > 0) { ref = node; continue; }
      break;
    }
    return ref;
  }

  // ---- status and composer ---------------------------------------------------

  function setStatus(kind, text) {
    statusLine.dataset.state = kind;
    statusLine.textContent = text;
    statusLine.title = text;
  }

  function updateStatus() {
    var c = state.conn;
    if (!state.want) {
      setStatus('idle', 'not connected');
    } else if (c && c.welcomed) {
      if (c.interrupted) {
        setStatus('interrupted', 'delivery interrupted · #' + state.room + ' (messages are kept until the server is back)');
      } else {
        setStatus('open', 'connected · #' + state.room + ' as ' + state.me.user);
      }
    } else if (c) {
      setStatus('connecting', (state.everWelcomed || state.attempt ? 'reconnecting to #' : 'connecting to #') +
        state.want.room + '…');
    } else if (state.retryTimer) {
      var left = Math.max(1, Math.ceil((state.retryAt - Date.now()) / 1000));
      setStatus('reconnecting', (state.closeNote ? state.closeNote + ' · ' : '') + 'reconnecting in ' + left + 's');
    } else {
      setStatus('reconnecting', 'reconnecting…');
    }
    updateComposer();
  }

  function updateComposer() {
    var on = !!state.want;
    textInput.disabled = !on;
    sendButton.disabled = !on;
    var c = state.conn;
    textInput.placeholder = !on ? 'Join a room to chat'
      : (c && c.welcomed) ? 'Message #' + (state.room || state.want.room)
      : 'Message #' + state.want.room + ' (sent once connected)';
  }

  // ---- members ---------------------------------------------------------------

  function memberKey(m) {
    return m.session !== undefined && m.session !== null && m.session !== ''
      ? 's:' + str(m.session) : 'u:' + str(m.user);
  }

  function selfKey() {
    return state.me ? memberKey(state.me) : null;
  }

  function addMember(m) {
    var key = memberKey(m);
    var cur = state.members.get(key);
    if (cur) { cur.n++; return false; }
    state.members.set(key, { user: str(m.user), session: str(m.session), n: 1 });
    return true;
  }

  function resetMembers(ev) {
    state.members.clear();
    state.memberCount = typeof ev.count === 'number' && isFinite(ev.count) ? ev.count : null;
    if (Array.isArray(ev.members)) {
      ev.members.forEach(function (m) {
        if (m && typeof m === 'object' && !state.members.has(memberKey(m))) addMember(m);
      });
    }
    if (!state.members.has(selfKey())) addMember(state.me);
    // Without welcome.members, who was here before us is unknown.
    membersNote.hidden = Array.isArray(ev.members);
    state.ownJoinPending = true;
    renderMembers();
  }

  function isSelf(ev) {
    if (!state.me) return false;
    if (state.me.session) return str(ev.session) === state.me.session;
    return !ev.session && str(ev.user) === state.me.user;
  }

  function memberJoined(ev) {
    var key = memberKey(ev);
    if (isSelf(ev) && state.ownJoinPending) {
      // Our own join: already listed since the welcome.
      state.ownJoinPending = false;
      if (!state.members.has(key)) addMember(ev);
    } else if (!state.members.has(key) || !ev.session) {
      // Without session ids, a second join of a nickname is a second member.
      addMember(ev);
      if (state.memberCount !== null) state.memberCount++;
    }
    renderMembers();
  }

  function memberLeft(ev) {
    var key = memberKey(ev);
    var cur = state.members.get(key);
    if (cur) {
      if (cur.n > 1) cur.n--; else state.members.delete(key);
      if (state.memberCount !== null) state.memberCount = Math.max(0, state.memberCount - 1);
    }
    renderMembers();
  }

  function renderMembers() {
    var me = selfKey();
    var list = [];
    var byName = {};
    state.members.forEach(function (m, key) {
      list.push({ key: key, m: m });
      byName[m.user] = (byName[m.user] || 0) + 1;
    });
    list.sort(function (a, b) {
      if ((a.key === me) !== (b.key === me)) return a.key === me ? -1 : 1;
      return a.m.user.localeCompare(b.m.user) || a.key.localeCompare(b.key);
    });
    var frag = document.createDocumentFragment();
    var total = 0;
    list.forEach(function (x) {
      var li = document.createElement('li');
      li.className = 'member' + (x.key === me ? ' me' : '');
      if (x.m.session) li.dataset.session = x.m.session;
      li.appendChild(userNode(x.m.user));
      if (byName[x.m.user] > 1 && x.m.session) {
        var tag = document.createElement('span');
        tag.className = 'tag';
        tag.textContent = '#' + x.m.session.slice(-4);
        tag.title = 'session ' + x.m.session;
        li.appendChild(tag);
      }
      if (x.m.n > 1) {
        var n = document.createElement('span');
        n.className = 'tag';
        n.textContent = '×' + x.m.n;
        li.appendChild(n);
      }
      if (x.key === me) {
        var you = document.createElement('span');
        you.className = 'you';
        you.textContent = '(you)';
        li.appendChild(you);
      }
      total += x.m.n;
      frag.appendChild(li);
    });
    memberList.textContent = '';
    memberList.appendChild(frag);
    var count = state.memberCount !== null ? Math.max(state.memberCount, list.length) : total;
    memberCountNode.textContent = String(count);
  }

  // ---- messages and the pending ones -------------------------------------------

  function isMine(ev) {
    if (!state.me) return false;
    if (state.me.session) {
      return ev.session !== undefined && ev.session !== null &&
        state.mySessions.indexOf(str(ev.session)) >= 0;
    }
    return !ev.session && str(ev.user) === state.me.user;
  }

  function textNode(text) {
    var span = document.createElement('span');
    span.className = 'text';
    span.textContent = text;
    return span;
  }

  function setLineState(p) {
    var line = p.el;
    var box = line.querySelector('.state');
    if (!box) {
      box = document.createElement('span');
      box.className = 'state';
      line.appendChild(box);
    }
    box.textContent = '';
    line.classList.toggle('failed', p.state === 'failed');
    line.classList.toggle('queued', p.state === 'queued');
    line.dataset.pending = p.state;
    if (p.state === 'failed') {
      box.appendChild(document.createTextNode('not sent: ' + p.reason + ' '));
      if (state.want) {
        var retry = document.createElement('button');
        retry.type = 'button';
        retry.className = 'link retry';
        retry.textContent = 'Retry';
        retry.addEventListener('click', function () { retryPending(p); });
        box.appendChild(retry);
      }
      var drop = document.createElement('button');
      drop.type = 'button';
      drop.className = 'link discard';
      drop.textContent = 'Discard';
      drop.addEventListener('click', function () { discardPending(p); });
      box.appendChild(drop);
    } else {
      box.textContent = p.state === 'queued' ? 'waiting for the connection…' : 'sending…';
    }
  }

  function newPending(text) {
    var me = state.me ? state.me.user : (state.want && state.want.nick) || 'you';
    var line = makeLine('message', Date.now(), [userNode(me), textNode(text)], 'mine pending');
    var p = { text: text, el: line, state: 'queued', gen: 0, tries: 0, reason: '', refused: false };
    state.pending.push(p);
    setLineState(p);
    place(line, null, true);
    return p;
  }

  function fail(p, reason, refused) {
    p.state = 'failed';
    p.reason = reason;
    p.refused = !!refused;
    setLineState(p);
  }

  function retryPending(p) {
    var i = state.pending.indexOf(p);
    if (i < 0) return;
    state.pending.splice(i, 1);
    state.pending.push(p);
    p.state = 'queued';
    p.tries = 0;
    setLineState(p);
    place(p.el, null, true);
    flush();
  }

  function discardPending(p) {
    var i = state.pending.indexOf(p);
    if (i >= 0) state.pending.splice(i, 1);
    if (p.el.parentNode) p.el.parentNode.removeChild(p.el);
  }

  function canSend() {
    var c = state.conn;
    return !!(c && c.welcomed && c.historyState !== 'waiting' &&
              c.ws.readyState === WebSocket.OPEN);
  }

  function flush() {
    if (!canSend()) return;
    var c = state.conn;
    for (var i = 0; i < state.pending.length; i++) {
      var p = state.pending[i];
      if (p.state !== 'queued') continue;
      try {
        c.ws.send(p.text);
      } catch (e) {
        return;    // the close event follows; it stays queued
      }
      p.state = 'sent';
      p.gen = c.gen;
      p.tries++;
      setLineState(p);
    }
  }

  // The pending line a message event of ours confirms: the oldest one with
  // that text still sending, else one marked failed (a refusal put on the
  // wrong line: it moves to the newest line of that connection still sending),
  // else one about to be sent again.
  function takePending(text) {
    var i, idx = -1;
    for (i = 0; i < state.pending.length && idx < 0; i++) {
      if (state.pending[i].text === text && state.pending[i].state === 'sent') idx = i;
    }
    for (i = 0; i < state.pending.length && idx < 0; i++) {
      if (state.pending[i].text === text && state.pending[i].state === 'failed') idx = i;
    }
    for (i = 0; i < state.pending.length && idx < 0; i++) {
      // Waiting to be sent again, yet it did arrive after all: not again.
      if (state.pending[i].text === text && state.pending[i].state === 'queued' &&
          state.pending[i].tries > 0) idx = i;
    }
    if (idx < 0) return null;
    var p = state.pending.splice(idx, 1)[0];
    if (p.state === 'failed' && p.refused) {
      for (i = state.pending.length - 1; i >= 0; i--) {
        var q = state.pending[i];
        if (q.state === 'sent' && q.gen === p.gen) { fail(q, p.reason, true); break; }
      }
    }
    return p;
  }

  // A refusal (rate_limited, backlog_full, ...) names no message: it is put on
  // the newest line of this connection still sending (bursts are refused at
  // their end).
  function refuseNewest(reason) {
    var gen = state.conn ? state.conn.gen : -1;
    for (var i = state.pending.length - 1; i >= 0; i--) {
      var p = state.pending[i];
      if (p.state === 'sent' && p.gen === gen) { fail(p, reason, true); return; }
    }
  }

  function showMessage(ev, anchor) {
    var id = str(ev.id);
    if (id && state.seen.has('m' + id)) return;     // history / live overlap
    if (id) markSeen('m' + id);
    var text = str(ev.text);
    var mine = isMine(ev);
    var p = mine ? takePending(text) : null;
    var line;
    if (p) {
      line = p.el;
      line.className = 'event event-message mine';
      delete line.dataset.pending;
      var st = line.querySelector('.state');
      if (st) line.removeChild(st);
      line.replaceChild(timeNode(ev.ts), line.querySelector('.time'));
      line.replaceChild(userNode(ev.user), line.querySelector('.user'));
    } else {
      line = makeLine('message', ev.ts, [userNode(ev.user), textNode(text)], mine ? 'mine' : '');
    }
    if (id) line.dataset.id = id;
    if (ev.session) line.dataset.session = str(ev.session);
    place(line, refFor(id, anchor, line), !!p);
    if (id && (state.lastId === null || cmpId(id, state.lastId) === null || cmpId(id, state.lastId) > 0)) {
      state.lastId = id;
    }
  }

  function showPresence(ev, live, anchor) {
    var id = str(ev.id);
    if (id && state.seen.has('p' + id)) return;
    if (id) markSeen('p' + id);
    var self = isSelf(ev);
    if (live) {
      if (ev.type === 'join') memberJoined(ev); else memberLeft(ev);
      // Our own join after a reconnect says nothing the welcome line did not.
      if (self && ev.type === 'join' && state.conn && !state.conn.fresh) return;
    }
    var verb = ev.type === 'join' ? ' joined' : ' left';
    var you = self && live && ev.type === 'join' ? ' (you)' : '';
    addLine(ev.type, ev.ts, [userNode(str(ev.user)), you + verb], '', anchor);
  }

  function showGap(ev, anchor) {
    var c = state.conn;
    if (c && c.gapShown) return;
    if (c) c.gapShown = true;
    var msg = str(ev.message) ||
      'Some messages could not be recovered: they are older than what the server keeps.';
    addLine('gap', ev.ts, [msg], '', anchor);
  }

  // The history event (or its absence) has been seen on this connection:
  // lines sent on an earlier one and still unconfirmed were not published if
  // the server keeps history (send them again), unknown otherwise.
  function historyDone(haveHistory) {
    var c = state.conn;
    if (!c || c.historyState !== 'waiting') return;
    c.historyState = haveHistory ? 'done' : 'absent';
    if (c.historyTimer) clearTimeout(c.historyTimer);
    for (var i = 0; i < state.pending.length; i++) {
      var p = state.pending[i];
      if (p.state !== 'sent' || p.gen === c.gen) continue;
      if (haveHistory && p.tries < 2) {
        p.state = 'queued';
        setLineState(p);
      } else {
        fail(p, 'the connection was lost before the server confirmed it');
      }
    }
    flush();
  }

  // ---- server events -----------------------------------------------------------

  var ERROR_TEXT = {
    rate_limited: 'You are sending too fast: that message was not sent.',
    backlog_full: 'The server cannot deliver messages right now and its backlog is full: that message was not sent.',
    not_joined: 'That message was sent before the room was joined: not sent.',
    publish_refused: 'The server refused to publish that message.',
    redis_unavailable: 'Delivery interrupted: the chat server lost its connection to Redis. ' +
      'Messages sent now are kept and delivered when it is back.',
    room_refused: 'The server refused this room.',
    bad_since: 'Could not resume from the last message seen; showing recent messages instead.'
  };
  var REFUSAL_REASON = {
    rate_limited: 'sending too fast',
    backlog_full: 'server backlog full',
    not_joined: 'not joined yet',
    publish_refused: 'refused by the server'
  };
  var NOTICE_TEXT = {
    redis_available: 'Delivery resumed.'
  };

  function readable(table, ev, kind) {
    var code = str(ev.code);
    if (table[code]) return table[code];
    var msg = str(ev.message);
    return msg ? msg + (code ? ' (' + code + ')' : '') : kind + (code ? ': ' + code : '');
  }

  function handleFrame(data) {
    var ev;
    try {
      ev = JSON.parse(data);
    } catch (e) {
      ev = null;
    }
    if (!ev || typeof ev !== 'object' || typeof ev.type !== 'string') {
      addLine('error', Date.now(), ['The server sent something this page does not understand.']);
      return;
    }
    var c = state.conn;
    if (ev.type !== 'welcome' && ev.type !== 'history' && ev.type !== 'gap' &&
        ev.type !== 'error' && ev.type !== 'notice' && c && c.historyState === 'waiting') {
      historyDone(false);     // this server sends no history
    }
    switch (ev.type) {
      case 'welcome':
        onWelcome(ev);
        break;
      case 'history': {
        var anchor = c && c.fresh ? c.welcomeLine : null;
        var list = Array.isArray(ev.messages) ? ev.messages : [];
        for (var i = 0; i < list.length; i++) {
          var m = list[i];
          if (!m || typeof m !== 'object') continue;
          if (m.type === 'join' || m.type === 'leave') showPresence(m, false, anchor);
          else if (m.type === undefined || m.type === 'message') showMessage(m, anchor);
        }
        if (ev.gap) showGap(ev, anchor);
        historyDone(true);
        break;
      }
      case 'gap':
        showGap(ev, c && c.fresh ? c.welcomeLine : null);
        break;
      case 'message':
        showMessage(ev, null);
        break;
      case 'join':
      case 'leave':
        showPresence(ev, true, null);
        break;
      case 'error': {
        var code = str(ev.code);
        var line = addLine('error', ev.ts, [readable(ERROR_TEXT, ev, 'error')]);
        line.dataset.code = code;
        if (ev.message) line.title = str(ev.message);
        if (REFUSAL_REASON[code]) refuseNewest(REFUSAL_REASON[code]);
        if (code === 'redis_unavailable' && c) { c.interrupted = true; updateStatus(); }
        if (code === 'bad_since') state.lastId = null;
        break;
      }
      case 'notice': {
        var ncode = str(ev.code);
        var nline = addLine('notice', ev.ts, [readable(NOTICE_TEXT, ev, 'notice')]);
        nline.dataset.code = ncode;
        if (ev.message) nline.title = str(ev.message);
        if (ncode === 'redis_available' && c) { c.interrupted = false; updateStatus(); }
        break;
      }
      default:
        // A newer server's event this page does not know: nothing to show.
        break;
    }
  }

  function onWelcome(ev) {
    var c = state.conn;
    if (!c) return;
    c.welcomed = true;
    if (c.welcomeTimer) clearTimeout(c.welcomeTimer);
    var user = str(ev.user) || state.want.nick;
    var session = ev.session !== undefined && ev.session !== null ? str(ev.session) : '';
    state.me = { user: user, session: session };
    rememberSession(session);
    state.room = str(ev.room) || state.want.room;
    // The server may change the nickname (trimmed, cut, guest-NNNN): keep it
    // for reconnects, the form, the URL and the next visit.
    if (user !== state.want.nick || state.room !== state.want.room) {
      state.want.nick = user;
      state.want.room = state.room;
      nickInput.value = user;
      roomInput.value = state.room;
      saveWanted();
    }
    c.fresh = !state.everWelcomed;
    state.everWelcomed = true;
    c.welcomeLine = addLine('welcome', ev.ts, c.fresh
      ? ['joined ', strong(state.room), ' as ', strong(user)]
      : ['reconnected to ', strong(state.room), ' as ', strong(user)]);
    resetMembers(ev);
    c.historyState = 'waiting';
    c.historyTimer = setTimeout(function () { if (state.conn === c) historyDone(false); }, HISTORY_WAIT_MS);
    c.healthyTimer = setTimeout(function () { if (state.conn === c) state.attempt = 0; }, HEALTHY_MS);
    document.title = '#' + state.room + ' · websocket_chat';
    updateStatus();
    if (document.activeElement === document.body || document.activeElement === joinButton) textInput.focus();
  }

  // ---- connection ------------------------------------------------------------

  var CLOSE_NAMES = {
    1000: 'normal closure',
    1001: 'server going away',
    1002: 'protocol error',
    1003: 'unsupported data',
    1005: 'no status code',
    1006: 'connection lost',
    1007: 'invalid UTF-8',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'server error',
    1015: 'TLS failure'
  };

  function describeClose(ev) {
    var s = 'code ' + ev.code;
    var name = CLOSE_NAMES[ev.code];
    if (name) s += ' (' + name + ')';
    if (ev.reason) s += ': ' + ev.reason;
    return s;
  }

  function wsUrl(room, nick, since) {
    var scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + '/ws?room=' + encodeURIComponent(room) +
      '&nick=' + encodeURIComponent(nick) + (since ? '&since=' + encodeURIComponent(since) : '');
  }

  function clearTimers(c) {
    if (!c) return;
    ['welcomeTimer', 'historyTimer', 'healthyTimer'].forEach(function (k) {
      if (c[k]) clearTimeout(c[k]);
      c[k] = null;
    });
  }

  function clearRetry() {
    if (state.retryTimer) clearTimeout(state.retryTimer);
    if (state.tickTimer) clearInterval(state.tickTimer);
    state.retryTimer = state.tickTimer = null;
  }

  function backoffDelay() {
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, state.attempt));
    state.attempt++;
    return Math.round(base / 2 + Math.random() * base / 2);
  }

  function connect() {
    clearRetry();
    if (!state.want) return;
    var gen = ++state.gen;
    var ws;
    try {
      ws = new WebSocket(wsUrl(state.want.room, state.want.nick, state.lastId));
    } catch (e) {
      state.conn = null;
      addLine('error', Date.now(), ['Cannot open a WebSocket: ' + str(e && e.message)]);
      scheduleReconnect(backoffDelay(), '');
      return;
    }
    var c = { ws: ws, gen: gen, welcomed: false, historyState: 'none', interrupted: false,
              gapShown: false, fresh: false, welcomeLine: null };
    state.conn = c;
    c.welcomeTimer = setTimeout(function () {
      if (state.conn !== c || c.welcomed) return;
      state.gen++;             // silence its callbacks
      try { ws.close(); } catch (e) { /* fine */ }
      state.conn = null;
      if (state.attempt === 0) addLocal('no answer from the server');
      scheduleReconnect(backoffDelay(), 'no answer');
    }, WELCOME_TIMEOUT_MS);

    ws.onmessage = function (msg) {
      if (gen !== state.gen) return;
      handleFrame(msg.data);
    };
    ws.onerror = function () { /* a close event always follows */ };
    ws.onclose = function (ev) {
      if (gen !== state.gen) return;
      onClose(c, ev);
    };
    updateStatus();
  }

  function onClose(c, ev) {
    clearTimers(c);
    state.conn = null;
    var why = describeClose(ev);
    var policy = ev.code === 1008 || ev.code === 1009 || ev.code === 1003;
    var delay, note = '';
    if (policy) {
      var reason = str(ev.reason) || CLOSE_NAMES[ev.code];
      addLine('error', Date.now(), ['The server closed the connection: ' + reason + ' (' + why + ')']);
      note = 'closed: ' + reason;
      if (ev.code === 1009) {
        // The message just sent was too long: do not send it again by itself.
        for (var i = state.pending.length - 1; i >= 0; i--) {
          var p = state.pending[i];
          if (p.state === 'sent' && p.gen === c.gen) { fail(p, 'too long for this server'); break; }
        }
      }
      state.attempt = Math.max(state.attempt, 3);   // not at once: ~2 s and up
      delay = backoffDelay();
    } else {
      // One line per lost connection, not one per failed retry.
      if (c.welcomed || state.attempt === 0) addLocal('disconnected: ' + why, 'disconnected');
      if (ev.code === 1001 && c.welcomed) {
        // Reload or shutdown: a new worker is there already.
        delay = Math.round(20 + Math.random() * (GOING_AWAY_MAX_MS - 20));
        state.attempt = Math.max(state.attempt, 1);
      } else {
        delay = backoffDelay();
      }
    }
    scheduleReconnect(delay, note);
  }

  function scheduleReconnect(delay, note) {
    clearRetry();
    if (!state.want) return;
    state.closeNote = note || '';
    state.retryAt = Date.now() + delay;
    state.retryTimer = setTimeout(connect, delay);
    state.tickTimer = setInterval(updateStatus, 250);
    updateStatus();
  }

  function disconnect(reason) {
    clearRetry();
    state.gen++;              // silence the old socket's callbacks
    var c = state.conn;
    state.conn = null;
    if (c) {
      clearTimers(c);
      try { c.ws.close(1000, reason); } catch (e) { /* already closing */ }
    }
  }

  function reconnectNow() {
    if (state.want && !state.conn && state.retryTimer) connect();
  }

  // ---- join / leave ----------------------------------------------------------

  function saveWanted() {
    if (!state.want) return;
    storeSet('localStorage', STORE_ROOM, state.want.room);
    storeSet('localStorage', STORE_NICK, state.want.nick);
    setQuery(state.want.room, state.want.nick);
  }

  function setQuery(room, nick) {
    try {
      var q = new URLSearchParams(location.search);
      if (room) q.set('room', room); else q.delete('room');
      if (nick) q.set('nick', nick); else q.delete('nick');
      var s = q.toString();
      history.replaceState(history.state, '', location.pathname + (s ? '?' + s : '') + location.hash);
    } catch (err) { /* history not available: fine */ }
  }

  function resetRoom() {
    state.pending.length = 0;
    log.textContent = '';
    stickToBottom = true;
    state.seen.clear();
    state.seenOrder.length = 0;
    state.lastId = null;
    state.me = null;
    state.members.clear();
    state.memberCount = null;
    membersNote.hidden = true;
    state.everWelcomed = false;
    state.attempt = 0;
    renderMembers();
  }

  function join(room, nick) {
    if (state.want) disconnect('switching room');
    resetRoom();
    state.want = { room: room, nick: nick };
    saveWanted();
    leaveButton.hidden = false;
    joinButton.textContent = 'Rejoin';
    app.classList.add('in-room');
    connect();
  }

  function leave() {
    if (!state.want) return;
    var room = state.want.room;
    state.want = null;
    disconnect('leaving');
    state.pending.forEach(function (p) { fail(p, 'you left the room'); });
    state.pending.length = 0;
    setQuery(room, '');      // a reload then does not join again
    leaveButton.hidden = true;
    joinButton.textContent = 'Join';
    app.classList.remove('in-room');
    updateStatus();
    addLocal('left ' + room);
    document.title = 'websocket_chat';
  }

  joinForm.addEventListener('submit', function (e) {
    e.preventDefault();
    var room = roomInput.value.trim() || 'lobby';
    roomInput.value = room;
    join(room, nickInput.value.trim());
  });

  leaveButton.addEventListener('click', leave);

  composeForm.addEventListener('submit', function (e) {
    e.preventDefault();
    var text = textInput.value;
    if (!state.want || text.trim() === '') return;
    newPending(text);
    textInput.value = '';
    textInput.focus();
    flush();
  });

  // Coming back online or to the tab: don't sit out the rest of a long backoff.
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', function () {
    if (document.visibilityState === 'visible') reconnectNow();
  });

  // ---- start -----------------------------------------------------------------

  if (window.matchMedia && window.matchMedia('(max-width: 520px)').matches) membersBox.open = false;

  var params = new URLSearchParams(location.search);
  var qRoom = (params.get('room') || '').trim();
  var qNick = (params.get('nick') || '').trim();
  roomInput.value = qRoom || storeGet('localStorage', STORE_ROOM) || 'lobby';
  nickInput.value = params.has('nick') ? qNick : (storeGet('localStorage', STORE_NICK) || '');
  updateStatus();
  renderMembers();
  if (qRoom && qNick) {
    join(qRoom, qNick);      // room and nickname in the URL: join at once
  } else {
    (nickInput.value ? joinButton : nickInput).focus();
  }
})();
