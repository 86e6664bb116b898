// flashmoe's chat page: talks to this server's OpenAI-compatible API (streamed chat
// completions) and charts /v1/metrics/stream. Plain script, no dependencies.
'use strict';

const $ = (id) => document.getElementById(id);
const KEYS = { history: 'flashmoe.history.v1', settings: 'flashmoe.settings.v1', key: 'flashmoe.api-key' };
/** Points each chart keeps (half-second intervals: the last minute). */
const POINTS = 120;

const ui = {
  messages: $('messages'), empty: $('empty'), prompt: $('prompt'), send: $('send'), stop: $('stop'),
  status: $('status'), composer: $('composer'), extraError: $('extra-error'),
  keyDialog: $('key-dialog'), keyInput: $('key-input'), keyError: $('key-error'), keyButton: $('key-button'),
};

// ---------- storage ----------

function loadJson(storage, key, fallback) {
  try {
    const v = JSON.parse(storage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

function saveJson(storage, key, value) {
  try {
    storage.setItem(key, JSON.stringify(value));
  } catch (e) {
    setStatus(`Could not save the conversation in this browser: ${e.message}`);
  }
}

/** The conversation: {role: 'user', content} and {role: 'assistant', content, reasoning,
 * tool_calls, finish, stopped, error, stats, usage}. */
let messages = loadJson(localStorage, KEYS.history, []);
if (!Array.isArray(messages)) messages = [];
for (const m of messages) {
  // a reply cut short by a reload
  if (m.role === 'assistant' && !m.finish && !m.stopped && !m.error) m.stopped = true;
}

let saveTimer = null;
function saveHistory(now) {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (now) saveJson(localStorage, KEYS.history, messages);
  else saveTimer = setTimeout(() => saveHistory(true), 400);
}

// ---------- settings ----------

const SETTINGS = ['system', 'temperature', 'top_p', 'max_tokens', 'thinking', 'extra'];

function loadSettings() {
  const s = loadJson(localStorage, KEYS.settings, {});
  for (const id of SETTINGS) {
    const el = $(id);
    if (!(id in s)) continue;
    if (el.type === 'checkbox') el.checked = !!s[id];
    else el.value = s[id];
  }
}

function saveSettings() {
  const s = {};
  for (const id of SETTINGS) {
    const el = $(id);
    s[id] = el.type === 'checkbox' ? el.checked : el.value;
  }
  saveJson(localStorage, KEYS.settings, s);
}

/** The number in field `id` within [lo, hi], or an error naming the field. */
function numberField(id, name, lo, hi, integer) {
  const raw = $(id).value.trim();
  const v = Number(raw);
  if (raw === '' || !Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    throw new Error(`${name} must be ${integer ? 'a whole number' : 'a number'} from ${lo} to ${hi}`);
  }
  return v;
}

/** The sampling fields of a request, from the settings (errors name the field). */
function requestSettings() {
  const out = {
    temperature: numberField('temperature', 'Temperature', 0, 2, false),
    top_p: numberField('top_p', 'Top-p', 0.01, 1, false),
    max_tokens: numberField('max_tokens', 'Max tokens', 1, 1e7, true),
    chat_template_kwargs: { enable_thinking: $('thinking').checked },
  };
  const raw = $('extra').value.trim();
  if (raw) {
    let extra;
    try {
      extra = JSON.parse(raw);
    } catch (e) {
      throw new Error(`Extra request fields: not valid JSON (${e.message})`);
    }
    if (extra === null || typeof extra !== 'object' || Array.isArray(extra)) {
      throw new Error('Extra request fields: must be a JSON object');
    }
    Object.assign(out, extra);
  }
  return out;
}

// ---------- the API key ----------

let apiKey = sessionStorage.getItem(KEYS.key) || '';
let keyWaiters = [];

function headers(extra) {
  const h = Object.assign({}, extra);
  if (apiKey) h.authorization = `Bearer ${apiKey}`;
  return h;
}

/** Asks for the key (the server answered 401); resolves once one is entered. */
function needKey() {
  ui.keyButton.hidden = false;
  ui.keyError.textContent = apiKey ? 'The server refused this key.' : '';
  if (!ui.keyDialog.open) {
    ui.keyInput.value = '';
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const k = ui.keyInput.value.trim();
  if (!k) return;
  apiKey = k;
  sessionStorage.setItem(KEYS.key, k);
  ui.keyDialog.close();
  const w = keyWaiters;
  keyWaiters = [];
  w.forEach((f) => f());
  ui.prompt.focus();
});
ui.keyButton.addEventListener('click', () => {
  ui.keyError.textContent = '';
  ui.keyInput.value = apiKey;
  ui.keyDialog.showModal();
  ui.keyInput.focus();
});

// ---------- server-sent events over fetch (EventSource cannot send the key) ----------

/** Calls `onData` with each event's data until the stream ends or `onData` returns false. */
async function readEvents(resp, onData) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n?/g, '\n');
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = event
          .split('\n')
          .filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, ''))
          .join('\n');
        if (data && onData(data) === false) return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---------- the conversation ----------

/** The elements of each rendered message. */
const views = new Map();

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function viewOf(m) {
  let v = views.get(m);
  if (v) return v;
  const root = el('article', `msg ${m.role}`);
  root.setAttribute('aria-label', m.role === 'user' ? 'You' : 'Assistant');
  const who = el('h3', 'who', m.role === 'user' ? 'You' : 'Assistant');
  root.append(who);
  v = { root };
  if (m.role === 'assistant') {
    v.think = el('details', 'thinking');
    v.thinkSummary = el('summary', '', 'Thinking');
    v.reasoning = el('div', 'reasoning');
    v.think.append(v.thinkSummary, v.reasoning);
    v.think.hidden = true;
    v.tools = el('div', 'tools');
    root.append(v.think);
  }
  v.content = el('div', 'content');
  root.append(v.content);
  if (v.tools) root.append(v.tools);
  v.meta = el('p', 'meta');
  root.append(v.meta);
  views.set(m, v);
  ui.messages.append(root);
  return v;
}

function fmtMs(ms) {
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return ms >= 10 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
}

function prettyArgs(a) {
  try {
    return JSON.stringify(JSON.parse(a), null, 2);
  } catch {
    return a;
  }
}

function render(m) {
  const v = viewOf(m);
  v.content.textContent = m.content || '';
  if (m.role === 'assistant') {
    const busy = current && current.msg === m;
    v.root.setAttribute('aria-busy', busy ? 'true' : 'false');
    v.think.hidden = !m.reasoning;
    v.reasoning.textContent = m.reasoning || '';
    const thinkingNow = busy && !m.content && !(m.tool_calls && m.tool_calls.length);
    v.thinkSummary.textContent = thinkingNow ? 'Thinking…' : `Thinking (${(m.reasoning || '').length} characters)`;
    v.tools.replaceChildren(
      ...(m.tool_calls || []).map((c) => {
        const box = el('div', 'tool-call');
        box.setAttribute('role', 'group');
        box.setAttribute('aria-label', `Tool call ${c.name}`);
        const head = el('p');
        head.append(el('span', 'badge', 'tool call'), ' ', el('code', 'name', c.name || '?'));
        box.append(head, el('pre', 'args', prettyArgs(c.arguments || '')));
        return box;
      }),
    );
    const parts = [];
    const s = m.stats || {};
    if (s.tokens != null) parts.push(`${s.estimated ? '≈' : ''}${s.tokens} tokens`);
    if (s.ttft_ms != null) parts.push(`first token ${fmtMs(s.ttft_ms)}`);
    if (s.call_ms != null) parts.push(`call after ${fmtMs(s.call_ms)}`);
    if (s.total_ms != null) parts.push(`${fmtMs(s.total_ms)} in all`);
    if (m.finish === 'length') parts.push('cut at max tokens');
    if (m.finish === 'tool_calls') parts.push('tool call');
    if (m.stopped) parts.push('stopped');
    v.meta.className = m.error ? 'meta error' : 'meta';
    v.meta.textContent = m.error ? `Error: ${m.error}` : parts.join(' · ');
  }
  ui.empty.hidden = messages.length > 0;
}

function renderAll() {
  for (const v of views.values()) v.root.remove();
  views.clear();
  messages.forEach(render);
  ui.empty.hidden = messages.length > 0;
  scrollDown(true);
}

/** Keeps the end of the conversation in view while it grows, unless the reader scrolled away
 * from it (`force`: a new message). */
function scrollDown(force) {
  const box = ui.messages;
  if (box.scrollHeight > box.clientHeight + 1) {
    // wide layout: the conversation scrolls in its own column
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
    if (force || near) box.scrollTop = box.scrollHeight;
    return;
  }
  // narrow layout: the page scrolls; the end goes just above the (sticky) message box
  const below = box.getBoundingClientRect().bottom - (window.innerHeight - ui.composer.offsetHeight);
  if (below > 0 && (force || below < 200)) window.scrollBy(0, below + 8);
}

function setStatus(text) {
  ui.status.textContent = text;
}

/** The messages of the next request: the system prompt, then the conversation (failed
 * replies left out, reasoning not sent back). */
function apiMessages() {
  const out = [];
  const sys = $('system').value.trim();
  if (sys) out.push({ role: 'system', content: sys });
  for (const m of messages) {
    if (m.role === 'user') {
      out.push({ role: 'user', content: m.content });
      continue;
    }
    const calls = m.tool_calls || [];
    if (!m.content && !calls.length) continue;
    const a = { role: 'assistant', content: m.content || '' };
    if (calls.length) {
      a.tool_calls = calls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }));
    }
    out.push(a);
  }
  return out;
}

/** The generation in progress: {msg, ctl}. */
let current = null;
let renderQueued = false;

function queueRender(m) {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render(m);
    scrollDown(false);
  });
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.dataset.state = busy ? 'generating' : 'idle';
}

async function send() {
  if (current) return;
  const text = ui.prompt.value;
  if (!text.trim()) return;
  let settings;
  try {
    settings = requestSettings();
    ui.extraError.textContent = '';
  } catch (e) {
    ui.extraError.textContent = e.message;
    $('settings').open = true;
    setStatus(e.message);
    return;
  }
  const user = { role: 'user', content: text };
  messages.push(user);
  const body = Object.assign(
    { model: modelId || undefined, messages: apiMessages(), stream: true, stream_options: { include_usage: true } },
    settings,
  );
  const msg = { role: 'assistant', content: '', reasoning: '', tool_calls: [], stats: {} };
  messages.push(msg);
  ui.prompt.value = '';
  current = { msg, ctl: new AbortController() };
  setBusy(true);
  setStatus('Generating…');
  render(user);
  render(msg);
  scrollDown(true);
  saveHistory(true);
  const t0 = performance.now();
  let tFirst = null;
  let pieces = 0;
  try {
    const r = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: headers({ 'content-type': 'application/json' }),
      body: JSON.stringify(body),
      signal: current.ctl.signal,
    });
    if (r.status === 401) {
      // not sent: the message goes back to the box until there is a key
      messages.splice(messages.length - 2, 2);
      for (const m of [user, msg]) views.get(m)?.root.remove();
      views.delete(user);
      views.delete(msg);
      ui.prompt.value = text;
      current = null;
      setBusy(false);
      setStatus('This server needs an API key.');
      await needKey();
      setStatus('');
      return;
    }
    if (!r.ok) {
      const e = await r.json().catch(() => null);
      msg.error = e?.error?.message || `HTTP ${r.status}`;
      return;
    }
    await readEvents(r, (data) => {
      if (data === '[DONE]') return false;
      const c = JSON.parse(data);
      if (c.error) {
        msg.error = c.error.message || 'the server reported an error';
        return true;
      }
      if (c.usage) msg.usage = c.usage;
      const ch = c.choices && c.choices[0];
      if (!ch) return true;
      const d = ch.delta || {};
      let got = false;
      if (d.reasoning_content) {
        msg.reasoning += d.reasoning_content;
        got = true;
      }
      if (d.content) {
        msg.content += d.content;
        got = true;
      }
      for (const tc of d.tool_calls || []) {
        const i = tc.index ?? msg.tool_calls.length;
        const t = (msg.tool_calls[i] ||= { id: tc.id || '', name: '', arguments: '' });
        if (tc.id) t.id = tc.id;
        if (tc.function?.name && !t.name) t.name = tc.function.name;
        if (tc.function?.arguments) t.arguments += tc.function.arguments;
        got = true;
      }
      if (got) {
        pieces += 1;
        // a tool call arrives whole, once generated: its time is not a first token's
        if (tFirst === null && !d.tool_calls) {
          tFirst = performance.now();
          msg.stats.ttft_ms = tFirst - t0;
          addTtft(msg.stats.ttft_ms);
        } else if (d.tool_calls && msg.stats.call_ms == null) {
          msg.stats.call_ms = performance.now() - t0;
        }
      }
      if (ch.finish_reason) msg.finish = ch.finish_reason;
      queueRender(msg);
      saveHistory(false);
      return true;
    });
  } catch (e) {
    if (e.name === 'AbortError') msg.stopped = true;
    else msg.error = e.message || String(e);
  } finally {
    if (current && current.msg === msg) {
      const tEnd = performance.now();
      const tokens = msg.usage ? msg.usage.completion_tokens : null;
      // without usage (a stopped reply) the streamed pieces stand in for the tokens
      msg.stats.tokens = tokens ?? (pieces || null);
      msg.stats.estimated = tokens == null;
      const n = msg.stats.tokens;
      msg.stats.total_ms = tEnd - t0;
      if (!msg.finish && !msg.stopped && !msg.error) msg.error = 'the reply ended without finishing';
      current = null;
      const lost = document.activeElement === ui.stop || document.activeElement === document.body;
      setBusy(false);
      // the Stop button is disabled now: the focus goes back to the message box
      if (lost) ui.prompt.focus();
      setStatus(msg.stopped ? 'Stopped.' : msg.error ? `Error: ${msg.error}` : '');
      if (msg.usage) setContextUsed(msg.usage.total_tokens);
      render(msg);
      scrollDown(false);
      saveHistory(true);
    }
  }
}

function stop() {
  if (current) current.ctl.abort();
}

function newChat() {
  stop();
  messages = [];
  saveHistory(true);
  renderAll();
  setContextUsed(0);
  setStatus('');
  ui.prompt.focus();
}

// ---------- the model and its context ----------

let modelId = '';
let contextLen = 0;
let contextUsed = 0;

function setContextUsed(n) {
  contextUsed = n || 0;
  showContext();
}

function showContext() {
  const meter = $('ctx-meter');
  meter.max = Math.max(contextLen, 1);
  meter.value = Math.min(contextUsed, meter.max);
  meter.high = meter.max * 0.8;
  meter.optimum = 0;
  $('ctx-text').textContent = `${contextUsed} / ${contextLen || '–'} tokens`;
}

// ---------- the live panel ----------

const series = { tps: [], ttft: [], bytes: [], hits: [], wait: [] };
/** The latest value of each series that was not zero (what the big numbers show). */
const latest = {};

function push(name, v) {
  const s = series[name];
  s.push(v);
  if (s.length > POINTS) s.shift();
  if (v !== null && v > 0) latest[name] = v;
}

function fmtBytes(b) {
  if (b >= 1e9) return `${(b / 1e9).toFixed(2)} GB`;
  if (b >= 1e6) return `${(b / 1e6).toFixed(2)} MB`;
  if (b >= 1e3) return `${(b / 1e3).toFixed(1)} kB`;
  return `${Math.round(b)} B`;
}

const FORMAT = {
  tps: (v) => v.toFixed(1),
  ttft: fmtMs,
  bytes: fmtBytes,
  hits: (v) => `${(v * 100).toFixed(1)} %`,
  wait: (v) => (v >= 1 ? `${v.toFixed(2)} ms` : `${(v * 1000).toFixed(1)} µs`),
};

const SVG = 'http://www.w3.org/2000/svg';

/** Bars of a series, newest at the right, scaled to its largest value (fixed 0-1 for
 * rates). */
function draw(name) {
  const svg = $(`${name}-chart`);
  const values = series[name];
  const [W, H] = [240, 48];
  const top = name === 'hits' ? 1 : Math.max(0, ...values.filter((v) => v !== null));
  const slots = name === 'ttft' ? 30 : POINTS;
  const w = W / slots;
  let d = '';
  values.forEach((v, i) => {
    if (v === null || top <= 0) return;
    const h = Math.max(1, (v / top) * (H - 12));
    const x = W - (values.length - i) * w;
    d += `M${x.toFixed(2)} ${H}v${-h.toFixed(2)}h${Math.max(w - 0.6, 0.6).toFixed(2)}v${h.toFixed(2)}z`;
  });
  if (!svg.firstChild) {
    const p = document.createElementNS(SVG, 'path');
    p.setAttribute('class', 'bars');
    const t = document.createElementNS(SVG, 'text');
    t.setAttribute('class', 'scale');
    t.setAttribute('x', '2');
    t.setAttribute('y', '9');
    svg.append(p, t);
  }
  svg.firstChild.setAttribute('d', d);
  svg.lastChild.textContent = top > 0 ? `max ${FORMAT[name](top)}` : '';
  const label = svg.getAttribute('aria-label').split(':')[0];
  svg.setAttribute('aria-label', top > 0 ? `${label}: up to ${FORMAT[name](top)}` : label);
  $(`${name}-value`).textContent = latest[name] != null ? FORMAT[name](latest[name]) : '–';
}

function addTtft(ms) {
  series.ttft.push(ms);
  if (series.ttft.length > 30) series.ttft.shift();
  latest.ttft = ms;
  draw('ttft');
}

let prev = null;
/** The tokens/s number: the server's rate now while it generates, else the decode speed of
 * the last request it finished (a half second's count at a reply's end covers only part of
 * it; and the page cannot time tokens itself: the server holds back text that may be the
 * start of a tag). */
function showTps(s, rate) {
  let [v, note] = [null, ''];
  if (s.generating > 0 && rate > 0) [v, note] = [rate, 'now'];
  else if (s.last_decode_tok_s > 0) [v, note] = [s.last_decode_tok_s, 'last request'];
  $('tps-value').textContent = v === null ? '–' : FORMAT.tps(v);
  $('tps-note').textContent = note;
}

function onSnapshot(s) {
  if (s.model !== modelId || s.context !== contextLen) {
    modelId = s.model;
    contextLen = s.context;
    $('model-name').textContent = modelId;
    showContext();
  }
  const streamed = !!s.experts;
  $('no-experts').hidden = streamed;
  document.querySelector('.cards').classList.toggle('no-experts', !streamed);
  if (prev && s.t_ms > prev.t_ms) {
    const dt = (s.t_ms - prev.t_ms) / 1000;
    const tokens = s.decoded_tokens - prev.decoded_tokens;
    const rate = tokens / dt;
    push('tps', rate);
    if (s.experts && prev.experts) {
      const [a, b] = [prev.experts, s.experts];
      const fetched = b.hits - a.hits + (b.misses - a.misses);
      push('bytes', tokens > 0 ? (b.bytes_read - a.bytes_read) / tokens : null);
      push('hits', fetched > 0 ? (b.hits - a.hits) / fetched : null);
      push('wait', tokens > 0 ? (b.io_wait_ns - a.io_wait_ns) / 1e6 / tokens : null);
    }
    ['tps', 'bytes', 'hits', 'wait'].forEach(draw);
    showTps(s, rate);
  }
  prev = s;
  const parts = [`since the server started: ${s.decoded_tokens} tokens decoded`];
  if (s.experts) {
    const e = s.experts;
    const all = e.hits + e.misses;
    parts.push(`${fmtBytes(e.bytes_read)} of experts read (${e.mode} cache)`);
    if (all) parts.push(`${((e.hits / all) * 100).toFixed(1)} % hits`);
  }
  if (s.generating) parts.push(`${s.generating} generating`);
  if (s.queued) parts.push(`${s.queued} queued`);
  $('totals').textContent = `${parts.join(' · ')}.`;
}

async function metricsLoop() {
  const state = $('live-state');
  for (;;) {
    try {
      const r = await fetch('/v1/metrics/stream?interval_ms=500', { headers: headers(), cache: 'no-store' });
      if (r.status === 401) {
        state.textContent = 'waiting for the API key';
        await needKey();
        continue;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      state.textContent = 'live: updated every half second';
      prev = null;
      await readEvents(r, (data) => {
        onSnapshot(JSON.parse(data));
        return true;
      });
      state.textContent = 'the server closed the metrics stream; reconnecting';
    } catch (e) {
      state.textContent = `metrics unavailable (${e.message}); retrying`;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---------- wiring ----------

ui.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  send();
});
ui.prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && current && !ui.keyDialog.open) {
    e.preventDefault();
    stop();
  }
});
ui.stop.addEventListener('click', stop);
// a touch stops at once (the click after it is lost when the growing reply scrolls the page),
// and leaves the focus where it was (the button is disabled right after)
ui.stop.addEventListener('pointerdown', (e) => {
  if (!current) return;
  e.preventDefault();
  stop();
});
$('new-chat').addEventListener('click', newChat);
for (const id of SETTINGS) $(id).addEventListener('change', saveSettings);
$('extra').addEventListener('input', () => {
  ui.extraError.textContent = '';
});

loadSettings();
renderAll();
const last = [...messages].reverse().find((m) => m.usage);
setContextUsed(last ? last.usage.total_tokens : 0);
setBusy(false);
metricsLoop();
ui.prompt.focus();
