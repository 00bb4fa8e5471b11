// segflow retention console: plain JavaScript, SVG charts, no external assets.
// Pages are routed by the URL hash; each page polls its data every few seconds (live).
"use strict";

const POLL_MS = 3000;
const SVGNS = "http://www.w3.org/2000/svg";
const state = { role: "viewer", canPublish: false, page: null, timer: null, busy: false };

// -- DOM helpers (text is always inserted as text, never as HTML) -----------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function s(tag, attrs, ...kids) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const main = () => document.getElementById("main");
// append children, skipping null / undefined / false (DOM append would print them)
function add(el, ...kids) { for (const k of kids.flat()) if (k !== null && k !== undefined && k !== false) el.append(k); return el; }
// A page renders only while it is the current one (a slow answer for a page the user has
// left must not replace the page they are on).
function show(page, ...nodes) { if (state.page === page) main().replaceChildren(...nodes); }
const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const pct = (x, d = 1) => (x === null || x === undefined ? "–" : (100 * x).toFixed(d) + " %");
const pts = (x) => (x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + (100 * x).toFixed(1) + " pts");
function when(ms) {
  if (ms === null || ms === undefined) return "–";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 16) + " UTC";
}
function num(x) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Math.abs(x) >= 100 || Number.isInteger(x) ? x.toLocaleString("en-US", { maximumFractionDigits: 1 }) : x.toFixed(3);
}
const enc = encodeURIComponent;

// -- API --------------------------------------------------------------------------------------
async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...opts };
  if (opts.body !== undefined) {
    init.headers = { ...init.headers, "Content-Type": "application/json", "X-Segflow-Console": "1" };
    init.body = JSON.stringify(opts.body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) { location.assign("/console/login"); throw new Error("signed out"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok && !opts.allow?.includes(resp.status)) {
    const msg = body && body.error ? body.error.message : "HTTP " + resp.status;
    const err = new Error(msg); err.status = resp.status; err.body = body; throw err;
  }
  return { status: resp.status, body };
}

// -- charts -------------------------------------------------------------------------------------
function sparkline(points, w = 180, hgt = 36, label = "size over time") {
  const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, role: "img", "aria-label": label, class: "spark" });
  if (!points || points.length === 0) { svg.append(s("text", { x: 2, y: hgt / 2 + 4 }, "no samples yet")); return svg; }
  const ys = points.map((p) => p[1]);
  const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
  const x = (i) => (points.length === 1 ? w - 4 : 2 + (i * (w - 6)) / (points.length - 1));
  const y = (v) => hgt - 4 - ((v - lo) / span) * (hgt - 10);
  const d = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  svg.append(s("path", { d, fill: "none", stroke: "#1d4ed8", "stroke-width": 1.6 }));
  svg.append(s("circle", { cx: x(points.length - 1), cy: y(ys[ys.length - 1]), r: 2.5, fill: "#1d4ed8" }));
  svg.append(s("title", {}, `${label}: ${lo}–${hi} over ${points.length} samples`));
  return svg;
}

function flowBars(entered, exited, w = 220, hgt = 44, label = "entries and exits per hour") {
  const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, role: "img", "aria-label": label });
  const n = Math.max(entered.length, 1), mid = hgt / 2;
  const top = Math.max(1, ...entered, ...exited);
  const bw = (w - 4) / n;
  svg.append(s("line", { x1: 0, x2: w, y1: mid, y2: mid, stroke: "#cbd5e1" }));
  entered.forEach((v, i) => { if (v) svg.append(s("rect", { x: 2 + i * bw, y: mid - (v / top) * (mid - 2), width: Math.max(1, bw - 1), height: (v / top) * (mid - 2), fill: "#2563eb" })); });
  exited.forEach((v, i) => { if (v) svg.append(s("rect", { x: 2 + i * bw, y: mid, width: Math.max(1, bw - 1), height: (v / top) * (mid - 2), fill: "#dc2626" })); });
  const tin = entered.reduce((a, b) => a + b, 0), tout = exited.reduce((a, b) => a + b, 0);
  svg.append(s("title", {}, `${label}: ${tin} entries (blue, up) and ${tout} exits (red, down) over ${n} h`));
  return svg;
}

function featureBars(features) {
  const rows = (features || []).slice(0, 8);
  const w = 380, rowH = 22, hgt = rows.length * rowH + 10, labelW = 190, mid = labelW + (w - labelW) / 2;
  const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, role: "img", "aria-label": "top contributing features to churn risk", class: "features" });
  const top = Math.max(1e-9, ...rows.map((r) => Math.abs(r.contribution)));
  svg.append(s("line", { x1: mid, x2: mid, y1: 0, y2: hgt, stroke: "#94a3b8" }));
  rows.forEach((r, i) => {
    const y = 5 + i * rowH, len = (Math.abs(r.contribution) / top) * ((w - labelW) / 2 - 46);
    const label = `${r.name} = ${num(r.value)}`;
    svg.append(s("text", { x: 0, y: y + 14 }, label.length > 32 ? label.slice(0, 31) + "…" : label, s("title", {}, label)));
    svg.append(s("rect", { x: r.contribution >= 0 ? mid : mid - len, y: y + 3, width: Math.max(1, len), height: rowH - 8, fill: r.contribution >= 0 ? "#dc2626" : "#059669" }));
    svg.append(s("text", { x: r.contribution >= 0 ? mid + len + 4 : mid - len - 4, y: y + 14, "text-anchor": r.contribution >= 0 ? "start" : "end" }, (r.contribution >= 0 ? "+" : "") + r.contribution.toFixed(2)));
  });
  if (!rows.length) return h("p", { class: "muted" }, "No features yet.");
  return svg;
}

function intervalChart(rows, w = 900) {
  // uplift vs holdout with its 95 % interval, one line per variant row; 0 = no effect
  const shown = rows.filter((r) => r.uplift !== null && r.uplift !== undefined && r.uplift_ci);
  const rowH = 24, labelW = 260, hgt = Math.max(1, shown.length) * rowH + 26;
  const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, role: "img", "aria-label": "conversion uplift vs holdout with 95 % intervals", class: "intervals" });
  if (!shown.length) return h("p", { class: "muted" }, "No variant has an uplift yet (it needs a holdout and assigned customers).");
  let lo = Math.min(0, ...shown.map((r) => r.uplift_ci[0])), hi = Math.max(0, ...shown.map((r) => r.uplift_ci[1]));
  const pad = (hi - lo) * 0.08 || 0.01; lo -= pad; hi += pad;
  const x = (v) => labelW + ((v - lo) / (hi - lo)) * (w - labelW - 10);
  svg.append(s("line", { x1: x(0), x2: x(0), y1: 0, y2: hgt - 18, stroke: "#64748b", "stroke-dasharray": "3 3" }));
  svg.append(s("text", { x: x(0), y: hgt - 4, "text-anchor": "middle" }, "0"));
  svg.append(s("text", { x: x(lo), y: hgt - 4 }, pts(lo)));
  svg.append(s("text", { x: x(hi), y: hgt - 4, "text-anchor": "end" }, pts(hi)));
  shown.forEach((r, i) => {
    const y = 12 + i * rowH, [a, b] = r.uplift_ci;
    const color = a > 0 ? "#047857" : b < 0 ? "#b91c1c" : "#1d4ed8";
    svg.append(s("text", { x: 0, y: y + 4 }, `${r.playbook} · ${r.variant}`.slice(0, 40)));
    svg.append(s("line", { x1: x(a), x2: x(b), y1: y, y2: y, stroke: color, "stroke-width": 3 }));
    svg.append(s("line", { x1: x(a), x2: x(a), y1: y - 5, y2: y + 5, stroke: color }));
    svg.append(s("line", { x1: x(b), x2: x(b), y1: y - 5, y2: y + 5, stroke: color }));
    svg.append(s("circle", { cx: x(r.uplift), cy: y, r: 4, fill: color }, s("title", {}, `${pts(r.uplift)} [${pts(a)}, ${pts(b)}]`)));
  });
  return svg;
}

function highlightYaml(text) {
  const pre = h("pre", { class: "yaml", tabindex: 0, "aria-label": "segment definition (YAML)" });
  for (const line of (text || "").split("\n")) {
    const m = line.match(/^(\s*-?\s*)([\w .-]+:)?(.*)$/);
    const comment = line.trimStart().startsWith("#");
    if (comment) pre.append(h("span", { class: "c" }, line), "\n");
    else if (m) {
      pre.append(m[1]);
      if (m[2]) pre.append(h("span", { class: "k" }, m[2]));
      const rest = m[3];
      const ci = rest.indexOf(" #");
      const body = ci >= 0 ? rest.slice(0, ci) : rest, tail = ci >= 0 ? rest.slice(ci) : "";
      for (const part of body.split(/("[^"]*"|-?\b\d+(?:\.\d+)?[dhm%]?\b)/)) {
        if (!part) continue;
        if (part.startsWith('"')) pre.append(h("span", { class: "s" }, part));
        else if (/^-?\d/.test(part)) pre.append(h("span", { class: "n" }, part));
        else pre.append(part);
      }
      if (tail) pre.append(h("span", { class: "c" }, tail));
      pre.append("\n");
    } else pre.append(line, "\n");
  }
  return pre;
}

function table(headers, rows, opts = {}) {
  return h("table", { "aria-label": opts.label },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.num ? "num" : null, scope: "col" }, x.label || x)))),
    h("tbody", {}, rows));
}
const td = (v, cls) => h("td", { class: cls }, v);

// -- pages -----------------------------------------------------------------------------------------
const pages = {};

pages.segments = () => {
  let root = null;
  return {
    title: "Segments",
    async refresh() {
      const { body } = await api("/v1/console/segments");
      const fresh = h("div", { id: "segments-page" },
        h("h1", {}, "Segments ", h("span", { class: "muted" }, `definitions ${body.definition_version}`)),
        h("p", { class: "muted" }, `Sizes now, sampled every few seconds by the gateway; entries (blue) and exits (red) per hour of event time over the last 24 h up to ${when(body.watermark)}. Drift: the size moved by more than max(25 %, 50) within the last hour (the SegflowSegmentSizeDrift alert rule).`),
        table(
          ["Segment", { label: "Size", num: true }, "Size over time", "Entries / exits per hour", { label: "Last hour", num: true }, "Drift", { label: "Priority", num: true }, "Description", "Playbooks"],
          body.segments.map((seg) => h("tr", { "data-segment": seg.name },
            td(h("a", { href: "#/segment/" + enc(seg.name) }, seg.name), null),
            td(fmtInt(seg.size), "num size"),
            td(sparkline(seg.size_history, 160, 34, `${seg.name} size over time`)),
            td(flowBars(seg.entered_per_hour, seg.exited_per_hour, 200, 40, `${seg.name} entries and exits per hour`)),
            td(`+${seg.entered_last_hour} / −${seg.exited_last_hour}`, "num"),
            td(seg.drift.flag ? h("span", { class: "badge drift", title: `was ${seg.drift.baseline}` }, "DRIFT") : h("span", { class: "badge ok" }, "stable")),
            td(seg.priority ?? "–", "num"),
            td(seg.description || "–", "desc"),
            td(seg.playbooks.length ? seg.playbooks.join(", ") : h("span", { class: "muted" }, "none")),
          )),
          { label: "segments" }));
      if (root) root.replaceWith(fresh); else show(this, fresh);
      root = fresh;
    },
  };
};

pages.segment = (name) => {
  let sort = "churn", filter = "", offset = 0;
  const limit = 25;
  const head = h("div", {}), members = h("div", { id: "members" }), kpis = h("div", {});
  const filterBox = h("input", { id: "member-filter", type: "search", placeholder: "filter by customer id", "aria-label": "filter members by customer id" });
  const sortBox = h("select", { id: "member-sort", "aria-label": "sort members" }, h("option", { value: "churn" }, "churn score, highest first"), h("option", { value: "id" }, "customer id"));
  const prev = h("button", { class: "secondary", type: "button" }, "← Previous");
  const next = h("button", { class: "secondary", type: "button" }, "Next →");
  const info = h("span", { class: "muted", "aria-live": "polite" });
  let timer = null;
  filterBox.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { filter = filterBox.value.trim(); offset = 0; loadMembers(); }, 250); });
  sortBox.addEventListener("change", () => { sort = sortBox.value; offset = 0; loadMembers(); });
  prev.addEventListener("click", () => { offset = Math.max(0, offset - limit); loadMembers(); });
  next.addEventListener("click", () => { offset += limit; loadMembers(); });

  function fetchMembers() {
    const q = new URLSearchParams({ sort, offset: String(offset), limit: String(limit) });
    if (filter) q.set("q", filter);
    return api(`/v1/console/segments/${enc(name)}/members?${q}`);
  }
  async function loadMembers(pending) {
    const { body } = await (pending || fetchMembers());
    info.textContent = body.total ? `${offset + 1}–${Math.min(offset + limit, body.total)} of ${fmtInt(body.total)}` : "no members match";
    prev.disabled = offset === 0; next.disabled = offset + limit >= body.total;
    members.replaceChildren(table(["Customer", { label: "Churn probability", num: true }, "Member since"],
      body.members.map((m) => h("tr", {}, td(h("a", { href: "#/customer/" + enc(m.customer_id) }, m.customer_id)), td(pct(m.churn_probability), "num"), td(when(m.entered_at)))),
      { label: "members" }));
  }
  let built = false;
  return {
    title: name,
    async refresh() {
      const page = fetchMembers();  // both reads at once: the page waits for the slower
      page.catch(() => {});  // (a failure is reported by loadMembers below)
      const { body } = await api(`/v1/console/segments/${enc(name)}`);
      head.replaceChildren(
        h("h1", {}, body.name, " ", body.drift.flag ? h("span", { class: "badge drift" }, "DRIFT") : null),
        h("div", { class: "grid" },
          h("div", { class: "card" }, h("dl", { class: "kv" },
            h("dt", {}, "size now"), h("dd", { class: "size" }, fmtInt(body.size)),
            h("dt", {}, "definitions"), h("dd", {}, body.definition_version + (body.file_version && body.file_version !== body.definition_version ? ` (file: ${body.file_version})` : "")),
            h("dt", {}, "priority"), h("dd", {}, body.priority ?? "–"),
            h("dt", {}, "description"), h("dd", {}, body.description || "–"),
            h("dt", {}, "playbooks"), h("dd", {}, body.playbooks.length ? body.playbooks.map((p) => `${p.name} v${p.version}: ${p.steps.join(" → ")}; variants ${p.variants.join(", ") || "–"}, holdout ${pct(p.holdout, 0)}`).join("; ") : "none"))),
          h("div", { class: "card" }, h("h2", {}, "Size over time"), sparkline(body.size_history, 320, 70, "size over time"),
            h("h2", {}, "Entries and exits per hour (last 72 h of event time)"), flowBars(body.entered_per_hour, body.exited_per_hour, 320, 70))),
        h("h2", {}, "Definition"), body.yaml ? highlightYaml(body.yaml) : h("p", { class: "muted" }, "the definitions file the gateway reads has no such segment"));
      kpis.replaceChildren(h("h2", {}, "Campaign KPIs of its playbooks"), kpiTable(body.kpis), intervalChart(body.kpis));
      if (!built) {
        built = true;
        show(this, head, h("h2", {}, "Members"), h("div", { class: "controls" }, filterBox, sortBox, prev, next, info), members, kpis);
      }
      await loadMembers(page);
    },
  };
};

function kpiTable(rows) {
  return table(["Segment", "Playbook", "Variant", { label: "Assigned", num: true }, { label: "Sent", num: true }, { label: "Opened", num: true }, { label: "Clicked", num: true }, { label: "Converted", num: true }, { label: "Churned", num: true }, { label: "Conversion", num: true }, { label: "Uplift vs holdout [95 %]", num: true }],
    rows.map((k) => h("tr", { "data-kpi": `${k.segment}|${k.playbook}|${k.variant}` },
      td(k.segment), td(k.playbook), td(k.variant === "holdout" ? h("span", { class: "badge holdout" }, "holdout") : k.variant),
      td(fmtInt(k.assigned), "num"), td(fmtInt(k.sent), "num"), td(fmtInt(k.opened), "num"), td(fmtInt(k.clicked), "num"),
      td(fmtInt(k.converted), "num"), td(fmtInt(k.churned), "num"), td(pct(k.conversion_rate), "num"),
      td(k.uplift === null || k.uplift === undefined ? "–" : `${pts(k.uplift)} [${pts(k.uplift_ci[0])}, ${pts(k.uplift_ci[1])}]`, "num"))),
    { label: "campaign KPIs" });
}

pages.campaigns = () => ({
  title: "Campaigns",
  async refresh() {
    const { body } = await api("/v1/campaigns/kpis");
    show(this, h("div", { id: "campaigns-page" },
      h("h1", {}, "Campaigns"),
      h("p", { class: "muted" }, "Per segment × playbook × variant. Conversion and churn per assigned customer (intention to treat); uplift is the conversion rate minus the holdout's, with its 95 % interval (Newcombe): green when the whole interval is above 0, red when below."),
      kpiTable(body.kpis),
      h("h2", {}, "Uplift vs holdout, 95 % interval"),
      h("div", { class: "card" }, intervalChart(body.kpis))));
  },
});

function conditionsTable(conds) {
  if (!conds || !conds.length) return null;
  return h("table", { class: "conds", "aria-label": "conditions" },
    h("thead", {}, h("tr", {}, ["", "feature", "rule", "observed", "margin"].map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, conds.map((c) => h("tr", {},
      td(c.passed ? "pass" : "fail", c.passed ? "pass" : "fail"),
      td(c.feature), td(`${c.operator} ${c.threshold ?? c.threshold_text ?? ""}`),
      td(c.observed ?? c.observed_text ?? "–", "num"), td(c.margin === null || c.margin === undefined ? "–" : (c.margin >= 0 ? "+" : "") + num(c.margin), "num")))));
}

pages.customer = (cid) => ({
  title: "Customer " + cid,
  async refresh() {
    const { body } = await api(`/v1/console/customers/${enc(cid)}`);
    const sc = body.scores;
    const timeline = h("ol", { class: "timeline", id: "timeline", "aria-label": "timeline, newest first" },
      body.timeline.map((e) => {
        const li = h("li", { class: e.kind, "data-kind": e.kind, "data-segment": e.segment || null, "data-at": e.at, "data-active": e.kind === "entered" ? String(e.active) : null, "data-stay": e.stay ?? null, tabindex: 0 },
          h("span", { class: "when" }, when(e.at)));
        if (e.kind === "entered" || e.kind === "exited") {
          add(li, h("span", { class: "badge " + e.kind }, e.kind), " ", h("a", { href: "#/segment/" + enc(e.segment) }, e.segment),
            e.kind === "entered" && e.active ? h("span", { class: "muted" }, e.primary ? " · member now (primary)" : " · member now") : null,
            e.stay ? h("span", { class: "muted" }, ` · stay ${e.stay}`) : null,
            e.kind === "exited" && e.reason ? h("span", { class: "muted" }, ` · ${e.reason.replace(/_/g, " ")}`) : null,
            e.definition_version ? h("span", { class: "muted" }, ` · definitions ${e.definition_version}`) : null);
          if (e.rule && e.active) add(li, h("div", { class: "muted" }, e.rule === "exit" ? "stays a member while its exit rule does not hold:" : "why: its enter rule holds:"), conditionsTable(e.conditions));
          else if (e.rule && e.conditions.length) add(li, h("div", { class: "muted" }, e.kind === "entered" ? "why, when it entered:" : "why, when it left:"), conditionsTable(e.conditions));
        } else if (e.kind === "primary") {
          add(li, h("span", { class: "badge primary" }, "primary"), " ", e.segment ? h("a", { href: "#/segment/" + enc(e.segment) }, e.segment) : "none",
            e.previous ? h("span", { class: "muted" }, ` (was ${e.previous})`) : null);
        } else if (e.kind === "merged") {
          li.dataset.absorbed = e.absorbed_ids.join(" ");
          add(li, h("span", { class: "badge merged" }, "merged"), " absorbed ",
            ...e.absorbed_ids.flatMap((id, i) => [i ? ", " : "", h("code", {}, id)]),
            h("span", { class: "muted" }, ` · linked by ${e.cause_identifier_type.replace(/_/g, " ")}`));
        } else if (e.kind === "action") {
          add(li, h("span", { class: "badge " + e.status }, e.status), ` ${e.playbook} · ${e.step} via ${e.channel} (variant ${e.variant}, segment ${e.segment})`,
            e.reason ? h("span", { class: "muted" }, ` — ${e.reason}`) : null,
            e.due_at && e.due_at !== e.at ? h("span", { class: "muted" }, ` · due ${when(e.due_at)}`) : null);
        } else if (e.kind === "assigned") {
          add(li, h("span", { class: "badge " + (e.variant === "holdout" ? "holdout" : "scheduled") }, e.variant === "holdout" ? "holdout" : "assigned"),
            ` ${e.playbook} (segment ${e.segment}): variant ${e.variant}`);
        } else li.append("first seen");
        return li;
      }));
    show(this, h("div", { id: "customer-page" },
      h("h1", {}, "Customer ", h("code", {}, body.customer_id)),
      body.merged_into ? h("p", { id: "merged-into" }, "This profile was merged into ", h("a", { href: "#/customer/" + enc(body.merged_into) }, body.merged_into), ".") : null,
      h("div", { class: "grid" },
        h("div", { class: "card" }, h("h2", {}, "Identity"),
          h("dl", { class: "kv" }, h("dt", {}, "first seen"), h("dd", {}, when(body.first_seen_at)),
            h("dt", {}, "primary segment"), h("dd", {}, body.primary_segment || "–"),
            h("dt", {}, "definitions"), h("dd", {}, body.definition_version || "–")),
          table(["Identifier", "Keyed hash"], body.identifiers.map((i) => h("tr", {}, td(i.type), td(h("code", {}, i.hash.slice(0, 24) + "…")))), { label: "identifiers (hashed)" }),
          body.merges.length ? table(["Merged", "Absorbed ids", "Linked by"], body.merges.map((m) => h("tr", { "data-merge": m.merge_id }, td(when(m.occurred_at)), td(m.absorbed_ids.join(", ")), td(m.cause_identifier_type))), { label: "merges" }) : null),
        h("div", { class: "card" }, h("h2", {}, "Scores"),
          sc ? h("dl", { class: "kv" },
            h("dt", {}, "churn probability"), h("dd", { id: "churn" }, pct(sc.churn_probability)),
            h("dt", {}, "engagement"), h("dd", {}, num(sc.engagement_score)),
            h("dt", {}, "CLV"), h("dd", {}, num(sc.clv)),
            h("dt", {}, "lifecycle"), h("dd", {}, sc.lifecycle_stage),
            h("dt", {}, "model"), h("dd", {}, `${sc.model_version}, as of ${when(sc.as_of)}`)) : h("p", { class: "muted" }, "not scored yet"),
          h("h2", {}, "Top contributing features (churn log-odds)"), featureBars(sc ? sc.top_features : [])),
        h("div", { class: "card" }, h("h2", {}, "Recent events by type"),
          body.recent_events.length ? table(["Event type", { label: "3 days", num: true }, { label: "7 days", num: true }, { label: "28 days", num: true }],
            body.recent_events.map((e) => h("tr", { "data-event": e.type }, td(e.type.replace(/_/g, " ")), td(num(e.counts["3d"]), "num"), td(num(e.counts["7d"]), "num"), td(num(e.counts["28d"]), "num"))),
            { label: "recent events by type" }) : h("p", { class: "muted" }, "No events in the last 28 days."))),
      body.suppressions.length ? h("p", {}, "Suppressed: ", body.suppressions.join(", ")) : null,
      h("h2", {}, "Timeline: memberships with their explanation, dispatch decisions"),
      timeline));
  },
});

pages.whatif = () => {
  const area = h("textarea", { id: "defs", spellcheck: "false", "aria-label": "YAML being edited" });
  const out = h("div", { id: "whatif-result", "aria-live": "polite" });
  const what = h("select", { id: "whatif-kind", "aria-label": "what to edit" });
  const checkBtn = h("button", { type: "button", id: "check" }, "Check");
  const runBtn = h("button", { type: "button", id: "replay" }, "Run what-if (replay history)");
  const pubBtn = h("button", { type: "button", id: "publish" }, "Publish");
  const texts = {};  // the running text of every choice (segments and each playbook file)
  let loaded = false;
  const kind = () => (what.value === "segments" ? "segments" : "playbook");
  function problems(check) {
    if (check.valid) return h("p", { class: "ok-text" }, `valid: version ${check.version}, ${kind() === "segments" ? check.segments.length + " segments" : "segments " + check.segments.join(", ")}`);
    return h("div", {}, h("p", { class: "error" }, `${check.problems.length} error(s):`),
      h("ul", { class: "problems" }, check.problems.map((p) => h("li", {}, `line ${p.line}: ${p.field}: ${p.message}`))));
  }
  function publishState() {
    const segs = kind() === "segments";
    const can = segs ? state.canPublish : state.canPublishPlaybooks;
    pubBtn.disabled = !can;
    pubBtn.title = can ? (segs ? "write these definitions as the new version" : "write this playbook file; the dispatcher reloads it")
      : state.role !== "editor" ? "viewers cannot publish: sign in with the editor token"
      : segs ? "the gateway has no definitions file to publish to" : "the gateway has no playbook files to publish to (SEGFLOW_API_PLAYBOOKS)";
  }
  what.addEventListener("change", () => { area.value = texts[what.value] || ""; out.replaceChildren(); publishState(); });
  checkBtn.addEventListener("click", async () => {
    const { body } = await api("/v1/console/definitions/check", { method: "POST", body: { yaml: area.value, kind: kind() } });
    out.replaceChildren(problems(body));
  });
  runBtn.addEventListener("click", async () => {
    out.replaceChildren(h("p", { class: "muted" }, "replaying recorded history…"));
    runBtn.disabled = true;
    try {
      const { body } = await api("/v1/console/whatif", { method: "POST", body: { yaml: area.value, kind: kind() } });
      if (!body.check.valid) { out.replaceChildren(problems(body.check)); return; }
      out.replaceChildren(problems(body.check), diffView(body.diff));
    } catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
    finally { runBtn.disabled = false; }
  });
  pubBtn.addEventListener("click", async () => {
    try {
      const segs = kind() === "segments";
      const url = segs ? "/v1/console/definitions" : "/v1/console/playbooks/" + enc(what.value.slice(3));
      const { body } = await api(url, { method: "PUT", body: { yaml: area.value } });
      if (body.published) texts[what.value] = area.value;
      out.replaceChildren(!body.published ? problems(body.check) : h("p", { class: "ok-text", id: "published" }, `published ${segs ? "version" : ""} ${body.check.version}; the ${segs ? "segmenter" : "dispatcher"} reloads it within seconds`));
    } catch (e) { out.replaceChildren(h("p", { class: "error", id: "publish-error" }, e.message)); }
  });
  return {
    title: "What-if",
    async refresh() {
      if (loaded) return;  // never overwrite what the user is editing
      loaded = true;
      const [{ body }, { body: books }] = await Promise.all([api("/v1/console/definitions"), api("/v1/console/playbooks")]);
      texts.segments = body.yaml;
      what.append(h("option", { value: "segments" }, "segment definitions"));
      for (const b of books.playbooks) { texts["pb:" + b.file] = b.yaml; what.append(h("option", { value: "pb:" + b.file }, "playbook " + b.file)); }
      area.value = body.yaml;
      publishState();
      show(this, h("h1", {}, "What-if ", h("span", { class: "muted" }, `running definitions ${body.version}`)),
        h("p", { class: "muted" }, "Edit the segment definitions or a playbook, check them (the same loaders as segflow segments check and the dispatcher), replay the recorded history with them (segflow replay: nothing is sent) and compare with what runs."),
        h("div", { class: "controls" }, h("label", { for: "whatif-kind" }, "Edit"), what), area,
        h("div", { class: "controls" }, checkBtn, runBtn, pubBtn, h("span", { class: "muted" }, state.role === "editor" ? "you are an editor" : "read only")), out);
    },
  };
};

function diffView(diff) {
  const segs = diff.segments || {};
  const d3 = (p) => (p ? `${fmtInt(p.old)} → ${fmtInt(p.new)} (${p.delta >= 0 ? "+" : ""}${fmtInt(p.delta)})` : "–");
  const rows = Object.entries(segs).map(([name, d]) => h("tr", { "data-diff-segment": name, "data-entries-old": d.entries.old, "data-entries-new": d.entries.new },
    td(name), td(d3(d.entries), "num"), td(d3(d.exits), "num"), td(d3(d.final_size), "num"),
    td(fmtInt(d.would_enter.length), "num"), td(fmtInt(d.would_not_enter.length), "num")));
  const acts = (diff.actions || []).map((a) => h("tr", { "data-playbook": a.playbook, "data-channel": a.channel, "data-outcome": a.outcome, "data-old": a.old, "data-new": a.new },
    td(a.playbook), td(a.channel), td(a.outcome), td(d3(a), "num")));
  return h("div", {},
    h("p", { class: "muted" }, `history replayed: ${fmtInt(diff.history.scores)} scores, ${fmtInt(diff.history.events)} events; definitions ${diff.definitions.old} → ${diff.definitions.new}` + ((diff.playbooks?.changed || []).length ? `; playbooks changed: ${diff.playbooks.changed.join(", ")}` : "")),
    h("h2", {}, "Per segment (current → what-if)"),
    rows.length ? table(["Segment", { label: "Entries", num: true }, { label: "Exits", num: true }, { label: "Final size", num: true }, { label: "Would enter", num: true }, { label: "Would no longer enter", num: true }], rows, { label: "what-if difference per segment" }) : h("p", { id: "no-diff" }, "no segment changes"),
    h("h2", {}, "Actions per playbook × channel × outcome"),
    acts.length ? table(["Playbook", "Channel", "Outcome", { label: "Count", num: true }], acts, { label: "what-if actions" }) : h("p", { class: "muted" }, "no action changes"),
    h("details", {}, h("summary", {}, "full difference (JSON)"), h("pre", {}, JSON.stringify(diff, null, 2))));
}

// -- router and live polling ------------------------------------------------------------------
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const [name, arg] = [parts[0] || "segments", parts.slice(1).join("/")];
  const make = { segments: () => pages.segments(), campaigns: () => pages.campaigns(), whatif: () => pages.whatif(),
    segment: () => pages.segment(decodeURIComponent(arg)), customer: () => pages.customer(decodeURIComponent(arg)) }[name];
  document.querySelectorAll("[data-nav]").forEach((a) => a.toggleAttribute("aria-current", false));
  const nav = document.querySelector(`[data-nav="${name === "segment" ? "segments" : name}"]`);
  if (nav) nav.setAttribute("aria-current", "page");
  delete document.body.dataset.loaded;
  state.page = make ? make() : pages.segments();
  document.title = `${state.page.title} · segflow console`;
  main().replaceChildren(h("p", { class: "muted" }, "Loading…"));
  main().focus({ preventScroll: true });
  tick(true);
}

async function tick(first) {
  if (state.busy && !first) return;
  const page = state.page;
  state.busy = true;
  // keep keyboard focus across a re-render: refocus the element with the same href or id
  const focused = document.activeElement;
  const key = focused && focused !== document.body ? (focused.getAttribute("href") ? `[href="${CSS.escape(focused.getAttribute("href"))}"]` : focused.id ? "#" + CSS.escape(focused.id) : null) : null;
  try {
    await page.refresh();
    if (key && focused && !focused.isConnected) { const again = main().querySelector(key); if (again) again.focus({ preventScroll: true }); }
    if (page !== state.page) return;  // the user moved on meanwhile
    document.getElementById("live").textContent = "live · updated " + new Date().toLocaleTimeString("en-GB");
    document.body.dataset.loaded = location.hash || "#/segments";
  } catch (e) {
    if (page === state.page) {
      document.getElementById("live").textContent = "update failed: " + e.message;
      if (first) main().replaceChildren(h("p", { class: "error", role: "alert" }, e.message));
    }
  } finally { state.busy = false; }
}

async function start() {
  const { body } = await api("/v1/console/session");
  state.role = body.role; state.canPublish = body.can_publish; state.canPublishPlaybooks = body.can_publish_playbooks;
  document.getElementById("role").textContent = body.role;
  document.getElementById("find").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = document.getElementById("find-id").value.trim();
    if (v) location.hash = "#/customer/" + enc(v);
  });
  document.addEventListener("keydown", (ev) => {
    const typing = /INPUT|TEXTAREA|SELECT/.test(document.activeElement?.tagName || "");
    if (ev.key === "/" && !typing) { ev.preventDefault(); document.getElementById("find-id").focus(); }
  });
  window.addEventListener("hashchange", route);
  route();
  state.timer = setInterval(() => tick(false), POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
