// qaas dashboard: polls /v1/jobs every POLL_MS, renders the jobs table (state badges, progress bars)
// and compares the metrics of succeeded jobs of one model in inline SVG bar charts.
// Everything is built with DOM APIs (textContent), no innerHTML with data, nothing fetched from outside.
"use strict";

(function () {
  const POLL_MS = 1500;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORE = "qaas.apiKey";
  const PREFERRED = [
    { re: /perplexity|ppl/i, lowerBetter: true },
    { re: /(^|_)kl(_|$)|kl_div|kldiv/i, lowerBetter: true },
    { re: /cosine|agreement/i, lowerBetter: false },
  ];

  const state = { key: null, jobs: [], metrics: new Map(), compareModel: null, timer: null, busy: false };
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ api
  async function api(path) {
    const res = await fetch(path, { headers: { "X-API-Key": state.key, Accept: "application/json" } });
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { msg = (await res.json()).error.message || msg; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return res.json();
  }

  function setStatus(kind, text) {
    const el = $("status");
    el.dataset.state = kind;
    el.textContent = text;
  }

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function bitsLabel(recipe) {
    const w = (recipe && recipe.weight) || {}, a = (recipe && recipe.activation) || {}, kv = (recipe && recipe.kv_cache) || {};
    let label = "W" + (w.bits ?? 8) + "A" + (a.bits ?? 8);
    if (w.granularity === "per_group" && w.group_size) label += "-g" + w.group_size;
    if (kv.bits && kv.bits < 16) label += "KV" + kv.bits;
    return label;
  }

  function recipeLabel(job) {
    const method = job.recipe && job.recipe.method ? job.recipe.method.name : "?";
    return job.recipe_name ? job.recipe_name + " (" + method + ")" : method;
  }

  function shortId(id) { return id.slice(0, 8); }

  function ago(iso) {
    const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (s < 60) return s + "s ago";
    if (s < 3600) return Math.round(s / 60) + "m ago";
    return Math.round(s / 3600) + "h ago";
  }

  function fmt(v) {
    if (typeof v !== "number" || !isFinite(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(5).replace(/\.?0+$/, "");
  }

  // ------------------------------------------------------------------ jobs table
  function renderJobs() {
    const body = $("jobs-body");
    const seen = new Set();
    const counts = {};
    state.jobs.forEach((job, index) => {
      counts[job.state] = (counts[job.state] || 0) + 1;
      seen.add(job.id);
      let row = body.querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
      if (!row) {
        row = el("tr", { class: "job-row", "data-job-id": job.id });
        row.append(
          el("td", { class: "mono job-id", title: job.id }, shortId(job.id)),
          el("td", { class: "model" }), el("td", { class: "recipe" }), el("td", { class: "bits mono" }),
          el("td", { class: "state-cell" }), el("td", { class: "progress-cell" }),
          el("td", { class: "message" }), el("td", { class: "updated" }),
        );
        const bar = el("div", { class: "bar", role: "progressbar" });
        bar.append(el("div", { class: "fill" }), el("span", { class: "pct" }));
        row.querySelector(".progress-cell").append(bar);
        row.querySelector(".state-cell").append(el("span", { class: "state" }));
      }
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
      row.dataset.state = job.state;
      row.querySelector(".model").textContent = job.model_id;
      row.querySelector(".recipe").textContent = recipeLabel(job);
      row.querySelector(".bits").textContent = bitsLabel(job.recipe);
      const badge = row.querySelector(".state");
      badge.className = "state state-" + job.state;
      badge.textContent = job.state;
      const bar = row.querySelector(".bar");
      bar.dataset.state = job.state;
      bar.setAttribute("aria-valuenow", String(job.progress));
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.querySelector(".fill").style.width = job.progress + "%";
      bar.querySelector(".pct").textContent = job.progress + "%";
      const msg = row.querySelector(".message");
      msg.textContent = job.error || job.message || "";
      msg.title = msg.textContent;
      row.querySelector(".updated").textContent = ago(job.updated_at);
    });
    for (const row of Array.from(body.querySelectorAll("tr.job-row"))) {
      if (!seen.has(row.dataset.jobId)) row.remove();
    }
    $("jobs-empty").hidden = state.jobs.length > 0;
    $("counts").textContent = Object.entries(counts).map(([k, v]) => v + " " + k).join(" · ");
  }

  // ------------------------------------------------------------------ comparison
  async function refreshMetrics() {
    const done = state.jobs.filter((j) => j.state === "succeeded" && !state.metrics.has(j.id));
    await Promise.all(done.map(async (job) => {
      const out = await api("/v1/jobs/" + encodeURIComponent(job.id) + "/metrics");
      state.metrics.set(job.id, out.metrics || {});
    }));
  }

  function comparableModels() {
    const byModel = new Map();
    for (const job of state.jobs) {
      if (job.state !== "succeeded" || !state.metrics.has(job.id)) continue;
      byModel.set(job.model_id, (byModel.get(job.model_id) || 0) + 1);
    }
    return Array.from(byModel.entries()).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  }

  function chartMetrics(jobs) {
    const keys = new Set();
    for (const job of jobs) {
      for (const [k, v] of Object.entries(state.metrics.get(job.id) || {})) if (typeof v === "number" && isFinite(v)) keys.add(k);
    }
    const all = Array.from(keys).sort();
    // "fp_<x>" is the unquantized model's value of "<x>" / "quant_<x>": a reference line on that chart
    const referenceOf = (k) => "fp_" + k.replace(/^quant_/, "");
    const references = new Set(all.filter((k) => !k.startsWith("fp_")).map(referenceOf).filter((r) => keys.has(r)));
    const chosen = [];
    for (const pref of PREFERRED) {
      for (const k of all) {
        if (pref.re.test(k) && !references.has(k) && !chosen.some((c) => c.key === k)) {
          chosen.push({ key: k, lowerBetter: pref.lowerBetter, reference: keys.has(referenceOf(k)) ? referenceOf(k) : null });
        }
      }
    }
    if (chosen.length === 0) for (const k of all.slice(0, 3)) chosen.push({ key: k, lowerBetter: null, reference: null });
    return { chosen: chosen.slice(0, 6), all };
  }

  function barChart(metric, jobs) {
    const rows = jobs
      .map((job) => ({ job, value: (state.metrics.get(job.id) || {})[metric.key] }))
      .filter((r) => typeof r.value === "number" && isFinite(r.value));
    const box = el("div", { class: "chart", "data-metric": metric.key });
    box.append(el("h3", {}, metric.key));
    box.append(el("p", { class: "hint" }, metric.lowerBetter === null ? "" : metric.lowerBetter ? "lower is better" : "higher is better"));
    const labelW = 170, barW = 220, valueW = 70, rowH = 22, pad = 6;
    const width = labelW + barW + valueW, height = pad * 2 + rows.length * rowH;
    const root = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": metric.key + " per job" });
    const refs = metric.reference
      ? rows.map((r) => (state.metrics.get(r.job.id) || {})[metric.reference]).filter((v) => typeof v === "number" && isFinite(v))
      : [];
    const ref = refs.length ? refs[0] : null;
    const max = Math.max(...rows.map((r) => Math.abs(r.value)), ref === null ? 0 : Math.abs(ref), 1e-12);
    const values = rows.map((r) => r.value);
    const best = metric.lowerBetter === null ? null : metric.lowerBetter ? Math.min(...values) : Math.max(...values);
    root.append(svg("line", { class: "axis", x1: labelW, y1: pad - 2, x2: labelW, y2: height - pad + 2 }));
    rows.forEach((r, i) => {
      const y = pad + i * rowH;
      const w = Math.max(1, (Math.abs(r.value) / max) * (barW - 4));
      const label = (r.job.recipe_name || (r.job.recipe.method || {}).name || "?") + " " + bitsLabel(r.job.recipe);
      root.append(svg("text", { x: labelW - 6, y: y + rowH / 2 + 4, "text-anchor": "end" }, label.slice(0, 26)));
      const rect = svg("rect", {
        class: "bar", x: labelW, y: y + 3, width: w.toFixed(1), height: rowH - 6, rx: 2,
        fill: r.value === best ? "#1f9d55" : "#2f6fde", "data-job-id": r.job.id, "data-value": r.value,
      });
      rect.append(svg("title", {}, shortId(r.job.id) + " " + metric.key + " = " + r.value));
      root.append(rect);
      root.append(svg("text", { class: "value", x: labelW + w + 4, y: y + rowH / 2 + 4 }, fmt(r.value)));
    });
    if (ref !== null) {
      const x = labelW + (Math.abs(ref) / max) * (barW - 4);
      root.append(svg("line", {
        class: "reference", x1: x.toFixed(1), y1: pad - 2, x2: x.toFixed(1), y2: height - pad + 2,
        stroke: "#d64545", "stroke-width": 1.5, "stroke-dasharray": "4 3", "data-value": ref,
      }));
      box.querySelector(".hint").textContent += (box.querySelector(".hint").textContent ? " · " : "") + "dashed: unquantized " + fmt(ref);
    }
    box.append(root);
    return box;
  }

  function renderCompare() {
    const select = $("compare-model");
    const models = comparableModels();
    const names = models.map(([m]) => m);
    if (!names.includes(state.compareModel)) state.compareModel = names[0] || null;
    const current = Array.from(select.options).map((o) => o.value);
    if (current.join("\n") !== names.join("\n")) {
      select.replaceChildren(...models.map(([m, n]) => el("option", { value: m }, m + " (" + n + " jobs)")));
    }
    if (state.compareModel) select.value = state.compareModel;

    const charts = $("charts");
    const table = $("metrics-table");
    const jobs = state.jobs.filter((j) => j.model_id === state.compareModel && state.metrics.has(j.id)).reverse();
    $("compare-empty").hidden = jobs.length > 0;
    table.hidden = jobs.length === 0;
    if (jobs.length === 0) { charts.replaceChildren(); return; }
    const { chosen, all } = chartMetrics(jobs);
    charts.replaceChildren(...chosen.map((m) => barChart(m, jobs)));

    const headRow = el("tr");
    headRow.append(el("th", {}, "Job"), el("th", {}, "Recipe"), el("th", {}, "Bits"), ...all.map((k) => el("th", {}, k)));
    $("metrics-head").replaceChildren(headRow);
    $("metrics-body").replaceChildren(...jobs.map((job) => {
      const m = state.metrics.get(job.id) || {};
      const tr = el("tr", { "data-job-id": job.id });
      tr.append(el("td", { class: "mono" }, shortId(job.id)), el("td", {}, recipeLabel(job)), el("td", { class: "mono" }, bitsLabel(job.recipe)),
        ...all.map((k) => el("td", { class: "mono" }, k in m ? fmt(m[k]) : "–")));
      return tr;
    }));
  }

  // ------------------------------------------------------------------ polling
  async function poll() {
    if (!state.key || state.busy) return;
    state.busy = true;
    try {
      const page = await api("/v1/jobs?limit=200");
      state.jobs = page.items || [];
      renderJobs();
      await refreshMetrics();
      renderCompare();
      setStatus("ok", "updated " + new Date().toLocaleTimeString());
    } catch (err) {
      setStatus("error", "error: " + err.message);
    } finally {
      state.busy = false;
    }
  }

  function connect(key) {
    state.key = key;
    state.metrics.clear();
    sessionStorage.setItem(KEY_STORE, key);
    if (state.timer) clearInterval(state.timer);
    setStatus("idle", "connecting…");
    poll();
    state.timer = setInterval(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("api-key").value.trim();
      if (key) connect(key);
    });
    $("compare-model").addEventListener("change", (ev) => { state.compareModel = ev.target.value; renderCompare(); });
    // a key in the URL fragment (#key=...) never reaches the server or its logs
    const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
    if (fromHash) history.replaceState(null, "", location.pathname);
    const key = fromHash || sessionStorage.getItem(KEY_STORE);
    if (key) { $("api-key").value = key; connect(key); }
  });
})();
