// Drives flashmoe's chat page in a real headless Chromium through puppeteer-core (tests/web.rs
// starts `flashmoe serve --api-key KEY` and runs this):
//   node tests/web_browser.js BASE_URL KEY CHROMIUM OUT_DIR NO_EOS_BIAS_JSON
// Every check throws on failure; the last line printed on success is "all browser checks passed".
'use strict';
const fs = require('fs');
const path = require('path');
const puppeteer = require('puppeteer-core');
const { PNG } = require('pngjs');

const [base, key, chromium, outDir, noEos] = process.argv.slice(2);
const SYSTEM = "You are a player in Shakespeare's company.";

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const auth = { authorization: `Bearer ${key}`, 'content-type': 'application/json' };

async function snapshot() {
  const r = await fetch(`${base}/v1/metrics/snapshot`, { headers: auth });
  if (!r.ok) throw new Error(`snapshot: HTTP ${r.status}`);
  return r.json();
}

async function api(body) {
  const r = await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: auth, body: JSON.stringify(body) });
  const j = await r.json();
  if (!r.ok) throw new Error(`chat completion: HTTP ${r.status}: ${JSON.stringify(j)}`);
  return j;
}

/** Distinct colours of a PNG, and its size. */
function colours(file) {
  const png = PNG.sync.read(fs.readFileSync(file));
  const seen = new Set();
  for (let i = 0; i < png.data.length; i += 4) {
    seen.add(png.data.readUInt32BE(i));
  }
  return { n: seen.size, width: png.width, height: png.height };
}

async function setField(page, sel, value) {
  await page.focus(sel);
  await page.keyboard.down('Control');
  await page.keyboard.press('KeyA');
  await page.keyboard.up('Control');
  await page.keyboard.press('Backspace');
  if (value !== '') await page.keyboard.type(value);
  // `change` fires when the field loses focus; the page saves the settings then
  await page.$eval(sel, (e) => e.blur());
}

const text = (page, sel) => page.$eval(sel, (e) => e.textContent);
const idle = (page) => page.waitForFunction(() => document.body.dataset.state === 'idle', { timeout: 60000 });
const lastReply = (page) =>
  page.evaluate(() => {
    const all = document.querySelectorAll('.msg.assistant');
    const m = all[all.length - 1];
    if (!m) return null;
    const think = m.querySelector('details.thinking');
    return {
      content: m.querySelector('.content').textContent,
      meta: m.querySelector('.meta').textContent,
      thinkShown: !think.hidden,
      thinkOpen: think.open,
      reasoning: m.querySelector('.reasoning').textContent,
      tools: [...m.querySelectorAll('.tool-call')].map((t) => ({
        name: t.querySelector('.name').textContent,
        args: t.querySelector('.args').textContent,
      })),
      count: all.length,
    };
  });

/** Waits until every number of the live panel has a value. */
const liveNumbers = (page) =>
  page.waitForFunction(
    () => ['tps', 'ttft', 'bytes', 'hits', 'wait'].every((n) => document.getElementById(`${n}-value`).textContent !== '–'),
    { timeout: 10000 },
  );

async function send(page, message) {
  await page.focus('#prompt');
  await page.keyboard.type(message);
  await page.keyboard.press('Enter');
}

async function main() {
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    const errors = [];
    const foreign = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('request', (r) => {
      const u = r.url();
      if (!u.startsWith(base) && !u.startsWith('data:')) foreign.push(u);
    });

    // the page loads without the key, then asks for it (the API wants it)
    const resp = await page.goto(`${base}/`, { waitUntil: 'load' });
    check(resp.status() === 200, 'the page loads without the API key');
    await page.waitForSelector('#key-dialog[open]', { timeout: 10000 });
    check(
      (await page.evaluate(() => document.activeElement.id)) === 'key-input',
      'the API key dialog opens with the focus in its field',
    );
    await page.keyboard.type('not-the-key');
    await page.keyboard.press('Enter');
    await page.waitForFunction(
      () => document.getElementById('key-dialog').open && document.getElementById('key-error').textContent !== '',
      { timeout: 10000 },
    );
    check(true, 'a wrong key is refused and asked for again');
    await page.keyboard.type(key);
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.getElementById('model-name').textContent === 'flashmoe-default', {
      timeout: 10000,
    });
    check(!(await page.$('#key-dialog[open]')), 'the right key closes the dialog');
    check((await text(page, '#ctx-text')).includes('/ 1024 tokens'), 'the context length is shown');
    check(
      (await page.evaluate(() => sessionStorage.getItem('flashmoe.api-key'))) === key,
      'the key is kept in sessionStorage',
    );

    // settings
    await page.click('#settings summary');
    await setField(page, '#system', SYSTEM);
    await setField(page, '#temperature', '0');
    await setField(page, '#max_tokens', '24');

    // Shift+Enter is a new line, Enter sends
    await page.focus('#prompt');
    await page.keyboard.type('Speak as');
    await page.keyboard.down('Shift');
    await page.keyboard.press('Enter');
    await page.keyboard.up('Shift');
    check(
      (await page.$eval('#prompt', (e) => e.value)) === 'Speak as\n' && (await page.$$('.msg')).length === 0,
      'Shift+Enter adds a line and sends nothing',
    );
    await page.keyboard.press('Backspace');
    await page.keyboard.type(' ROMEO.');
    await page.keyboard.press('Enter');
    await page.waitForSelector('.msg.assistant');
    await idle(page);
    const first = await lastReply(page);
    check(first.content.length > 0 && !first.meta.startsWith('Error'), `a reply arrives: ${JSON.stringify(first)}`);
    check(/^24 tokens · first token .* in all/.test(first.meta), `the reply shows its token stats: ${first.meta}`);
    // the page sent what an API client sends: the same greedy answer
    const ref = await api({
      messages: [
        { role: 'system', content: SYSTEM },
        { role: 'user', content: 'Speak as ROMEO.' },
      ],
      temperature: 0,
      top_p: 1,
      max_tokens: 24,
      chat_template_kwargs: { enable_thinking: true },
    });
    check(ref.choices[0].message.content === first.content, 'the page shows the answer the API gives');
    check(
      (await text(page, '#ctx-text')) === `${ref.usage.total_tokens} / 1024 tokens`,
      'the context indicator counts the conversation',
    );

    // the live panel: non-zero numbers after a reply
    await liveNumbers(page);
    const live = await page.evaluate(() =>
      Object.fromEntries(['tps', 'ttft', 'bytes', 'hits', 'wait'].map((n) => [n, document.getElementById(`${n}-value`).textContent])),
    );
    check(parseFloat(live.tps) > 0 && parseFloat(live.ttft) > 0 && parseFloat(live.bytes) > 0, `live numbers: ${JSON.stringify(live)}`);
    check(['now', 'last request'].includes(await text(page, '#tps-note')), 'tokens/s says what it measures');
    check(
      (await page.$eval('#tps-chart path', (p) => p.getAttribute('d'))).length > 0 &&
        (await page.$eval('#bytes-chart path', (p) => p.getAttribute('d'))).length > 0,
      'the charts draw bars',
    );
    check((await text(page, '#totals')).includes('% hits'), 'the totals line shows the hit rate');

    // a long answer (end of text banned): text streams in, Esc stops it, the server stops too
    await setField(page, '#max_tokens', '900');
    await setField(page, '#extra', JSON.stringify({ logit_bias: JSON.parse(noEos) }));
    const before = await snapshot();
    await page.evaluate(() => {
      window.seenLengths = [];
      new MutationObserver(() => {
        const all = document.querySelectorAll('.msg.assistant .content');
        if (!all.length) return;
        const n = all[all.length - 1].textContent.length;
        if (window.seenLengths[window.seenLengths.length - 1] !== n) window.seenLengths.push(n);
      }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
    });
    await send(page, 'Speak as JULIET.');
    await page.waitForFunction(() => window.seenLengths.filter((n) => n > 0).length >= 3, { timeout: 30000 });
    check(
      (await page.evaluate(() => document.body.dataset.state)) === 'generating',
      'the text streams in piece by piece',
    );
    await page.keyboard.press('Escape');
    await idle(page);
    const stopped = await lastReply(page);
    check(stopped.meta.includes('stopped') && (await text(page, '#status')) === 'Stopped.', 'Esc stops the reply');
    let s = await snapshot();
    for (let i = 0; s.generating > 0 && i < 50; i++) {
      await sleep(100);
      s = await snapshot();
    }
    check(s.generating === 0, 'the server stops generating when the page stops');
    await sleep(700);
    const after = await snapshot();
    check(
      after.decoded_tokens === s.decoded_tokens && s.decoded_tokens - before.decoded_tokens < 900,
      `no tokens after the stop (${s.decoded_tokens - before.decoded_tokens} decoded)`,
    );

    // thinking arrives collapsed
    await setField(page, '#max_tokens', '6');
    await setField(page, '#extra', JSON.stringify({ logit_bias: { 4092: 100 } }));
    await send(page, 'Think first.');
    await page.waitForFunction(() => document.querySelectorAll('.msg.assistant').length === 3);
    await idle(page);
    const thought = await lastReply(page);
    check(thought.thinkShown && !thought.thinkOpen && thought.reasoning.includes('<think>'), 'the reasoning is shown collapsed');

    // a new chat; a tool call is shown as one
    await page.click('#new-chat');
    check((await page.$$('.msg')).length === 0, 'New chat empties the conversation');
    await setField(page, '#system', '');
    await setField(page, '#max_tokens', '60');
    const tools = [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'Current weather in a city',
          parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
      },
    ];
    await setField(page, '#extra', JSON.stringify({ tools, tool_choice: 'required' }));
    await send(page, 'What is the weather in Verona?');
    await page.waitForSelector('.msg.assistant');
    await idle(page);
    const call = await lastReply(page);
    check(
      call.tools.length === 1 && call.tools[0].name === 'get_weather' && call.meta.includes('call after'),
      `the tool call is shown as one: ${JSON.stringify(call.tools)}`,
    );
    JSON.parse(call.tools[0].args);
    await liveNumbers(page);
    const desktop = path.join(outDir, 'web-desktop.png');
    await page.screenshot({ path: desktop });
    const d = colours(desktop);
    check(d.n >= 16 && d.width === 1280, `the desktop screenshot is not blank (${d.n} colours)`);

    // bad settings are named, not sent
    await setField(page, '#extra', '[1, 2]');
    await send(page, 'Hello');
    check((await text(page, '#extra-error')).includes('Extra request fields'), 'a bad setting is named');
    check((await page.$$('.msg')).length === 2, 'and nothing is sent');
    await setField(page, '#extra', '');
    await page.$eval('#prompt', (e) => {
      e.value = '';
    });

    // reload: the conversation, the settings and the key are kept
    const kept = await page.evaluate(() => [...document.querySelectorAll('.msg')].map((m) => m.textContent));
    await page.reload({ waitUntil: 'load' });
    await page.waitForFunction(() => document.getElementById('model-name').textContent === 'flashmoe-default', {
      timeout: 10000,
    });
    check(!(await page.$('#key-dialog[open]')), 'after a reload the key is not asked for again');
    const back = await page.evaluate(() => [...document.querySelectorAll('.msg')].map((m) => m.textContent));
    check(JSON.stringify(back) === JSON.stringify(kept), 'after a reload the conversation is kept');
    check((await page.$eval('#max_tokens', (e) => e.value)) === '60', 'after a reload the settings are kept');

    // keyboard only: Tab reaches the controls, and the focus is visible
    await page.focus('#prompt');
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => {
      const e = document.activeElement;
      return { id: e.id, outline: getComputedStyle(e).outlineStyle, visible: e.matches(':focus-visible') };
    });
    check(focused.id === 'send' || focused.id === 'stop', `Tab moves to the buttons (${focused.id})`);
    check(focused.visible && focused.outline !== 'none', 'the keyboard focus is visible');

    // phone width: nothing wider than the screen, the message box usable
    await page.setViewport({ width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    await page.reload({ waitUntil: 'load' });
    await page.waitForFunction(() => document.getElementById('model-name').textContent === 'flashmoe-default');
    const fit = await page.evaluate(() => ({
      scroll: document.documentElement.scrollWidth,
      width: window.innerWidth,
      prompt: document.getElementById('prompt').getBoundingClientRect().width,
    }));
    check(fit.scroll <= fit.width && fit.prompt > 300, `readable at phone width: ${JSON.stringify(fit)}`);
    await page.click('#new-chat');
    if (!(await page.$eval('#settings', (e) => e.open))) await page.click('#settings summary');
    await setField(page, '#max_tokens', '12');
    await send(page, 'Speak as ROMEO.');
    await page.waitForSelector('.msg.assistant');
    await idle(page);
    const small = await lastReply(page);
    const made = parseInt(small.meta, 10);
    check(small.content.length > 0 && made > 0 && made <= 12, `a reply at phone width, max tokens 12: ${small.meta}`);
    await liveNumbers(page);
    // the Stop button (a tap) stops a long answer; the focus goes back to the message box
    await setField(page, '#max_tokens', '900');
    await setField(page, '#extra', JSON.stringify({ logit_bias: JSON.parse(noEos) }));
    // tapped as soon as the answer has begun; on an idle machine the built-in model can write
    // all 900 tokens its context allows (about two seconds) before a tap lands, which says
    // nothing of the button: then the answer is asked for again, in a new chat
    let tapped;
    let focus;
    for (let attempt = 0; attempt < 3; attempt++) {
      if (attempt > 0) await page.click('#new-chat');
      const had = await page.$$eval('.msg.assistant', (m) => m.length);
      await send(page, 'Speak on.');
      await page.waitForFunction(
        (had) => {
          const all = document.querySelectorAll('.msg.assistant .content');
          return all.length === had + 1 && all[had].textContent.length > 0 && document.body.dataset.state === 'generating';
        },
        { timeout: 30000, polling: 'mutation' },
        had,
      );
      await page.tap('#stop');
      await idle(page);
      tapped = await lastReply(page);
      focus = await page.evaluate(() => document.activeElement.id);
      if (!tapped.meta.includes('cut at max tokens')) break;
      console.log(`the answer was done before the tap (${tapped.meta}): again`);
    }
    check(
      tapped.meta.includes('stopped') && focus === 'prompt',
      `the Stop button stops the reply and the focus returns to the message box (${tapped.meta}; focus: ${focus})`,
    );
    await setField(page, '#extra', '');
    const phone = path.join(outDir, 'web-phone.png');
    await page.screenshot({ path: phone, fullPage: true });
    const p = colours(phone);
    check(p.n >= 16 && p.width === 780, `the phone screenshot is not blank (${p.n} colours)`);

    // dark and light follow the system's preference
    const bg = () => page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const light = await bg();
    await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
    const dark = await bg();
    check(light === 'rgb(247, 247, 245)' && dark === 'rgb(23, 24, 27)', `light ${light}, dark ${dark}`);
    await page.screenshot({ path: path.join(outDir, 'web-phone-dark.png') });

    check(errors.length === 0, `no script errors (${errors.join('; ')})`);
    check(foreign.length === 0, `nothing fetched from elsewhere (${foreign.join(', ')})`);
  } finally {
    await browser.close();
  }
  console.log('all browser checks passed');
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
