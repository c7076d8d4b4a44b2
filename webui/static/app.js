// DockerCoins web UI: draws what /events pushes. The speed is fitted on the
// server over a window of Redis-timestamped samples; the page never divides
// the difference of two polls.
"use strict";

const STALE_AFTER_MS = 5000; // no state for this long: the stream is dead, reconnect
const POLL_MS = 2000; // while the web UI refuses this page a stream: /json this often
const STREAM_RETRY_S = 10; // ... and the stream asked for again after this (or Retry-After)
const HISTORY_S = 300;
const TROUBLE = {
  "redis-unreachable": "Redis unreachable",
  "bad-data": "bad data in Redis",
  "redis-full": "Redis full",
};

const els = {
  status: document.getElementById("status"),
  speed: document.getElementById("speed"),
  speedNote: document.getElementById("speed-note"),
  coins: document.getElementById("coins"),
  hashes: document.getElementById("hashes"),
  workers: document.getElementById("workers"),
  mode: document.getElementById("mode"),
  modeDetail: document.getElementById("mode-detail"),
  stages: document.getElementById("stages"),
  stagesNote: document.getElementById("stages-note"),
  chart: document.getElementById("chart"),
  marks: document.getElementById("marks"),
  fallback: document.getElementById("fallback"),
};

let xs = [];
let ys = [];
let marks = []; // [time, workers]
let source = null;
let lastMessage = 0;
let polling = null; // the interval polling /json while the stream is refused
let refusal = ""; // why the web UI refused the stream, said on the page while polling
let renewing = false; // the stream ended at its lifetime: the browser reconnects by itself

const number = new Intl.NumberFormat("en-US");
// Turbo's millions in 3 significant digits ("1.21 M"), so that they keep to one line on a
// phone; below a million (classic sizes), every digit as before.
const COMPACT_FROM = 1e6;
const compact = new Intl.NumberFormat("en-US", {
  notation: "compact", minimumSignificantDigits: 3, maximumSignificantDigits: 3,
});
const compactTick = new Intl.NumberFormat("en-US", { notation: "compact", maximumSignificantDigits: 3 });

function spaced(text) {
  return text.replace(/(\d)([KMBT])$/, "$1\u202f$2"); // "1.21M" -> "1.21 M" (narrow no-break space)
}

function formatSpeed(value) {
  if (value === null || value === undefined) return "–";
  if (Math.abs(value) >= COMPACT_FROM) return spaced(compact.format(value));
  if (Math.abs(value) >= 100) return number.format(Math.round(value));
  return value.toFixed(1);
}

function formatCount(value) {
  if (value === null || value === undefined) return "–";
  return value >= COMPACT_FROM ? spaced(compact.format(value)) : number.format(value);
}

function formatTicks(splits) {
  // One style per axis: all compact once the top tick reaches 10,000 ("200 K", "1.4 M").
  const compactAll = Math.max(...splits.map(Math.abs)) >= 1e4;
  return splits.map((v) => (compactAll ? spaced(compactTick.format(v)) : number.format(v)));
}

function showCount(el, value) {
  // The figure on the page, the exact count in its tooltip.
  el.textContent = formatCount(value);
  el.title = value === null || value === undefined ? "" : number.format(value);
}

function axisSize(u, values, axisIdx, cycleNum) {
  // The y-axis margin fits its widest label, however many digits the speed has.
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size; // uPlot re-measures until the size settles: stop it here
  u.ctx.font = axis.font[0];
  const ratio = window.devicePixelRatio || 1;
  const widest = Math.max(0, ...(values || []).map((v) => u.ctx.measureText(v).width / ratio));
  return Math.max(40, Math.ceil(widest + axis.ticks.size + axis.gap + 6));
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function setStatus(kind, text, title) {
  els.status.className = "status " + kind;
  els.status.textContent = text;
  els.status.title = title || "";
  els.speed.classList.toggle("stale", kind !== "live");
}

function drawMarks(u) {
  const ctx = u.ctx;
  const { left, top, width, height } = u.bbox;
  const ratio = window.devicePixelRatio || 1;
  ctx.save();
  ctx.strokeStyle = "#4cc9f0";
  ctx.fillStyle = "#4cc9f0";
  ctx.lineWidth = 2 * ratio;
  ctx.setLineDash([6 * ratio, 4 * ratio]);
  ctx.font = `bold ${Math.round(15 * ratio)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  ctx.textAlign = "left"; // uPlot leaves "right" behind from its y-axis labels
  const lineHeight = 19 * ratio;
  const taken = []; // [x0, x1, row] of labels drawn, so that close marks stack their labels
  for (const [t, count] of marks) {
    const x = u.valToPos(t, "x", true);
    if (x < left || x > left + width) continue;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
    const label = count === 1 ? "1 worker" : `${count} workers`;
    const w = ctx.measureText(label).width;
    const x0 = x + 4 * ratio + w > left + width ? x - 4 * ratio - w : x + 4 * ratio;
    let row = 0;
    while (taken.some(([a, b, r]) => r === row && x0 < b + 6 * ratio && a < x0 + w + 6 * ratio)) row++;
    taken.push([x0, x0 + w, row]);
    ctx.fillText(label, x0, top + 4 * ratio + row * lineHeight);
  }
  ctx.restore();
}

function chartSize() {
  // The chart takes the width of its box and the rest of the screen's height.
  const width = Math.max(240, els.chart.parentElement.clientWidth - 12);
  const below = window.innerHeight - els.chart.getBoundingClientRect().top - window.scrollY;
  const height = Math.max(220, Math.min(640, Math.round(below - 70)));
  return { width, height };
}

const plot = new uPlot(
  {
    ...chartSize(),
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
    axes: [
      {
        stroke: "#a9b4c2", grid: { stroke: "#27303b" }, ticks: { stroke: "#27303b" },
        font: "14px system-ui", space: 90, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600],
        values: (u, splits) => splits.map(clock),
      },
      {
        stroke: "#a9b4c2", grid: { stroke: "#27303b" }, ticks: { stroke: "#27303b" },
        font: "14px system-ui", size: axisSize, values: (u, splits) => formatTicks(splits),
      },
    ],
    series: [
      { value: (u, v) => (v === null ? "–" : clock(v)) },
      {
        label: "hashes/s", stroke: "#ffd23f", width: 3, fill: "rgba(255,210,63,0.12)",
        spanGaps: false, points: { show: false }, value: (u, v) => formatSpeed(v),
      },
    ],
    hooks: { draw: [drawMarks] },
    legend: { show: false },
  },
  [xs, ys],
  els.chart,
);

let resizing = 0;
window.addEventListener("resize", () => {
  cancelAnimationFrame(resizing);
  resizing = requestAnimationFrame(() => {
    plot.setSize({ width: 240, height: 220 }); // let the box shrink first, then measure it
    plot.setSize(chartSize());
  });
});

function renderMarks() {
  els.marks.replaceChildren(
    ...marks.slice(-6).map(([t, count]) => {
      const li = document.createElement("li");
      li.textContent = `${clock(t)} → ${count} worker${count === 1 ? "" : "s"}`;
      return li;
    }),
  );
  els.chart.dataset.marks = String(marks.length);
  els.chart.dataset.lastMark = marks.length ? String(marks[marks.length - 1][1]) : "";
}

function formatTime(seconds) {
  // Seconds as s, ms (classic units) or µs (turbo, per hash), with 3 significant digits.
  if (seconds >= 1) return `${seconds.toFixed(2)} s`;
  const [value, unit] = seconds >= 0.001 ? [seconds * 1000, "ms"] : [seconds * 1e6, "µs"];
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${unit}`;
}

function renderStages(state) {
  // One bar per stage: its share of a unit's time; the figure is its p50 (per hash in turbo).
  const perHash = state.hashes_per_unit > 1 ? state.hashes_per_unit : 1;
  const shares = state.latency_share || {};
  const known = Object.entries(shares).filter(([, share]) => share !== null);
  const widest = known.length ? known.reduce((a, b) => (b[1] > a[1] ? b : a))[0] : "";
  for (const li of els.stages.children) {
    const stage = li.dataset.stage;
    const share = shares[stage];
    const latency = state.latency ? state.latency[stage] : null;
    const fill = li.querySelector(".stage-fill");
    const figure = li.querySelector(".stage-figure");
    const reported = share !== null && share !== undefined;
    fill.style.width = reported ? `${(share * 100).toFixed(1)}%` : "0";
    li.dataset.share = reported ? String(share) : "";
    li.classList.toggle("slowest", stage === widest);
    if (!reported || !latency || latency.p50 === null) {
      figure.textContent = "–";
      figure.title = "";
      continue;
    }
    const per = perHash > 1 ? "/hash" : "";
    figure.textContent = `${formatTime(latency.p50 / perHash)}${per} · ${Math.round(share * 100)} %`;
    figure.title = `p50 ${formatTime(latency.p50)}, p99 ${formatTime(latency.p99)} per unit of work`;
  }
  els.stages.dataset.widest = widest;
  const unit = state.latency_unit;
  if (!unit) {
    els.stagesNote.textContent = "no worker has reported its stage times yet";
    els.stagesNote.title = "";
    return;
  }
  els.stagesNote.textContent = perHash > 1
    ? `p50 per hash · units of ${number.format(Math.round(perHash))} hashes, ${formatTime(unit.p50)} each`
    : `p50 · a unit of work takes ${formatTime(unit.p50)}`;
  els.stagesNote.title = `over the ${number.format(unit.units)} units the workers finished lately`;
}

function renderMode(state) {
  // "mixed" while the workers' rng disagree (a change of mode under way), with the counts.
  const modes = Object.entries(state.rng_modes || {});
  els.mode.textContent = state.rng_mode || "–";
  els.modeDetail.textContent =
    modes.length > 1 ? modes.map(([mode, workers]) => `${mode} ${workers}`).join(" · ") : "";
  els.mode.title = modes.map(([mode, workers]) => `${mode}: ${workers} worker(s)`).join(", ");
}

function apply(state) {
  if (state.reset) {
    // A (re)connected server sends its whole history; keep what this page saw
    // before it (a restarted server starts with none), with a gap in between.
    const first = state.points.length ? state.points[0][0] : Infinity;
    const keep = xs.findIndex((t) => t >= first);
    if (keep >= 0) {
      xs = xs.slice(0, keep);
      ys = ys.slice(0, keep);
    }
    const last = xs.length ? xs[xs.length - 1] : null;
    if (last !== null && ys[ys.length - 1] !== null && last + 0.001 < first) {
      xs.push(last + 0.001);
      ys.push(null);
    }
    marks = marks.filter(([t]) => t < first);
  }
  for (const [t, rate] of state.points) {
    xs.push(t);
    ys.push(rate);
  }
  marks.push(...state.marks);
  const newest = xs.length ? xs[xs.length - 1] : 0;
  while (xs.length && xs[0] < newest - HISTORY_S) {
    xs.shift();
    ys.shift();
  }
  marks = marks.filter(([t]) => t >= newest - HISTORY_S);
  plot.setData([xs, ys]);
  els.chart.dataset.points = String(ys.filter((y) => y !== null).length);
  renderMarks();

  els.speed.textContent = formatSpeed(state.speed);
  els.speed.title = state.speed === null ? "" : `${number.format(Math.round(state.speed))} hashes/s`;
  els.speed.dataset.value = state.speed === null ? "" : String(state.speed);
  if (state.status !== "live" && state.reason) {
    els.speedNote.textContent = state.reason; // what is wrong, where the page's eyes are
  } else if (state.speed !== null && state.spread !== null) {
    els.speedNote.textContent =
      `± ${formatSpeed(state.spread)} · least-squares fit over ${state.window} s of Redis-timestamped samples`;
  } else {
    els.speedNote.textContent = "fitted over the last few seconds of Redis-timestamped samples";
  }
  showCount(els.coins, state.coins);
  showCount(els.hashes, state.hashes);
  showCount(els.workers, state.workers);
  renderMode(state);
  renderStages(state);

  if (state.status === "live" && polling !== null) setStatus("live", "live · polling", refusal);
  else if (state.status === "live") setStatus("live", "live");
  else setStatus(state.status, TROUBLE[state.status] || state.status, state.reason);
  if (polling !== null && state.status === "live") els.status.classList.add("polling");
}

function fromJson(body, ok) {
  // /json's answer as a state of the stream: the figures, and one chart point.
  const speed = body.hashes_per_second ?? null;
  const status = ok || body.status !== "unavailable" ? body.status : "redis-unreachable";
  return {
    status: status || "redis-unreachable",
    reason: body.reason ?? null,
    hashes: body.hashes ?? null,
    coins: body.coins ?? null,
    now: body.now ?? null,
    speed,
    spread: null,
    window: null,
    workers: body.workers ?? null,
    rng_mode: body.rng_mode ?? null,
    rng_modes: body.rng_modes || {},
    latency: body.latency || null,
    latency_share: body.latency_share || {},
    latency_unit: body.latency_unit || null,
    hashes_per_unit: body.hashes_per_unit ?? null,
    reset: false,
    points: body.now ? [[body.now, speed]] : [],
    marks: [],
  };
}

async function poll() {
  try {
    const reply = await fetch("/json", { cache: "no-store", signal: AbortSignal.timeout(POLL_MS * 2) });
    const state = fromJson(await reply.json(), reply.ok);
    lastMessage = Date.now();
    apply(state);
  } catch (error) {
    setStatus("disconnected", "disconnected – reconnecting…");
  }
}

function startPolling(reason) {
  // The page goes on, from /json, and says why: never blank while the stream is refused.
  refusal = reason;
  els.fallback.textContent =
    `Live updates refused: ${reason}. This page polls /json every ${POLL_MS / 1000} s meanwhile.`;
  els.fallback.hidden = false;
  if (polling === null) {
    polling = setInterval(poll, POLL_MS);
    poll();
  }
}

function stopPolling() {
  if (polling === null) return;
  clearInterval(polling);
  polling = null;
  refusal = "";
  els.fallback.hidden = true;
}

async function streamRefused() {
  // The web UI answered /events with an error (429: this address holds its share of streams;
  // 503: all are taken): ask again why, poll /json meanwhile, ask for the stream later.
  source = null;
  let wait = STREAM_RETRY_S;
  let reason = "the web UI refused the live stream";
  try {
    const reply = await fetch("/events", { cache: "no-store", signal: AbortSignal.timeout(5000) });
    if (reply.ok) {
      await reply.body.cancel(); // one is free again: take it with an EventSource
      connect();
      return;
    }
    wait = Number(reply.headers.get("Retry-After")) || wait;
    reason = (await reply.json()).reason || reason;
  } catch (error) {
    // the web UI went away meanwhile: polling says so
  }
  startPolling(reason);
  setTimeout(connect, wait * 1000);
}

function connect() {
  if (source) source.close();
  const stream = new EventSource("/events");
  source = stream;
  lastMessage = Date.now();
  stream.addEventListener("state", (event) => {
    lastMessage = Date.now();
    renewing = false;
    stopPolling();
    apply(JSON.parse(event.data));
  });
  stream.addEventListener("renew", () => {
    renewing = true; // the stream ends here; the browser resumes it (Last-Event-ID) at once
  });
  stream.onerror = () => {
    if (stream.readyState === EventSource.CLOSED) {
      stream.close();
      streamRefused(); // an HTTP error: the browser does not retry it by itself
    } else if (!renewing) {
      setStatus("disconnected", "disconnected – reconnecting…");
    }
  };
}

setInterval(() => {
  if (polling === null && source !== null && Date.now() - lastMessage > STALE_AFTER_MS) {
    setStatus("disconnected", "disconnected – reconnecting…");
    connect();
  }
}, 1000);

connect();
