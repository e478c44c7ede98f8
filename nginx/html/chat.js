// websocket_chat demo client. Plain JS, no dependencies.
// User-supplied data (names, rooms, message text) only ever reaches the DOM
// through textContent / createTextNode, never through innerHTML.
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
  var app = document.querySelector('.app');

  var MAX_LOG = 1000;           // oldest lines are dropped past this
  var BACKOFF_MIN_MS = 1000;
  var BACKOFF_MAX_MS = 30000;

  var state = {
    want: null,      // {room, nick} the user asked for; null once they leave
    ws: null,
    gen: 0,          // bumps on every new socket; stale callbacks compare and bail
    welcomed: false,
    me: null,        // user name from the last welcome
    room: null,      // room name from the last welcome
    attempt: 0,      // reconnect attempts since the last welcome
    retryAt: 0,
    retryTimer: null,
    tickTimer: null,
    closeInfo: ''
  };

  // ---- helpers -------------------------------------------------------------

  function pad2(n) { return (n < 10 ? '0' : '') + n; }

  function eventDate(ts) {
    var d = typeof ts === 'number' && isFinite(ts) ? new Date(ts) : new Date();
    return isNaN(d.getTime()) ? new Date() : d;
  }

  function timeNode(ts) {
    var d = eventDate(ts);
    var t = document.createElement('time');
    t.className = 'time';
    t.dateTime = d.toISOString();
    t.title = d.toLocaleString();
    t.textContent = pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
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

  function str(v) { return v === undefined || v === null ? '' : String(v); }

  function classSafe(type) {
    return str(type).toLowerCase().replace(/[^a-z0-9_-]/g, '') || 'unknown';
  }

  // Append one line to #log: <div class="event event-TYPE">...</div>.
  // `parts` are DOM nodes or plain strings (inserted as text).
  function addLine(type, ts, parts, extraClass) {
    var nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    var div = document.createElement('div');
    div.className = 'event event-' + classSafe(type) + (extraClass ? ' ' + extraClass : '');
    div.appendChild(timeNode(ts));
    div.appendChild(document.createTextNode(' '));
    for (var i = 0; i < parts.length; i++) {
      var p = parts[i];
      div.appendChild(typeof p === 'string' ? document.createTextNode(p) : p);
    }
    log.appendChild(div);
    while (log.childElementCount > MAX_LOG) log.removeChild(log.firstElementChild);
    if (nearBottom) log.scrollTop = log.scrollHeight;
    return div;
  }

  // Lines produced by the page itself (connection state), not by the server.
  function addLocal(text) {
    return addLine('local', Date.now(), [text]);
  }

  function setStatus(kind, text) {
    statusLine.dataset.state = kind;
    statusLine.textContent = text;
    statusLine.title = text;
  }

  function setComposer(enabled) {
    textInput.disabled = !enabled;
    sendButton.disabled = !enabled;
    textInput.placeholder = enabled
      ? 'Message #' + (state.room || '')
      : (state.want ? 'Waiting for the server…' : 'Join a room to chat');
  }

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

  function wsUrl(room, nick) {
    var scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + '/ws?room=' + encodeURIComponent(room) +
      '&nick=' + encodeURIComponent(nick);
  }

  // ---- connection ------------------------------------------------------------

  function clearRetry() {
    if (state.retryTimer) clearTimeout(state.retryTimer);
    if (state.tickTimer) clearInterval(state.tickTimer);
    state.retryTimer = state.tickTimer = null;
  }

  function connect() {
    clearRetry();
    if (!state.want) return;
    var gen = ++state.gen;
    var want = state.want;
    state.welcomed = false;
    setComposer(false);
    setStatus(state.attempt ? 'reconnecting' : 'connecting',
      (state.attempt ? 'reconnecting' : 'connecting') + ' to ' + want.room + '…');

    var ws;
    try {
      ws = new WebSocket(wsUrl(want.room, want.nick));
    } catch (e) {
      addLine('error', Date.now(), ['cannot open WebSocket: ' + str(e && e.message)]);
      scheduleReconnect('cannot open WebSocket');
      return;
    }
    state.ws = ws;

    ws.onopen = function () {
      if (gen !== state.gen) return;
      setStatus('connecting', 'connected, waiting for welcome…');
    };
    ws.onmessage = function (msg) {
      if (gen !== state.gen) return;
      handleFrame(msg.data);
    };
    ws.onerror = function () { /* a close event always follows */ };
    ws.onclose = function (ev) {
      if (gen !== state.gen) return;
      var wasWelcomed = state.welcomed;
      state.ws = null;
      state.welcomed = false;
      setComposer(false);
      var why = describeClose(ev);
      // One line per lost connection, not one per failed retry.
      if (wasWelcomed || state.attempt === 0) addLocal('disconnected: ' + why);
      scheduleReconnect(why);
    };
  }

  function scheduleReconnect(why) {
    clearRetry();
    if (!state.want) return;
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, state.attempt));
    var delay = Math.round(base * (0.8 + Math.random() * 0.4));
    state.attempt++;
    state.closeInfo = why;
    state.retryAt = Date.now() + delay;
    var tick = function () {
      var left = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
      setStatus('reconnecting', 'closed, ' + why + ' · retry in ' + left + 's');
    };
    tick();
    state.tickTimer = setInterval(tick, 500);
    state.retryTimer = setTimeout(connect, delay);
  }

  function disconnect(reason) {
    clearRetry();
    state.gen++;              // silence the old socket's callbacks
    if (state.ws) {
      try { state.ws.close(1000, reason); } catch (e) { /* already closing */ }
    }
    state.ws = null;
    state.welcomed = false;
  }

  // ---- server events ---------------------------------------------------------

  function handleFrame(data) {
    var ev;
    try {
      ev = JSON.parse(data);
    } catch (e) {
      addLine('error', Date.now(), ['unreadable frame from server: ' + str(data).slice(0, 200)]);
      return;
    }
    if (!ev || typeof ev !== 'object') {
      addLine('error', Date.now(), ['unexpected frame from server: ' + str(data).slice(0, 200)]);
      return;
    }
    var mine = state.me !== null && ev.user === state.me;
    switch (ev.type) {
      case 'welcome':
        state.me = str(ev.user);
        state.room = str(ev.room);
        state.welcomed = true;
        state.attempt = 0;
        addLine('welcome', ev.ts, ['joined ', strong(state.room), ' as ', strong(state.me)]);
        setStatus('open', 'connected · ' + state.room + ' as ' + state.me);
        setComposer(true);
        document.title = '#' + state.room + ' · websocket_chat';
        textInput.focus();
        break;
      case 'message': {
        var text = document.createElement('span');
        text.className = 'text';
        text.textContent = str(ev.text);
        var line = addLine('message', ev.ts, [userNode(ev.user), text], mine ? 'mine' : '');
        if (ev.id !== undefined) line.dataset.id = str(ev.id);
        break;
      }
      case 'join':
        addLine('join', ev.ts, [userNode(ev.user), mine ? ' (you) joined' : ' joined']);
        break;
      case 'leave':
        addLine('leave', ev.ts, [userNode(ev.user), ' left']);
        break;
      case 'error':
        addLine('error', ev.ts, ['error' + (ev.code ? ' ' + str(ev.code) : '') +
          (ev.message ? ': ' + str(ev.message) : '')]);
        break;
      default:
        addLine(ev.type, ev.ts, [str(ev.type) + ': ' + str(data).slice(0, 300)]);
    }
  }

  // ---- UI --------------------------------------------------------------------

  joinForm.addEventListener('submit', function (e) {
    e.preventDefault();
    var room = roomInput.value.trim() || 'lobby';
    var nick = nickInput.value.trim();
    roomInput.value = room;
    if (state.want) {
      disconnect('switching room');
      addLocal('left ' + state.want.room);
    }
    state.want = { room: room, nick: nick };
    state.attempt = 0;
    leaveButton.hidden = false;
    joinButton.textContent = 'Rejoin';
    app.classList.add('in-room');
    try {
      var q = new URLSearchParams(location.search);
      q.set('room', room);
      if (nick) q.set('nick', nick); else q.delete('nick');
      history.replaceState(null, '', location.pathname + '?' + q.toString());
    } catch (err) { /* history not available: fine */ }
    connect();
  });

  leaveButton.addEventListener('click', function () {
    if (!state.want) return;
    var room = state.want.room;
    state.want = null;
    disconnect('leaving');
    leaveButton.hidden = true;
    joinButton.textContent = 'Join';
    app.classList.remove('in-room');
    setComposer(false);
    setStatus('idle', 'not connected');
    addLocal('left ' + room);
    document.title = 'websocket_chat';
  });

  composeForm.addEventListener('submit', function (e) {
    e.preventDefault();
    var text = textInput.value;
    if (text.trim() === '' || !state.ws || !state.welcomed ||
        state.ws.readyState !== WebSocket.OPEN) return;
    state.ws.send(text);
    textInput.value = '';
    textInput.focus();
  });

  // Coming back online: don't sit out the rest of a long backoff.
  window.addEventListener('online', function () {
    if (state.want && !state.ws && state.retryTimer) connect();
  });

  // Prefill from ?room= / ?nick=.
  var params = new URLSearchParams(location.search);
  if (params.get('room')) roomInput.value = params.get('room');
  if (params.get('nick')) nickInput.value = params.get('nick');
  if (!roomInput.value) roomInput.value = 'lobby';
  setComposer(false);
  (nickInput.value ? joinButton : nickInput).focus();
})();
