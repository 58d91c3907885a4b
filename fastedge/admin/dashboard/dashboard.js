// fastedge admin dashboard: plain JavaScript, no dependencies, served by the admin listener.
//
// Authentication: the page was opened as /?token=...; the admin server answered with an
// HttpOnly session cookie, which the browser sends with every request below. Changes
// (PUT) also carry the X-Fastedge-Admin header: the server refuses cookie-authenticated
// changes without it, so another web page cannot make them (CSRF). Data from the server
// is only ever inserted as text (textContent), never as HTML.
"use strict";

(() => {
  const TICK_MS = 1000; // stats every tick; the rest every SLOW_EVERY ticks
  const SLOW_EVERY = 2;
  const ROUTES_EVERY = 10;
  const CHART_SECONDS = 300;
  const CARD_SECONDS = 5;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Drop ?token= from the address bar and history as soon as the page runs.
  if (window.location.search) {
    window.history.replaceState(null, "", window.location.pathname);
  }

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function table(headers, rows) {
    const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  function fmtNumber(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toLocaleString("en-US", {
      maximumFractionDigits: digits,
      minimumFractionDigits: digits,
    });
  }

  function fmtMs(value) {
    if (value === null || value === undefined) return "–";
    return value < 10 ? `${fmtNumber(value, 2)} ms` : `${fmtNumber(value, 1)} ms`;
  }

  // --- the admin API ----------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { "X-Fastedge-Admin": "dashboard" };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method: opts.method || "GET",
      credentials: "same-origin",
      cache: "no-store",
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const message = data && data.error ? data.error : `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  let authLost = false;

  function setStatus(text, bad) {
    const node = $("status");
    node.textContent = text;
    node.classList.toggle("bad", Boolean(bad));
  }

  let problem = null; // the last refresh's failure that is not one section's own

  // Run one section's refresh; a 404 means the feature is not configured on this server.
  // With id null (the statistics) a failure is shown in the status line instead.
  async function section(id, path, render, notConfigured) {
    try {
      const data = await api(path);
      render(data);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        authLost = true;
      } else if (id === null) {
        problem = `${path}: ${err.message}`;
      } else if (err instanceof ApiError && err.status === 404) {
        replace($(id), el("p", { class: "empty" }, notConfigured));
      } else {
        replace($(id), el("p", { class: "empty" }, `unavailable: ${err.message}`));
      }
    }
  }

  function replace(node, ...children) {
    node.replaceChildren(...children);
  }

  // --- stats and charts -------------------------------------------------------------------

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const exp = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * exp) return step * exp;
    }
    return 10 * exp;
  }

  // Draw series (arrays of numbers or null) as polylines over the last CHART_SECONDS.
  function drawChart(svg, series, points) {
    const width = 600;
    const height = 140;
    const top = 14;
    const bottom = height - 4;
    let max = 0;
    for (const s of series) {
      for (const v of s.values) if (v !== null && v > max) max = v;
    }
    max = niceMax(max);
    const children = [];
    for (const frac of [0, 0.5, 1]) {
      const y = bottom - (bottom - top) * frac;
      children.push(svgEl("line", { class: "grid", x1: 0, x2: width, y1: y, y2: y }));
    }
    const label = svgEl("text", { class: "axis", x: 4, y: 11 });
    label.textContent = fmtNumber(max, max < 10 ? 1 : 0);
    children.push(label);
    const n = CHART_SECONDS;
    const offset = n - points;
    for (const s of series) {
      // A gap (null) breaks the line: seconds without requests have no latency.
      let run = [];
      const flush = () => {
        if (run.length) {
          children.push(svgEl("polyline", { class: `line ${s.cls}`, points: run.join(" ") }));
        }
        run = [];
      };
      s.values.forEach((v, i) => {
        if (v === null) {
          flush();
          return;
        }
        const x = ((offset + i) / (n - 1)) * width;
        const y = bottom - (bottom - top) * (v / max);
        run.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      });
      flush();
    }
    svg.replaceChildren(...children);
    svg.dataset.points = String(points);
    svg.dataset.max = String(max);
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) {
      node.setAttribute(key === "class" ? "class" : key, String(value));
    }
    return node;
  }

  function renderStats(data) {
    const points = data.points.slice(-CHART_SECONDS);
    // Rates: the mean of the last few seconds (one second alone jumps around). Latency:
    // the latest second that had requests (quantiles of different seconds do not average).
    const recent = points.slice(-CARD_SECONDS);
    const mean = (key) => recent.reduce((sum, p) => sum + p[key], 0) / recent.length;
    const busy = points.filter((p) => p.p50_ms !== null);
    const latest = busy.length ? busy[busy.length - 1] : null;
    $("rps").textContent = recent.length ? fmtNumber(mean("rps"), 1) : "–";
    const errors = recent.length ? mean("errors") : 0;
    $("errors").textContent = recent.length ? fmtNumber(errors, 1) : "–";
    $("errors").classList.toggle("bad", errors > 0);
    $("p50").textContent = latest ? fmtMs(latest.p50_ms) : "–";
    $("p99").textContent = latest ? fmtMs(latest.p99_ms) : "–";
    $("total").textContent = fmtNumber(data.totals.requests, 0);
    document.body.dataset.samples = String(data.points.length);
    drawChart(
      $("chart-rate"),
      [
        { cls: "rate", values: points.map((p) => p.rps) },
        { cls: "err", values: points.map((p) => p.errors) },
      ],
      points.length,
    );
    drawChart(
      $("chart-latency"),
      [
        { cls: "p50", values: points.map((p) => p.p50_ms) },
        { cls: "p99", values: points.map((p) => p.p99_ms) },
      ],
      points.length,
    );
  }

  // --- traffic splits ---------------------------------------------------------------------

  // Blocks being edited are not overwritten by the periodic refresh.
  const editing = new Set();

  function renderTraffic(data) {
    const root = $("traffic");
    const splits = data.splits || [];
    if (!splits.length) {
      replace(root, el("p", { class: "empty" }, "no traffic splits configured ([traffic.NAME])"));
      return;
    }
    const seen = new Set();
    if (root.querySelector(".empty") || !root.querySelector(".split")) root.replaceChildren();
    for (const split of splits) {
      seen.add(split.name);
      let block = root.querySelector(`.split[data-split="${CSS.escape(split.name)}"]`);
      if (!block) {
        block = buildSplit(split);
        root.append(block);
      }
      if (!editing.has(split.name)) updateSplit(block, split.weights);
    }
    for (const block of root.querySelectorAll(".split")) {
      if (!seen.has(block.dataset.split)) block.remove();
    }
  }

  function buildSplit(split) {
    const versions = Object.keys(split.weights);
    const block = el("div", { class: "split", "data-split": split.name });
    const targets = versions
      .map((v) => `${v} → ${split.versions && split.versions[v] ? split.versions[v] : "?"}`)
      .join(", ");
    block.append(el("h3", {}, split.name, " ", el("span", { class: "empty" }, targets)));
    const status = el("span", { class: "save-status" });
    const inputs = {};
    const weights = el("div", { class: "weights" });
    for (const v of versions) {
      const input = el("input", {
        type: "number",
        min: 0,
        step: 1,
        class: "weight",
        "data-version": v,
        "aria-label": `${split.name} weight of ${v}`,
      });
      input.addEventListener("input", () => editing.add(split.name));
      inputs[v] = input;
      weights.append(el("label", {}, v, input));
    }
    const apply = el("button", { type: "button", class: "apply" }, "Apply");
    weights.append(apply, status);
    if (versions.length === 2) {
      // Two versions: one slider, its value is the second version's share in percent.
      const [a, b] = versions;
      const range = el("input", {
        type: "range",
        min: 0,
        max: 100,
        step: 1,
        class: "split-range",
        "data-split": split.name,
        "aria-label": `${split.name}: share of ${b} in percent`,
      });
      const readout = el("span", { class: "readout" });
      const sync = () => {
        const share = Number(range.value);
        inputs[a].value = String(100 - share);
        inputs[b].value = String(share);
        readout.textContent = `${a} ${100 - share}% · ${b} ${share}%`;
      };
      range.addEventListener("input", () => {
        editing.add(split.name);
        sync();
      });
      // Releasing the slider (or a key press on it) applies the new split at once.
      range.addEventListener("change", () => {
        sync();
        save(split.name, block);
      });
      block.append(el("div", { class: "slider" }, el("span", {}, a), range, el("span", {}, b), readout));
    }
    block.append(weights);
    apply.addEventListener("click", () => save(split.name, block));
    return block;
  }

  function updateSplit(block, weights) {
    for (const input of block.querySelectorAll("input.weight")) {
      const w = weights[input.dataset.version];
      input.value = w === undefined ? "" : String(w);
    }
    const range = block.querySelector("input.split-range");
    if (range) {
      const versions = Object.keys(weights);
      const total = versions.reduce((sum, v) => sum + weights[v], 0);
      const share = total > 0 ? Math.round((100 * weights[versions[1]]) / total) : 0;
      range.value = String(share);
      const readout = block.querySelector(".readout");
      readout.textContent = `${versions[0]} ${100 - share}% · ${versions[1]} ${share}%`;
    }
    block.dataset.weights = JSON.stringify(weights);
  }

  async function save(name, block) {
    const status = block.querySelector(".save-status");
    const body = {};
    for (const input of block.querySelectorAll("input.weight")) {
      body[input.dataset.version] = Number(input.value);
    }
    status.textContent = "saving…";
    status.classList.remove("bad");
    try {
      const result = await api(`/traffic/${encodeURIComponent(name)}`, { method: "PUT", body });
      const persisted = result && result.persisted === false ? " (not persisted)" : "";
      status.textContent = `saved${persisted}`;
      if (result && result.weights) updateSplit(block, result.weights);
    } catch (err) {
      status.textContent = `error: ${err.message}`;
      status.classList.add("bad");
    } finally {
      editing.delete(name);
    }
  }

  // --- flags ------------------------------------------------------------------------------

  function renderFlags(data) {
    const root = $("flags");
    const flags = data.flags || [];
    if (!flags.length) {
      replace(root, el("p", { class: "empty" }, "no feature flags configured ([flags.NAME])"));
      return;
    }
    const key = flags.map((f) => f.name).join("\n");
    if (root.dataset.key !== key) {
      root.dataset.key = key;
      const rows = flags.map((flag) => {
        const input = el("input", {
          type: "number",
          min: 0,
          max: 100,
          step: "any",
          class: "flag-percent",
          "data-flag": flag.name,
          "aria-label": `${flag.name} percent`,
        });
        input.addEventListener("input", () => editing.add(`flag:${flag.name}`));
        const status = el("span", { class: "save-status" });
        const button = el("button", { type: "button", class: "apply" }, "Set");
        button.addEventListener("click", () => saveFlag(flag.name, input, status));
        return el(
          "tr",
          { "data-flag": flag.name },
          el("td", {}, flag.name),
          el("td", {}, input, " % ", button, " ", status),
          el("td", { class: "user" }),
          el("td", { class: "upstream" }),
          el("td", { class: "header" }),
        );
      });
      replace(root, table(["flag", "rollout", "user id from", "canary upstream", "header"], rows));
    }
    for (const flag of flags) {
      const row = root.querySelector(`tr[data-flag="${CSS.escape(flag.name)}"]`);
      if (!row) continue;
      if (!editing.has(`flag:${flag.name}`)) row.querySelector("input").value = String(flag.percent);
      row.querySelector(".user").textContent = flag.user || "–";
      row.querySelector(".upstream").textContent = flag.upstream || "–";
      row.querySelector(".header").textContent = flag.header || "–";
    }
  }

  async function saveFlag(name, input, status) {
    status.textContent = "saving…";
    status.classList.remove("bad");
    try {
      const result = await api(`/flags/${encodeURIComponent(name)}`, {
        method: "PUT",
        body: { percent: Number(input.value) },
      });
      status.textContent = result && result.persisted === false ? "saved (not persisted)" : "saved";
    } catch (err) {
      status.textContent = `error: ${err.message}`;
      status.classList.add("bad");
    } finally {
      editing.delete(`flag:${name}`);
    }
  }

  // --- upstreams, routes, traces ----------------------------------------------------------

  function badge(text, cls) {
    return el("span", { class: `badge ${cls}` }, text);
  }

  function renderUpstreams(data) {
    const ups = data.upstreams || [];
    if (!ups.length) {
      replace($("upstreams"), el("p", { class: "empty" }, "no upstreams"));
      return;
    }
    const blocks = ups.map((up) => {
      const rows = (up.targets || []).map((t) => {
        const pool = t.pool || {};
        return el(
          "tr",
          { "data-target": t.url },
          el("td", {}, t.url),
          el("td", {}, t.weight),
          el("td", {}, t.priority),
          el("td", {}, t.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad")),
          el("td", {}, t.ejected ? badge("ejected", "warn") : "–"),
          el("td", {}, badge(t.breaker || "–", t.breaker || "")),
          el("td", {}, t.inflight),
          el("td", {}, `${pool.idle ?? 0} / ${pool.active ?? 0} / ${pool.waiting ?? 0}`),
        );
      });
      return el(
        "div",
        { class: "upstream", "data-upstream": up.name },
        el("h3", {}, up.name, " ", el("span", { class: "empty" }, up.balance || "")),
        table(
          ["target", "weight", "priority", "health", "outlier", "breaker", "in flight",
            "pool idle / active / waiting"],
          rows,
        ),
      );
    });
    replace($("upstreams"), ...blocks);
  }

  function renderRoutes(data) {
    const routes = data.routes || [];
    const rows = routes.map((r) => {
      const policies = Object.entries(r.policies || {})
        .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : typeof v === "object" ? "…" : v}`)
        .join("  ");
      return el(
        "tr",
        {},
        el("td", {}, r.name || r.prefix),
        el("td", {}, r.prefix),
        el("td", {}, r.host || "*"),
        el("td", {}, r.methods ? r.methods.join(",") : "*"),
        el("td", {}, r.upstream),
        el("td", {}, policies || "–"),
      );
    });
    replace($("routes"), table(["name", "prefix", "host", "methods", "upstream", "policies"], rows));
  }

  function renderTraces(data) {
    const spans = data.spans || [];
    const perTrace = new Map();
    for (const s of spans) perTrace.set(s.trace_id, (perTrace.get(s.trace_id) || 0) + 1);
    const roots = spans.filter((s) => s.kind === "server").slice(0, 15);
    if (!roots.length) {
      replace($("traces"), el("p", { class: "empty" }, "no spans yet"));
      return;
    }
    const rows = roots.map((s) => {
      const attrs = s.attributes || {};
      const when = new Date(s.start_unix_nano / 1e6).toLocaleTimeString();
      const status = attrs["http.response.status_code"];
      return el(
        "tr",
        { "data-trace": s.trace_id },
        el("td", {}, when),
        el("td", {}, s.name),
        el("td", {}, status === undefined ? "–" : status),
        el("td", {}, fmtMs(s.duration_ms)),
        el("td", {}, s.status === "error" ? badge("error", "bad") : badge("ok", "ok")),
        el("td", {}, perTrace.get(s.trace_id)),
        el("td", {}, el("code", {}, s.trace_id)),
      );
    });
    replace($("traces"), table(["time", "span", "status", "duration", "", "spans", "trace id"], rows));
  }

  // --- the refresh loop -------------------------------------------------------------------

  let tick = 0;

  async function refresh() {
    const jobs = [
      section(null, `/stats?seconds=${CHART_SECONDS}`, renderStats, null),
    ];
    if (tick % SLOW_EVERY === 0) {
      jobs.push(
        section("traffic", "/traffic", renderTraffic, "traffic splits are not configured"),
        section("flags", "/flags", renderFlags, "feature flags are not configured"),
        section("upstreams", "/upstreams", renderUpstreams, "upstream status is not available"),
        section("traces", "/traces?limit=200", renderTraces,
          "tracing is not configured ([tracing] memory_spans)"),
      );
    }
    if (tick % ROUTES_EVERY === 0) {
      jobs.push(section("routes", "/routes", renderRoutes, "routes are not available"));
    }
    tick += 1;
    await Promise.all(jobs);
    if (authLost) {
      setStatus("not signed in: open the dashboard URL with ?token=… again", true);
    } else if (problem !== null) {
      setStatus(`update failed: ${problem}`, true);
    } else {
      setStatus(`live · updated ${new Date().toLocaleTimeString()}`, false);
    }
  }

  async function loop() {
    try {
      authLost = false;
      problem = null;
      await refresh();
    } catch (err) {
      setStatus(`update failed: ${err.message}`, true);
    }
    window.setTimeout(loop, TICK_MS);
  }

  loop();
})();
