// Run one UI-format workflow through the real ComfyUI frontend in headless Chromium.
//
//   node ui_runner.mjs --server URL --workflow FILE --out DIR [--timeout S]
//
// env: PLAYWRIGHT_DIR  folder whose node_modules holds playwright-core (ui.py installs it)
//      CHROMIUM_PATH   the browser binary (no browser is ever downloaded)
// Loads the graph with app.loadGraphData (what opening a workflow file does), pins every
// seed's "control after generate" to "fixed", records missing node types and visible
// dialogs, queues with app.queuePrompt(0, 1) (the Run button's code path), polls
// /api/history, takes a screenshot and prints one JSON report line on stdout:
// {ok, status, prompt_id, error, dialogs, page_errors, console_errors, missing_nodes, ...}.
// Only 127.0.0.1/localhost are reachable: DNS for every other host fails and any other
// request is aborted (and listed in blocked_requests).
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const require = createRequire(path.join(process.env.PLAYWRIGHT_DIR || process.cwd(), 'package.json'));
const { chromium } = require('playwright-core');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const isLoopback = (u) => ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname);
// node types the frontend provides itself (not in /object_info)
const FRONTEND_NODES = new Set(['Note', 'MarkdownNote', 'Reroute', 'PrimitiveNode']);

function parseArgs(argv) {
  const a = { timeout: 300 };
  for (let i = 0; i < argv.length; i += 2) a[argv[i].replace(/^--/, '')] = argv[i + 1];
  a.timeout = Number(a.timeout);
  return a;
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const server = a.server.replace(/\/$/, '');
  if (!isLoopback(new URL(server))) throw new Error('refusing non-loopback server ' + server);
  const wf = JSON.parse(fs.readFileSync(a.workflow, 'utf8'));
  fs.mkdirSync(a.out, { recursive: true });
  const report = { ok: false, status: null, prompt_id: null, error: null, dialogs: [], page_errors: [],
    console_errors: [], missing_nodes: [], blocked_requests: [], http_errors: [] };

  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'comfy-it-chromium-'));
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM_PATH || 'chromium',
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-extensions', '--no-pings',
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost'],
  });
  try {
    await ctx.route('**/*', (route) => {
      const u = new URL(route.request().url());
      if (['data:', 'blob:'].includes(u.protocol) || isLoopback(u)) return route.continue();
      report.blocked_requests.push(u.href);
      return route.abort('blockedbyclient');
    });
    const page = ctx.pages()[0] || await ctx.newPage();
    page.on('pageerror', (e) => report.page_errors.push(String((e && e.stack) || e).slice(0, 800)));
    page.on('console', (m) => {
      if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) report.console_errors.push(m.text().slice(0, 500));
    });
    let promptResp = null;
    page.on('response', async (r) => {
      const u = new URL(r.url());
      // a fresh user dir has no user.css / saved workflows / custom templates: 404s by design
      if (r.status() >= 400 && !(r.status() === 404 && /userdata|user\.css/.test(u.pathname + u.search))) {
        report.http_errors.push(`${r.status()} ${r.request().method()} ${u.pathname}`);
      }
      if (r.request().method() === 'POST' && u.pathname.endsWith('/api/prompt')) {
        let body = null;
        try { body = await r.json(); } catch { /* not json */ }
        promptResp = { status: r.status(), body };
      }
    });
    const dialogs = async (when) => {
      const texts = await page.evaluate(() => [...document.querySelectorAll('.p-dialog, .p-toast-message')]
        .filter((d) => d.offsetParent !== null || getComputedStyle(d).display !== 'none')
        .map((d) => d.innerText.replace(/\s+/g, ' ').trim().slice(0, 800)).filter(Boolean));
      for (const text of texts) {
        if (!report.dialogs.some((d) => d.text === text)) report.dialogs.push({ when, text });
      }
    };
    const screenshot = async () => {
      await page.evaluate(async () => {
        try { window.app.canvas.min_font_size_for_lod = 0; } catch { /* older frontend */ } // full detail when zoomed out
        try {
          await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
        } catch {
          try { window.app.canvas.ds.reset(); } catch { /* no canvas */ }
        }
        try { window.app.canvas.setDirty(true, true); } catch { /* no canvas */ }
      }).catch(() => {});
      await sleep(400);
      report.screenshot = path.join(a.out, 'ui_screenshot.png');
      await page.screenshot({ path: report.screenshot }).catch((e) => { report.screenshot_error = String(e); });
    };

    const t0 = Date.now();
    await page.goto(server + '/', { waitUntil: 'domcontentloaded', timeout: 60000 });
    try {
      await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.app.vueAppReady,
        null, { timeout: 90000, polling: 250 });
    } catch (e) {
      report.status = 'page_not_ready';
      report.error = String(e).slice(0, 500);
      await screenshot();
      return report;
    }
    report.page_ready_s = (Date.now() - t0) / 1000;

    const known = Object.keys(await (await fetch(server + '/api/object_info')).json());
    const loaded = await page.evaluate(async ({ wf, known, frontendNodes }) => {
      await window.app.loadGraphData(wf, true, true, 'integration_test');
      const subgraphs = ((wf.definitions && wf.definitions.subgraphs) || []).map((sg) => sg.id);
      const knownSet = new Set([...known, ...frontendNodes, ...subgraphs]);
      let fixed = 0;
      for (const node of window.app.graph.nodes) {
        for (const w of node.widgets || []) {
          if (w.name === 'control_after_generate' && w.value !== 'fixed') { w.value = 'fixed'; fixed++; }
        }
      }
      return { nodes: window.app.graph.nodes.length, fixed,
        missing: window.app.graph.nodes.filter((n) => !knownSet.has(n.type)).map((n) => ({ id: n.id, type: n.type })) };
    }, { wf, known, frontendNodes: [...FRONTEND_NODES] });
    report.loaded_nodes = loaded.nodes;
    report.seed_controls_fixed = loaded.fixed;
    report.missing_nodes = loaded.missing;
    await sleep(500);
    await dialogs('after_load');

    const tq = Date.now();
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    while (!promptResp && Date.now() - tq < 30000) await sleep(100);
    if (!promptResp || promptResp.status !== 200) {
      await sleep(700);
      await dialogs('after_queue');
      report.status = promptResp ? 'rejected' : 'not_queued';
      report.error = promptResp ? promptResp.body : 'no POST /api/prompt within 30 s';
      await screenshot();
      return report;
    }
    const pid = report.prompt_id = promptResp.body.prompt_id;
    let hist = null;
    while (!hist && Date.now() - tq < a.timeout * 1000) {
      const h = (await (await fetch(`${server}/api/history/${pid}`)).json())[pid];
      if (h && h.status && ['success', 'error'].includes(h.status.status_str)) hist = h;
      else await sleep(250);
    }
    report.wall_s = (Date.now() - tq) / 1000;
    if (!hist) {
      report.status = 'timeout';
      report.error = `not finished after ${a.timeout} s`;
      await fetch(`${server}/api/interrupt`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt_id: pid }) }).catch(() => {});
      await screenshot();
      return report;
    }
    report.status = hist.status.status_str;
    const err = (hist.status.messages || []).find((m) => m[0] === 'execution_error');
    if (err) {
      report.error = { node_id: err[1].node_id, node_type: err[1].node_type, exception_type: err[1].exception_type,
        exception_message: err[1].exception_message };
    }
    report.images = Object.values(hist.outputs || {}).flatMap((o) => o.images || []);
    await sleep(1000); // let the frontend draw the previews before the screenshot
    await dialogs('after_run');
    await screenshot();
    report.ok = report.status === 'success' && !err && report.missing_nodes.length === 0;
    return report;
  } finally {
    await ctx.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().then(
  (report) => { console.log(JSON.stringify(report)); process.exit(0); },
  (e) => { console.log(JSON.stringify({ ok: false, status: 'runner_error', error: String((e && e.stack) || e) })); process.exit(1); },
);
