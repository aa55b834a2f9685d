// trisocks dashboard: the entry point, wiring the modules together.
//
// Data flow:
//   sign in ─ token in sessionStorage ─ api.js adds it to every request (401 → sign in again)
//   events.js follows GET /api/events ─ its first message (every live session) resets the
//     SessionStore (sessions.js); later start/update/end batches update it ─ table marked dirty
//   requestAnimationFrame ─ SessionsTable.render() when dirty: one render per frame, however
//     many events arrived in between
//   every second ─ per-session and total throughput, tiles, the two time-series charts
//   every 5 seconds, and soon after sessions start or end ─ GET /api/users and /api/stats ─
//     users table, top-users chart, tiles

import { AuthError, api, token } from "./api.js";
import { drawBars, drawLines } from "./charts.js";
import { follow } from "./events.js";
import { formatBytes, formatCount, formatDuration, formatRate } from "./format.js";
import { SessionStore } from "./sessions.js";
import { SessionsTable } from "./sessions-table.js";
import { UsersPanel } from "./users.js";

const WINDOW_SECONDS = 300;
const SAMPLE_MS = 1000;
const POLL_MS = 5000;
const TOP_USERS = 6;
// The API reports counters once a second, as we sample: a rate over one sample would beat
// between 0 and 2 updates per period. Averaging over three keeps the chart honest and calm.
const RATE_WINDOW = 3;

const $ = (id) => document.getElementById(id);
const store = new SessionStore();
const table = new SessionsTable(store, { onKill: killSession });
const users = new UsersPanel({ run });
const samples = []; // {t, up, down, active}, one per second for the last WINDOW_SECONDS
let dirty = true;
let marks = []; // {t, up, down}: bytes moved at each of the last RATE_WINDOW + 1 samples
let stopEvents = null;
let timers = [];
let toastTimer = 0;
let pollTimer = 0;
let frameRequest = 0;

table.onChange = () => { dirty = true; };
$("session-filter").addEventListener("input", (e) => table.setFilter(e.target.value));
$("logout").addEventListener("click", () => signOut(""));
$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token.set($("token").value.trim());
  try {
    await api.stats();
  } catch (err) {
    const refused = err instanceof AuthError;
    signOut(refused ? "That token was not accepted." : `Cannot reach the admin API: ${err.message}`);
    return;
  }
  start();
});

if (token.get()) start();
else signOut("");

function start() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("token").value = "";
  marks = [{ t: performance.now(), up: store.movedUp, down: store.movedDown }];
  stopEvents = follow({
    onOpen: (sessions) => {
      store.reset(sessions);
      dirty = true;
      setLive(true);
    },
    onEvent: ({ event, data }) => {
      for (const session of data.sessions) {
        if (event === "end") store.remove(session);
        else store.upsert(session);
      }
      dirty = true;
      if (event !== "update") pollSoon(); // active-session counts per user changed
    },
    onLost: (err, retryMs) => {
      const retry = `Reconnecting in ${Math.ceil(retryMs / 1000)} s…`;
      setLive(false, `Connection to the proxy lost (${err.message}). ${retry}`);
    },
    onAuthError: rejected,
  });
  timers = [setInterval(sample, SAMPLE_MS), setInterval(poll, POLL_MS)];
  poll();
  frameRequest = requestAnimationFrame(frame);
}

function signOut(message) {
  stopEvents?.();
  stopEvents = null;
  timers.forEach(clearInterval);
  timers = [];
  clearTimeout(pollTimer);
  cancelAnimationFrame(frameRequest);
  token.clear();
  $("dashboard").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  $("token").focus();
}

/** A 401 while signed in (a request still in flight after signing out does not count). */
function rejected() {
  if (stopEvents) signOut("The admin token was rejected. Sign in again.");
}

function frame() {
  if (dirty) {
    dirty = false;
    table.render();
    $("tile-active").textContent = formatCount(store.size);
  }
  frameRequest = requestAnimationFrame(frame);
}

function setLive(live, message = "") {
  $("live").classList.toggle("down", !live);
  $("live-text").textContent = live ? "Live" : "Reconnecting…";
  $("banner").textContent = message;
  $("banner").hidden = live;
  $("dashboard").classList.toggle("offline", !live); // dims what may be out of date
}

function sample() {
  marks.push({ t: performance.now(), up: store.movedUp, down: store.movedDown });
  if (marks.length > RATE_WINDOW + 1) marks.shift();
  const [first, previous, last] = [marks[0], marks.at(-2), marks.at(-1)];
  store.sampleRates((last.t - previous.t) / 1000);
  const seconds = (last.t - first.t) / 1000;
  const up = (last.up - first.up) / seconds;
  const down = (last.down - first.down) / seconds;
  const t = Date.now();
  samples.push({ t, up, down, active: store.size });
  while (samples[0].t < t - WINDOW_SECONDS * 1000) samples.shift();
  $("tile-up").textContent = formatRate(up);
  $("tile-down").textContent = formatRate(down);
  drawLines($("chart-throughput"), {
    samples: samples.map((s) => ({ t: s.t, values: [s.up, s.down] })),
    series: [{ className: "up" }, { className: "down" }],
    now: t, windowSeconds: WINDOW_SECONDS, format: formatRate, binary: true,
  });
  drawLines($("chart-active"), {
    samples: samples.map((s) => ({ t: s.t, values: [s.active] })),
    series: [{ className: "active" }],
    now: t, windowSeconds: WINDOW_SECONDS, format: (v) => formatCount(Math.round(v)),
  });
  dirty = true; // ages and rates changed
}

function pollSoon() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, 300);
}

async function poll() {
  try {
    const [userList, stats] = await Promise.all([api.users(), api.stats()]);
    users.render(userList);
    const top = userList
      .map((u) => ({ label: u.user, values: [u.bytes_up, u.bytes_down] }))
      .filter((b) => b.values[0] + b.values[1] > 0)
      .sort((a, b) => b.values[0] + b.values[1] - (a.values[0] + a.values[1]))
      .slice(0, TOP_USERS);
    drawBars($("chart-users"), { bars: top, format: formatBytes });
    $("tile-total").textContent = formatCount(stats.sessions_total);
    $("tile-uptime").textContent = formatDuration(stats.uptime);
  } catch (err) {
    if (err instanceof AuthError) rejected();
    // other failures show up as a lost event stream; the next poll retries
  }
}

/**
 * Await an API call, then show `doneMessage` (a string, or a function of the answer) or the
 * API's error. Returns whether it worked.
 */
async function run(promise, doneMessage) {
  try {
    const answer = await promise;
    toast(typeof doneMessage === "function" ? doneMessage(answer) : doneMessage);
    poll();
    return true;
  } catch (err) {
    if (err instanceof AuthError) rejected();
    else toast(err.message, true);
    return false;
  }
}

async function killSession(session) {
  const what = `${session.user ?? "anonymous"} → ${session.target ?? "?"}`;
  if (!confirm(`Kill session ${session.id} (${what})? The client's connection is closed.`)) return;
  if (await run(api.killSession(session.id), `Session ${session.id} killed.`)) {
    store.remove(session);
    dirty = true;
  }
}

function toast(message, isError = false) {
  const box = $("toast");
  box.textContent = message;
  box.classList.toggle("error", isError);
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
}
