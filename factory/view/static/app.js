"use strict";
// factory view: one static page over the JSON API of factory/view/server.py, routed by the URL hash.
//
// Every value that comes from data is put on the page with createElement / textContent (the h()
// helper below), never parsed as HTML: rows are model output and may hold markup on purpose. The one
// exception is the dataset card, which the server renders from markdown with raw HTML turned off.

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** Builds an element: props set attributes (class, text, on<event>, dataset); children are nodes or text. */
function h(tag, props, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  return add(node, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** The same for SVG elements (they need their namespace). */
function s(tag, props, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setProps(node, props);
  return add(node, children);
}

function setProps(node, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "text") node.textContent = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

/** Appends children; strings become text nodes (append() never parses markup). */
function add(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const dash = () => h("span", {class: "null", title: "null"}, "–");

// ---------------------------------------------------------------------------------------------
// Formatting

/** A number with `digits` decimals (0: a count, with thousands separators); null as a dash. */
function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  return digits === 0 ? Math.round(x).toLocaleString("en-US") : x.toFixed(digits);
}

/** For values that may be counts or rates (diff metrics): counts stay whole. */
const fmtAuto = (x) => (typeof x === "number" && Number.isInteger(x) ? fmtNum(x, 0) : fmtNum(x, 3));

function fmtSigned(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  return (x > 0 ? "+" : x < 0 ? "−" : "±") + Math.abs(x).toFixed(digits);
}

function fmtInterval(ci, digits = 3, signed = false) {
  if (!Array.isArray(ci) || ci.length !== 2) return "";
  const f = signed ? (x) => fmtSigned(x, digits) : (x) => fmtNum(x, digits);
  return `[${f(ci[0])}, ${f(ci[1])}]`;
}

function fmtCost(x) {
  return x === null || x === undefined ? "–" : `$${x < 0.01 && x > 0 ? x.toFixed(5) : x.toFixed(4)}`;
}

function fmtTime(text) {
  // ISO 8601 from the manifest; minutes are enough in a table, the full stamp goes in the title.
  if (!text) return "–";
  return String(text)
    .replace("T", " ")
    .replace(/:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?$/, "");
}

function fmtSeconds(x) {
  if (x === null || x === undefined) return "–";
  return x < 10 ? x.toFixed(2) : x.toFixed(1);
}

/** A cell class for a signed change: up is green, down is red. */
const signClass = (x) => (x > 0 ? "good" : x < 0 ? "bad" : "");

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {}

/** GET (or POST when body is given) /api/<path>; an error answer throws its one-line message. */
async function api(path, params = {}, body = undefined) {
  const url = new URL(`api/${path}`, document.baseURI);
  for (const [key, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") url.searchParams.append(key, item);
    }
  }
  const init =
    body === undefined
      ? {}
      : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(`/api/${path}: no answer from the server (${err.message}); is \`factory view\` still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // An answer that is not JSON is reported below with its status.
  }
  if (!response.ok) {
    const why = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    throw new ApiError(`/api/${path}: ${why}`);
  }
  if (data === null) throw new ApiError(`/api/${path}: the answer was not JSON`);
  return data;
}

function showError(message) {
  document.getElementById("error-text").textContent = String(message);
  document.getElementById("error-bar").hidden = false;
}

function clearError() {
  document.getElementById("error-bar").hidden = true;
}

/** Runs an async action from a button or input; a failure goes to the error bar, the page stays. */
async function guarded(action) {
  try {
    return await action();
  } catch (err) {
    showError(err instanceof ApiError ? err.message : `page error: ${err.message}`);
    if (!(err instanceof ApiError)) console.error(err);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Routing: #/, #/v/<ds>/<N>[/rows|rejected|label|card][?query], #/diff/<ds>@<A>/<ds>@<B>, #/evolve/<run>

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const cut = raw.indexOf("?");
  const path = cut < 0 ? raw : raw.slice(0, cut);
  const params = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
  return {parts: path.split("/").filter(Boolean).map(decodeURIComponent), params};
}

/** A hash link; each part is encoded on its own, so a dataset id with slashes stays one part. */
function route(parts, params = null) {
  const query = params ? params.toString() : "";
  return "#/" + parts.map((p) => encodeURIComponent(String(p))).join("/") + (query ? `?${query}` : "");
}

const versionRoute = (ds, v, tab = null, params = null) => route(["v", ds, v, ...(tab ? [tab] : [])], params);

function splitAt(text) {
  // "<ds>@<N>": the last @ separates, since a folder name could hold one.
  const at = text.lastIndexOf("@");
  return at < 0 ? [text, ""] : [text.slice(0, at), text.slice(at + 1)];
}

let renderCount = 0;

async function render() {
  const token = ++renderCount;
  const app = document.getElementById("app");
  clearError();
  // A view checks alive() after each await, so a slow answer never paints over a newer page.
  const ctx = {alive: () => token === renderCount};
  let view;
  try {
    const {parts, params} = parseHash(); // throws on a malformed %-escape typed into the address bar
    if (parts.length === 0) view = await homeView(ctx);
    else if (parts[0] === "v" && parts.length >= 3)
      view = await versionView(ctx, parts[1], Number(parts[2]), parts[3] || "overview", params);
    else if (parts[0] === "diff" && parts.length === 3) view = await diffView(ctx, parts[1], parts[2]);
    else if (parts[0] === "evolve" && parts.length === 2) view = await evolveView(ctx, parts[1]);
    else throw new ApiError(`no page at #/${parts.join("/")}; start from the version list`);
  } catch (err) {
    if (!ctx.alive()) return;
    showError(err instanceof ApiError ? err.message : `page error: ${err.message}`);
    if (!(err instanceof ApiError)) console.error(err);
    view = h("p", {}, h("a", {href: "#/"}, "back to the version list"));
  }
  if (!ctx.alive()) return;
  app.replaceChildren(view);
  window.scrollTo(0, 0);
}

// ---------------------------------------------------------------------------------------------
// Small shared pieces

function table(headers, rows, props = {}) {
  return h(
    "table",
    {class: "grid", ...props},
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((x) => h("th", {}, x)),
      ),
    ),
    h("tbody", {}, rows),
  );
}

function problemLine(text) {
  return text ? h("p", {class: "problem", "data-testid": "problem"}, text) : null;
}

function section(title, ...children) {
  return h("section", {class: "section"}, h("h2", {}, title), children);
}

function numCell(x, digits = 3, col = null) {
  return h("td", {class: "num", "data-col": col}, fmtNum(x, digits));
}

function pill(text, cls = "") {
  return h("span", {class: `tag ${cls}`}, text);
}

// ---------------------------------------------------------------------------------------------
// Agreement: each judge, verifier and filter against people's verdicts

/**
 * A block showing how each step agrees with the verdicts on (ds, v). It is registered by
 * data-agreement-for, so a verdict given anywhere on the page redraws every copy of it.
 */
function agreementBlock(ds, v, agreement) {
  const block = h("div", {class: "agreement", dataset: {agreementFor: `${ds}@${v}`}});
  fillAgreement(block, ds, v, agreement);
  return block;
}

function fillAgreement(block, ds, v, agreement) {
  if (!agreement || !agreement.labelled) {
    block.hidden = true;
    block.replaceChildren();
    return;
  }
  block.hidden = false;
  // A step with a score (a judge) is also ranked against the verdicts, when the server gives that.
  const withAuc = agreement.steps.some((step) => step.auc !== null && step.auc !== undefined);
  const rows = agreement.steps.map((step) => {
    const disagree = step.disagree || [];
    const picked = new URLSearchParams({rows: disagree.map((d) => `${d.part}:${d.index}`).join(","), why: step.label});
    return h(
      "tr",
      {"data-step": step.label},
      h("td", {class: "mono"}, step.label),
      h("td", {}, pill(step.kind, `kind-${step.kind}`)),
      h("td", {class: "mono small"}, step.decision),
      numCell(step.n, 0, "n"),
      h(
        "td",
        {class: "num mono small", "data-col": "confusion", title: "tp / fp / fn / tn"},
        `${step.tp} / ${step.fp} / ${step.fn} / ${step.tn}`,
      ),
      numCell(step.precision, 3, "precision"),
      numCell(step.recall, 3, "recall"),
      h("td", {class: `num ${kappaClass(step.kappa)}`, "data-col": "kappa"}, fmtNum(step.kappa, 3)),
      withAuc ? numCell(step.auc, 3, "auc") : null,
      h(
        "td",
        {class: "num", "data-col": "disagree"},
        disagree.length === 0
          ? h("span", {class: "muted"}, "0")
          : h(
              "a",
              {
                href: versionRoute(ds, v, "rows", picked),
                "data-testid": "disagree-link",
                title: "the rows where this step and people disagree",
              },
              String(disagree.length),
            ),
      ),
    );
  });
  block.replaceChildren(
    h(
      "p",
      {class: "agreement-summary", "data-testid": "agreement-summary"},
      `${agreement.labelled} labelled: `,
      h("span", {class: "good"}, `${agreement.good} good`),
      ", ",
      h("span", {class: "bad"}, `${agreement.bad} bad`),
      h("span", {class: "muted"}, " · tp = kept & good, fp = kept & bad, fn = dropped & good, tn = dropped & bad"),
    ),
    table(
      [
        "step",
        "kind",
        "decision",
        "n",
        "tp / fp / fn / tn",
        "precision",
        "recall",
        "Cohen's κ",
        ...(withAuc ? ["AUC"] : []),
        "disagree",
      ],
      rows,
      {"data-testid": "agreement", "data-ds": ds, "data-v": v},
    ),
  );
}

function kappaClass(kappa) {
  // Landis and Koch: above 0.6 is substantial agreement, below 0.2 slight at best.
  if (kappa === null || kappa === undefined) return "";
  return kappa >= 0.6 ? "good" : kappa < 0.2 ? "bad" : "";
}

function redrawAgreements(ds, v, agreement, verdicts) {
  for (const block of document.querySelectorAll("[data-agreement-for]")) {
    if (block.dataset.agreementFor === `${ds}@${v}`) fillAgreement(block, ds, v, agreement);
  }
  for (const node of document.querySelectorAll("[data-verdict-count-for]")) {
    if (node.dataset.verdictCountFor === `${ds}@${v}` && verdicts) node.textContent = verdictText(verdicts);
  }
}

const verdictText = (v) => (v && v.count ? `${v.count} verdicts (${v.good} good, ${v.bad} bad)` : "no verdicts yet");

// ---------------------------------------------------------------------------------------------
// Home: verdict agreement first, then datasets and their versions, then evolve runs

async function homeView(ctx) {
  const index = await api("index");
  if (!ctx.alive()) return null;
  document.getElementById("root-path").textContent = index.root;
  const page = h("div", {class: "page"});
  const known = new Set(index.datasets.map((d) => d.id));
  if (index.agreement && index.agreement.length) {
    const judges = section(
      "Judges against people",
      index.agreement.map((a) =>
        h(
          "div",
          {class: "agreement-group"},
          h("h3", {}, h("a", {href: versionRoute(a.ds, a.version)}, `${a.ds} v${a.version}`)),
          agreementBlock(a.ds, a.version, a.agreement),
        ),
      ),
    );
    judges.id = "agreement-home";
    page.append(judges);
  }
  const datasets = index.datasets.map((d) =>
    h(
      "div",
      {class: "dataset", "data-testid": "dataset", "data-ds": d.id},
      h("h3", {}, d.name, d.id !== d.name ? h("span", {class: "muted mono small"}, ` ${d.id}`) : null),
      problemLine(d.error),
      d.versions.length ? versionsTable(d, known) : h("p", {class: "muted"}, "no versions"),
    ),
  );
  page.append(
    section("Datasets", datasets.length ? datasets : h("p", {class: "muted"}, "no dataset versions under this folder")),
  );
  page.append(
    section(
      "Evolve runs",
      index.evolve_runs.length
        ? evolveRunsTable(index.evolve_runs)
        : h("p", {class: "muted"}, "no evolve runs under this folder"),
    ),
  );
  return page;
}

function versionsTable(dataset, known) {
  const rows = [...dataset.versions]
    .sort((a, b) => b.version - a.version)
    .map((v) => {
      if (v.error) {
        return h("tr", {}, h("td", {}, `v${v.version}`), h("td", {colspan: 10, class: "problem"}, v.error));
      }
      const drops = Object.entries(v.drops || {}).flatMap(([step, reasons]) =>
        Object.entries(reasons).map(([reason, n]) =>
          h(
            "div",
            {class: "small mono"},
            h(
              "a",
              {href: versionRoute(dataset.id, v.version, "rejected", new URLSearchParams({step, reason}))},
              `${step} ${reason}`,
            ),
            ` ${n}`,
          ),
        ),
      );
      return h(
        "tr",
        {"data-v": v.version},
        h(
          "td",
          {},
          h(
            "a",
            {
              href: versionRoute(dataset.id, v.version),
              "data-testid": "version-link",
              "data-ds": dataset.id,
              "data-v": v.version,
            },
            `v${v.version}`,
          ),
        ),
        h("td", {class: "mono small", title: v.created_at}, fmtTime(v.created_at)),
        numCell(v.rows, 0),
        numCell(v.rejected_rows, 0),
        h("td", {}, drops.length ? drops : dash()),
        h(
          "td",
          {class: "num mono small"},
          `${fmtNum(v.tokens?.prompt ?? null, 0)} / ${fmtNum(v.tokens?.completion ?? null, 0)}`,
        ),
        h("td", {class: "num mono"}, fmtCost(v.cost_usd)),
        h("td", {class: "mono small"}, (v.models || []).join(", ") || "–"),
        h("td", {class: "mono small"}, parentLink(v.parent, known)),
        numCell(v.verdicts, 0),
      );
    });
  return table(
    [
      "version",
      "created",
      "rows",
      "rejected",
      "dropped by step and reason",
      "tokens in / out",
      "cost",
      "models",
      "parent",
      "verdicts",
    ],
    rows,
    {"data-testid": "versions", "data-ds": dataset.id},
  );
}

/** The parent is a path; when it ends in <known dataset id>/v<N> it links to that version. */
function parentLink(parent, known) {
  if (!parent) return dash();
  const match = String(parent)
    .replace(/\\/g, "/")
    .match(/^(.*)\/v(\d+)\/?$/);
  if (match) {
    for (const id of known) {
      if (match[1] === id || match[1].endsWith(`/${id}`)) {
        return h("a", {href: versionRoute(id, Number(match[2])), title: parent}, `${id} v${match[2]}`);
      }
    }
  }
  return h("span", {title: parent}, String(parent));
}

function evolveRunsTable(runs) {
  return table(
    ["run", "name", "rounds", "stopped"],
    runs.map((r) =>
      h(
        "tr",
        {},
        h(
          "td",
          {class: "mono"},
          h("a", {href: route(["evolve", r.id]), "data-testid": "evolve-link", "data-run": r.id}, r.id),
        ),
        h("td", {}, r.name ?? "–"),
        numCell(r.rounds, 0),
        h("td", {class: "small"}, r.stopped ?? "–", problemLine(r.error)),
      ),
    ),
    {"data-testid": "evolve-runs"},
  );
}

// ---------------------------------------------------------------------------------------------
// A version: header, tabs, and the tab's content

const TABS = [
  ["overview", "Overview"],
  ["rows", "Rows"],
  ["rejected", "Rejected"],
  ["label", "Label"],
  ["card", "Card"],
];

async function versionView(ctx, ds, v, tab, params) {
  if (!Number.isInteger(v)) throw new ApiError(`#/v/${ds}/${v}: the version must be a number, as in #/v/${ds}/1`);
  if (!TABS.some(([key]) => key === tab)) {
    throw new ApiError(`#/v/${ds}/${v}/${tab}: no such tab; use one of ${TABS.map(([key]) => key).join(", ")}`);
  }
  const info = await api("version", {ds, v});
  if (!ctx.alive()) return null;
  const page = h("div", {class: "page"}, versionHeader(info, tab));
  // Agreement first wherever verdicts are given, so a verdict's effect is seen at once.
  if (tab !== "card") page.append(agreementBlock(ds, v, info.agreement));
  let body;
  if (tab === "overview") body = overview(info);
  else if (tab === "rows" || tab === "rejected")
    body = await rowsView(ctx, info, tab === "rows" ? "data" : "rejected", params);
  else if (tab === "label") body = await labelView(ctx, info);
  else body = await cardView(ctx, info);
  if (!ctx.alive()) return null;
  page.append(body);
  return page;
}

function versionHeader(info, tab) {
  const {ds, version: v} = info;
  const tokens = Object.values(info.usage || {}).reduce(
    (sum, u) => [sum[0] + (u.prompt_tokens || 0), sum[1] + (u.completion_tokens || 0)],
    [0, 0],
  );
  const parent = info.parent
    ? h(
        "a",
        {href: versionRoute(info.parent.ds, info.parent.version), "data-testid": "parent-link"},
        `${info.parent.ds} v${info.parent.version}`,
      )
    : info.parent_text
      ? h("span", {class: "mono"}, info.parent_text)
      : "none";
  const siblings = (info.versions || []).filter((n) => n !== v);
  const compare = h(
    "select",
    {
      id: "compare-select",
      "data-testid": "compare-select",
      disabled: siblings.length === 0,
      onchange: (e) => {
        if (e.target.value) location.hash = route(["diff", `${ds}@${v}`, `${ds}@${e.target.value}`]);
      },
    },
    h("option", {value: ""}, siblings.length ? "compare with…" : "no other version"),
    siblings.map((n) => h("option", {value: n}, `v${n}`)),
  );
  const counts = {rows: info.parts?.data?.rows, rejected: info.parts?.rejected?.rows, label: info.sample_size};
  return h(
    "header",
    {class: "version-header"},
    h("nav", {class: "crumbs"}, h("a", {href: "#/"}, "datasets"), " / ", h("span", {class: "mono"}, ds)),
    h("h1", {id: "version-title"}, `${info.name} v${v}`),
    h(
      "dl",
      {class: "meta"},
      metaItem("created", h("span", {class: "mono"}, fmtTime(info.created_at))),
      metaItem("parent", parent),
      metaItem("models", h("span", {class: "mono"}, (info.models || []).join(", ") || "–")),
      metaItem("tokens in / out", h("span", {class: "mono"}, `${fmtNum(tokens[0], 0)} / ${fmtNum(tokens[1], 0)}`)),
      metaItem("cost", h("span", {class: "mono"}, fmtCost(info.cost_usd))),
      metaItem(
        "recipe",
        h(
          "span",
          {class: "mono", title: info.recipe_hash || ""},
          `${info.recipe_file || "–"} · ${String(info.recipe_hash || "–").slice(0, 12)}`,
        ),
      ),
      metaItem(
        "verdicts",
        h(
          "span",
          {"data-testid": "verdict-count", dataset: {verdictCountFor: `${ds}@${v}`}},
          verdictText(info.verdicts),
        ),
      ),
      info.evolve
        ? metaItem(
            "evolve",
            h("a", {href: route(["evolve", info.evolve.run])}, `${info.evolve.run} round ${info.evolve.round}`),
          )
        : null,
    ),
    h(
      "nav",
      {class: "tabs"},
      TABS.map(([key, label]) =>
        h(
          "a",
          {
            href: versionRoute(ds, v, key === "overview" ? null : key),
            class: key === tab ? "tab active" : "tab",
            "data-testid": `tab-${key}`,
          },
          label,
          counts[key] !== undefined && counts[key] !== null
            ? h("span", {class: "count"}, fmtNum(counts[key], 0))
            : null,
        ),
      ),
      h("span", {class: "tab-spacer"}),
      compare,
    ),
  );
}

const metaItem = (label, value) => h("div", {}, h("dt", {}, label), h("dd", {}, value));

function overview(info) {
  const steps = (info.steps || []).map((step) =>
    h(
      "tr",
      {"data-step": step.label},
      h("td", {class: "mono"}, step.label),
      numCell(step.rows_in, 0),
      numCell(step.rows_out, 0),
      h(
        "td",
        {},
        Object.keys(step.dropped || {}).length === 0
          ? dash()
          : Object.entries(step.dropped).map(([reason, n]) =>
              h(
                "div",
                {class: "mono small"},
                h(
                  "a",
                  {
                    href: versionRoute(
                      info.ds,
                      info.version,
                      "rejected",
                      new URLSearchParams({step: step.label, reason}),
                    ),
                    class: "bad",
                  },
                  reason,
                ),
                ` ${n}`,
              ),
            ),
      ),
      h("td", {class: "num mono"}, fmtSeconds(step.seconds)),
    ),
  );
  const columns = (part) =>
    Object.entries(info.parts?.[part]?.columns || {}).map(([name, dtype]) =>
      h("tr", {}, h("td", {class: "mono"}, name), h("td", {class: "mono muted small"}, dtype)),
    );
  return h(
    "div",
    {},
    section(
      "Steps",
      table(["step", "rows in", "rows out", "dropped by reason", "seconds"], steps, {id: "steps-table"}),
    ),
    h(
      "div",
      {class: "two-col"},
      section("Columns", table(["column", "type"], columns("data"))),
      section("Rejected columns", table(["column", "type"], columns("rejected"))),
    ),
    section(
      "LLM usage",
      table(
        ["model", "tokens in", "tokens out", "conversations", "from cache", "cost"],
        Object.entries(info.usage || {}).map(([model, u]) =>
          h(
            "tr",
            {},
            h("td", {class: "mono"}, model),
            numCell(u.prompt_tokens, 0),
            numCell(u.completion_tokens, 0),
            numCell(u.conversations, 0),
            numCell(u.cached_conversations, 0),
            h("td", {class: "num mono"}, fmtCost(u.cost_usd)),
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Rows: search, facets, paging; rejected rows by step and reason; a picked list (disagreements)

const PAGE = 50;

async function rowsView(ctx, info, part, params) {
  if (params.get("rows") !== null) return pickedRows(ctx, info, part, params);
  const {ds, version: v} = info;
  const state = {
    q: params.get("q") || "",
    f: params.getAll("f"),
    offset: Math.max(0, Number(params.get("offset")) || 0),
    step: params.get("step") || "",
    reason: params.get("reason") || "",
  };
  const list = h("div", {id: "rows-list", class: "rows-list"});
  const range = h("span", {id: "range", "data-testid": "range"});
  const ms = h("span", {id: "ms", class: "muted mono small", "data-testid": "ms"});
  const prev = h("button", {id: "prev", type: "button", "data-testid": "prev", onclick: () => move(-PAGE)}, "‹ prev");
  const next = h("button", {id: "next", type: "button", "data-testid": "next", onclick: () => move(PAGE)}, "next ›");

  const sync = () => {
    // The hash keeps the view's state (so a reload or a shared link shows the same rows) without a re-render.
    const p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    for (const f of state.f) p.append("f", f);
    if (state.step) p.set("step", state.step);
    if (state.reason) p.set("reason", state.reason);
    if (state.offset) p.set("offset", state.offset);
    history.replaceState(null, "", versionRoute(ds, v, part === "data" ? "rows" : "rejected", p));
  };
  let loads = 0;
  const load = () =>
    guarded(async () => {
      const mine = ++loads;
      const filters = {ds, v, part, q: state.q, f: state.f, step: state.step, reason: state.reason};
      const filtered = Boolean(state.q || state.f.length || state.step || state.reason);
      range.textContent = "loading…";
      const [page, count] = await Promise.all([
        api("rows", {...filters, offset: state.offset, limit: PAGE}),
        filtered ? api("count", filters) : null,
      ]);
      if (mine !== loads || !ctx.alive()) return;
      const total = page.total ?? count?.total ?? null;
      const first = fmtNum(state.offset + 1, 0);
      const last = fmtNum(state.offset + page.rows.length, 0);
      const of = total === null ? "?" : fmtNum(total, 0);
      range.textContent = page.rows.length === 0 ? "no rows match" : `rows ${first}–${last} of ${of}`;
      ms.textContent = `${page.ms.toFixed(1)} ms`;
      prev.disabled = state.offset === 0;
      next.disabled = !page.more;
      list.replaceChildren(...page.rows.map((row) => rowCard({ds, v, part, row})));
    });
  function move(delta) {
    state.offset = Math.max(0, state.offset + delta);
    sync();
    load();
    window.scrollTo(0, 0);
  }
  const restart = () => {
    state.offset = 0;
    sync();
    load();
  };

  let timer = null;
  const search = h("input", {
    id: "search",
    "data-testid": "search",
    type: "search",
    value: state.q,
    placeholder: "search any column",
    autocomplete: "off",
    oninput: (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        state.q = e.target.value;
        restart();
      }, 250);
    },
    onkeydown: (e) => {
      if (e.key === "Enter") {
        clearTimeout(timer);
        state.q = e.target.value;
        restart();
      }
    },
  });
  const facets = facetSelects(info.facets?.[part] || {}, state, restart);
  const clear = h(
    "button",
    {
      type: "button",
      id: "clear-filters",
      onclick: () => {
        location.hash = versionRoute(ds, v, part === "data" ? "rows" : "rejected");
      },
    },
    "clear",
  );

  const view = h(
    "div",
    {class: "rows-view"},
    part === "rejected" ? groupList(info, state) : null,
    h(
      "div",
      {class: "toolbar"},
      search,
      facets,
      clear,
      h("span", {class: "pager", "data-testid": "pager"}, prev, range, next, ms),
    ),
    list,
  );
  sync();
  await load();
  return view;
}

/** One select per low-cardinality column; the value sent is the facet value as JSON (the API's f=COL=VALUE). */
function facetSelects(facets, state, changed) {
  const chosen = new Map(state.f.map((f) => [f.slice(0, f.indexOf("=")), f.slice(f.indexOf("=") + 1)]));
  return Object.entries(facets).map(([column, values]) => {
    const select = h(
      "select",
      {
        "data-testid": "facet",
        "data-col": column,
        title: column,
        onchange: (e) => {
          state.f = state.f.filter((f) => !f.startsWith(`${column}=`));
          if (e.target.value !== "") state.f.push(`${column}=${e.target.value}`);
          changed();
        },
      },
      h("option", {value: ""}, `${column}: all`),
      values.map(([value, count]) => {
        const encoded = JSON.stringify(value);
        const shown =
          value === null ? "(null)" : String(value).length > 40 ? `${String(value).slice(0, 40)}…` : String(value);
        return h("option", {value: encoded, selected: chosen.get(column) === encoded}, `${shown} (${count})`);
      }),
    );
    select.classList.toggle("active", chosen.has(column));
    return select;
  });
}

function groupList(info, state) {
  const {ds, version: v} = info;
  const groups = info.groups || [];
  const all = !state.step && !state.reason;
  return h(
    "div",
    {class: "groups", "data-testid": "groups"},
    h("span", {class: "muted small"}, "dropped by "),
    h(
      "a",
      {href: versionRoute(ds, v, "rejected"), class: all ? "group active" : "group", "data-testid": "group-all"},
      "all ",
      h("span", {class: "count"}, fmtNum(info.parts?.rejected?.rows ?? null, 0)),
    ),
    groups.map((g) =>
      h(
        "a",
        {
          href: versionRoute(ds, v, "rejected", new URLSearchParams({step: g.step, reason: g.reason})),
          class: g.step === state.step && g.reason === state.reason ? "group active" : "group",
          "data-testid": "group",
          "data-step": g.step,
          "data-reason": g.reason,
        },
        h("span", {class: "mono"}, g.step),
        " ",
        h("span", {class: "bad"}, g.reason),
        " ",
        h("span", {class: "count"}, fmtNum(g.rows, 0)),
      ),
    ),
  );
}

async function pickedRows(ctx, info, part, params) {
  const {ds, version: v} = info;
  const picks = (params.get("rows") || "")
    .split(",")
    .filter(Boolean)
    .map((item) => {
      const [p, index] = item.split(":");
      return {part: p === "data" || p === "rejected" ? p : part, index: Number(index)};
    });
  const why = params.get("why");
  const answers = await Promise.allSettled(picks.map((p) => api("row", {ds, v, part: p.part, index: p.index})));
  if (!ctx.alive()) return null;
  const failed = answers.filter((a) => a.status === "rejected");
  if (failed.length)
    showError(`${failed.length} of ${picks.length} rows could not be read: ${failed[0].reason.message}`);
  return h(
    "div",
    {class: "rows-view"},
    h(
      "div",
      {class: "toolbar"},
      h(
        "span",
        {"data-testid": "picked-title"},
        `${picks.length} row${picks.length === 1 ? "" : "s"} where `,
        h("span", {class: "mono"}, why || "a step"),
        " and people disagree",
      ),
      h("span", {class: "tab-spacer"}),
      h("a", {href: versionRoute(ds, v, "rows")}, "all rows"),
    ),
    h(
      "div",
      {id: "rows-list", class: "rows-list"},
      answers.map((a, i) => (a.status === "fulfilled" ? rowCard({ds, v, part: picks[i].part, row: a.value}) : null)),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// A row as a card: verdict buttons and note, the drop (for rejected rows), then every field

const HIDDEN = new Set(["_index", "_hash", "_verdict"]);
const DROP_FIELDS = ["drop_step", "drop_reason", "drop_detail", "raw_reply"];

function rowCard({ds, v, part, row, stratum = null, onVerdict = null}) {
  const index = row._index;
  const card = h("article", {
    class: `row-card part-${part}`,
    "data-testid": "row",
    "data-part": part,
    "data-index": index,
  });
  let current = row._verdict || null;
  const state = h("span", {class: "verdict-state", "data-testid": "verdict-state"});
  const note = h("input", {
    class: "note",
    "data-testid": "note",
    type: "text",
    placeholder: "note",
    value: current?.note || "",
    onchange: () => {
      if (current) send(current.verdict);
    },
  });
  const buttons = ["good", "bad", "clear"].map((verdict) =>
    h(
      "button",
      {
        type: "button",
        class: `verdict-btn v-${verdict}`,
        "data-verdict": verdict,
        "data-testid": `verdict-${verdict}`,
        onclick: () => send(verdict),
      },
      verdict,
    ),
  );
  const paint = () => {
    state.textContent = current ? current.verdict : "unlabelled";
    state.dataset.verdict = current ? current.verdict : "";
    card.dataset.verdict = current ? current.verdict : "";
    for (const b of buttons) b.classList.toggle("on", Boolean(current) && b.dataset.verdict === current.verdict);
  };
  const send = (verdict) =>
    guarded(async () => {
      buttons.forEach((b) => {
        b.disabled = true;
      });
      try {
        const answer = await api("verdict", {}, {ds, v, part, index, verdict, note: note.value});
        current = verdict === "clear" ? null : {...(answer.record || {}), verdict, note: note.value};
        paint();
        redrawAgreements(ds, v, answer.agreement, answer.verdicts);
        if (onVerdict) onVerdict(current);
      } finally {
        buttons.forEach((b) => {
          b.disabled = false;
        });
      }
    });
  paint();
  card.append(
    h(
      "header",
      {class: "row-head"},
      h("span", {class: "idx mono", title: row._hash ? `hash ${row._hash}` : null}, `#${index}`),
      part === "rejected" ? pill("rejected", "bad") : null,
      stratum ? pill(stratum, stratum === "kept" ? "good" : "bad") : null,
      h("span", {class: "tab-spacer"}),
      state,
      buttons,
      note,
    ),
  );
  if (part === "rejected" || DROP_FIELDS.some((k) => row[k] !== undefined && row[k] !== null)) {
    card.append(
      h(
        "div",
        {class: "drop", "data-testid": "drop"},
        DROP_FIELDS.filter((k) => k in row).map((k) =>
          h(
            "div",
            {class: "drop-field", "data-field": k},
            h("span", {class: "key"}, k),
            row[k] === null
              ? dash()
              : k === "raw_reply"
                ? h("pre", {class: "raw"}, String(row[k]))
                : h("span", {class: "mono"}, String(row[k])),
          ),
        ),
      ),
    );
  }
  const fields = Object.keys(row).filter((k) => !HIDDEN.has(k) && !DROP_FIELDS.includes(k));
  card.append(
    h(
      "dl",
      {class: "fields"},
      fields.map((k) =>
        h("div", {class: "field", "data-field": k}, h("dt", {}, k), h("dd", {}, renderValue(row[k], k))),
      ),
    ),
  );
  return card;
}

const LONG = 400;

/** A value as the reader needs it: a conversation, folded long text, pretty JSON, or a muted dash for null. */
function renderValue(value, column = "") {
  if (value === null || value === undefined) return dash();
  if (column === "messages" && isConversation(value)) return conversation(value);
  if (typeof value === "object") return h("pre", {class: "json"}, JSON.stringify(value, null, 2));
  if (typeof value === "string") {
    const parsed = parseJsonText(value);
    if (parsed !== undefined) return h("pre", {class: "json"}, JSON.stringify(parsed, null, 2));
    return longText(value);
  }
  if (typeof value === "boolean") return h("span", {class: `mono ${value ? "good" : "bad"}`}, String(value));
  return h("span", {class: "mono"}, String(value));
}

const isConversation = (value) =>
  Array.isArray(value) && value.every((m) => m && typeof m === "object" && "role" in m && "content" in m);

/** A string that holds a JSON object or array (model replies often do); anything else gives undefined. */
function parseJsonText(text) {
  const t = text.trim();
  if (!((t.startsWith("{") && t.endsWith("}")) || (t.startsWith("[") && t.endsWith("]")))) return undefined;
  try {
    const parsed = JSON.parse(t);
    return parsed && typeof parsed === "object" ? parsed : undefined;
  } catch {
    return undefined;
  }
}

function longText(text) {
  if (text.length <= LONG) return h("span", {class: "text"}, text);
  return h(
    "details",
    {class: "long"},
    h(
      "summary",
      {},
      h("span", {class: "text"}, `${text.slice(0, 160)}…`),
      h("span", {class: "muted small"}, ` (${fmtNum(text.length, 0)} chars)`),
    ),
    h("div", {class: "text"}, text),
  );
}

function conversation(messages) {
  return h(
    "div",
    {class: "conversation"},
    messages.map((m) =>
      h(
        "div",
        {class: `msg role-${String(m.role).replace(/[^a-z_-]/gi, "")}`},
        h("div", {class: "role"}, m.role === "tool" && m.name ? `tool · ${m.name}` : String(m.role)),
        h("div", {class: "bubble"}, ...bubble(m)),
      ),
    ),
  );
}

// A message's text, and the tool calls it makes (OpenAI's layout: name and arguments as JSON text).
function bubble(m) {
  const calls = Array.isArray(m.tool_calls) ? m.tool_calls.filter((c) => c && c.function) : [];
  const parts = [];
  if (typeof m.content === "string") {
    if (m.content || !calls.length) parts.push(longText(m.content));
  } else if (m.content != null) {
    parts.push(renderValue(m.content));
  }
  for (const c of calls) parts.push(h("code", {class: "tool-call"}, `${c.function.name}(${c.function.arguments})`));
  return parts;
}

// ---------------------------------------------------------------------------------------------
// Label: the stratified sample, with progress

async function labelView(ctx, info) {
  const sample = await api("sample", {ds: info.ds, v: info.version});
  if (!ctx.alive()) return null;
  const done = new Map(sample.items.map((item) => [`${item.part}:${item.index}`, Boolean(item.row._verdict)]));
  const progress = h("p", {id: "label-progress", "data-testid": "label-progress"});
  const bar = h("progress", {max: sample.items.length || 1});
  const count = () => {
    const k = [...done.values()].filter(Boolean).length;
    progress.textContent = `${k} of ${sample.items.length} labelled`;
    bar.value = k;
  };
  count();
  return h(
    "div",
    {class: "label-view"},
    h(
      "div",
      {class: "toolbar"},
      progress,
      bar,
      h("span", {class: "muted small"}, "a stratified sample: kept rows and each drop reason"),
    ),
    h(
      "div",
      {id: "rows-list", class: "rows-list"},
      sample.items.map((item) =>
        rowCard({
          ds: info.ds,
          v: info.version,
          part: item.part,
          row: item.row,
          stratum: item.stratum,
          onVerdict: (verdict) => {
            done.set(`${item.part}:${item.index}`, Boolean(verdict));
            count();
          },
        }),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Card: the dataset card, rendered by the server

async function cardView(ctx, info) {
  const card = await api("card", {ds: info.ds, v: info.version});
  if (!ctx.alive()) return null;
  const body = h("div", {id: "card-body", class: "markdown", "data-testid": "card"});
  // The one place HTML is inserted: the server renders the card's markdown with raw HTML disabled.
  body.innerHTML = card.html;
  return h(
    "div",
    {},
    card.metadata
      ? h("details", {class: "card-meta"}, h("summary", {}, "YAML metadata"), h("pre", {class: "json"}, card.metadata))
      : null,
    body,
  );
}

// ---------------------------------------------------------------------------------------------
// Diff of two versions

async function diffView(ctx, a, b) {
  const d = await api("diff", {a, b});
  if (!ctx.alive()) return null;
  const [dsA, vA] = splitAt(a);
  const [dsB, vB] = splitAt(b);
  const link = (ds, v) => h("a", {href: versionRoute(ds, Number(v))}, `${ds} v${v}`);
  const r = d.rows;
  const shifts = (entries, title, id) =>
    section(
      title,
      entries.length === 0
        ? h("p", {class: "muted"}, "none")
        : table(
            ["name", "a", "b", "delta"],
            entries.map(([name, x]) =>
              h(
                "tr",
                {},
                h("td", {class: "mono"}, name),
                h("td", {class: "num"}, fmtAuto(x.a)),
                h("td", {class: "num"}, fmtAuto(x.b)),
                h(
                  "td",
                  {class: `num ${signClass(x.delta)}`},
                  x.delta === null ? "–" : fmtSigned(x.delta, Number.isInteger(x.delta) ? 0 : 3),
                ),
              ),
            ),
            {id},
          ),
    );
  const examples = (rows, title, cls) =>
    section(
      title,
      rows.length === 0
        ? h("p", {class: "muted"}, "none")
        : table(
            Object.keys(rows[0]),
            rows.map((row) =>
              h(
                "tr",
                {class: cls},
                Object.values(row).map((x) => h("td", {}, renderValue(x))),
              ),
            ),
          ),
    );
  return h(
    "div",
    {class: "page"},
    h("nav", {class: "crumbs"}, h("a", {href: "#/"}, "datasets")),
    h("h1", {}, "diff ", link(dsA, vA), " → ", link(dsB, vB)),
    h("p", {class: "muted small"}, "rows matched on ", h("span", {class: "mono"}, (d.key || []).join(", "))),
    table(
      ["rows in a", "rows in b", "added", "removed", "common", "columns added", "columns removed"],
      [
        h(
          "tr",
          {},
          numCell(r.a, 0),
          numCell(r.b, 0),
          h(
            "td",
            {class: `num ${r.added ? "good" : ""}`, "data-col": "added"},
            r.added ? `+${fmtNum(r.added, 0)}` : "0",
          ),
          h(
            "td",
            {class: `num ${r.removed ? "bad" : ""}`, "data-col": "removed"},
            r.removed ? `−${fmtNum(r.removed, 0)}` : "0",
          ),
          numCell(r.common, 0, "common"),
          h("td", {class: "mono good"}, d.columns.added.join(", ") || "–"),
          h("td", {class: "mono bad"}, d.columns.removed.join(", ") || "–"),
        ),
      ],
      {id: "diff-summary"},
    ),
    JSON.stringify(d.models?.a) !== JSON.stringify(d.models?.b)
      ? h("p", {class: "mono small"}, `models: ${(d.models.a || []).join(", ")} → ${(d.models.b || []).join(", ")}`)
      : null,
    section(
      "Recipe changes",
      d.recipe_changes.length === 0
        ? h("p", {class: "muted"}, "the recipes are the same")
        : table(
            ["path", "a", "b", "change"],
            d.recipe_changes.map((c) =>
              h(
                "tr",
                {},
                h("td", {class: "mono"}, c.path),
                h("td", {class: "mono bad"}, c.a === null || c.a === undefined ? dash() : JSON.stringify(c.a)),
                h("td", {class: "mono good"}, c.b === null || c.b === undefined ? dash() : JSON.stringify(c.b)),
                h("td", {class: "muted"}, c.change || ""),
              ),
            ),
            {id: "recipe-changes"},
          ),
    ),
    h(
      "div",
      {class: "two-col"},
      shifts(Object.entries(d.metric_shifts || {}), "Metric shifts", "metric-shifts"),
      shifts(Object.entries(d.drop_shifts || {}), "Drop shifts", "drop-shifts"),
    ),
    examples(d.examples?.added || [], `Added rows (first ${(d.examples?.added || []).length})`, "added"),
    examples(d.examples?.removed || [], `Removed rows (first ${(d.examples?.removed || []).length})`, "removed"),
  );
}

// ---------------------------------------------------------------------------------------------
// SVG charts, drawn here: a line chart with interval bars, and stacked bars

const PALETTE = ["#2b5d9b", "#c96f1b", "#3f8f5a", "#8a4fa3", "#b8405e", "#2f8c8c", "#7a6a2e", "#5d6470"];
const CHART = {w: 560, h: 270, left: 54, right: 14, top: 12, bottom: 42};

/** About `count` round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten. */
function niceTicks(lo, hi, count = 5) {
  if (lo === hi) {
    lo -= 0.5;
    hi += 0.5;
  }
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((x) => x >= raw);
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toFixed(10)));
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function tickText(t) {
  return Math.abs(t) >= 100 || Number.isInteger(t) ? String(t) : String(Number(t.toPrecision(3)));
}

/** The frame both chart kinds share: y grid and ticks, x ticks at the rounds, axis labels. */
function chartFrame({testid, xs, yTicks, xLabel, yLabel}) {
  const {w, h: height, left, right, top, bottom} = CHART;
  const plotW = w - left - right;
  const plotH = height - top - bottom;
  const lo = yTicks[0];
  const hi = yTicks[yTicks.length - 1];
  const y = (value) => top + plotH - ((value - lo) / (hi - lo)) * plotH;
  const slot = plotW / Math.max(xs.length, 1);
  const x = (round) => left + (xs.indexOf(round) + 0.5) * slot;
  const svg = s("svg", {viewBox: `0 0 ${w} ${height}`, class: "chart", "data-testid": testid, role: "img"});
  for (const t of yTicks) {
    svg.append(
      s("line", {x1: left, x2: w - right, y1: y(t), y2: y(t), class: t === 0 ? "zero" : "grid"}),
      s("text", {x: left - 6, y: y(t) + 3.5, class: "tick", "text-anchor": "end"}, tickText(t)),
    );
  }
  for (const r of xs)
    svg.append(s("text", {x: x(r), y: top + plotH + 15, class: "tick", "text-anchor": "middle"}, String(r)));
  svg.append(
    s("line", {x1: left, x2: left, y1: top, y2: top + plotH, class: "axis"}),
    s("line", {x1: left, x2: w - right, y1: top + plotH, y2: top + plotH, class: "axis"}),
    s("text", {x: left + plotW / 2, y: height - 6, class: "axis-label", "text-anchor": "middle"}, xLabel),
    s(
      "text",
      {
        x: 13,
        y: top + plotH / 2,
        class: "axis-label",
        "text-anchor": "middle",
        transform: `rotate(-90 13 ${top + plotH / 2})`,
      },
      yLabel,
    ),
  );
  return {svg, x, y, slot, plotH, top};
}

function legend(items) {
  return h(
    "div",
    {class: "legend"},
    items.map((item) =>
      h(
        "span",
        {class: "legend-item"},
        h("span", {class: `swatch ${item.dash ? "dashed" : ""} ${item.box ? "box" : ""}`, style: `--c: ${item.color}`}),
        item.name,
      ),
    ),
  );
}

/**
 * series: [{name, color, dash, points: [{x, y, ci: [lo, hi] | null}]}]; marks: [{x, y, title}] drawn as red crosses.
 * Series sit a few pixels apart on x so that their interval bars do not hide each other.
 */
function lineChart({testid, title, xs, series, marks = [], xLabel = "round", yLabel, yFloor = null, yCeil = null}) {
  const values = series
    .flatMap((sr) => sr.points.flatMap((p) => [p.y, ...(p.ci || [])]))
    .filter((v) => v !== null && v !== undefined);
  const box = h("figure", {class: "chart-box"}, h("figcaption", {}, title));
  if (values.length === 0 || xs.length === 0) return add(box, [h("p", {class: "muted"}, "no data yet")]);
  let lo = Math.min(...values, ...(yFloor === null ? [] : [yFloor]));
  const hi = Math.max(...values, ...(yCeil === null ? [] : [yCeil]));
  if (lo > 0 && yFloor === null) lo = Math.min(0, lo);
  const frame = chartFrame({testid, xs, yTicks: niceTicks(lo, hi), xLabel, yLabel});
  const {svg, x, y} = frame;
  const spread = Math.min(5, frame.slot / (series.length + 2));
  series.forEach((sr, i) => {
    const dx = (i - (series.length - 1) / 2) * spread;
    const pts = sr.points.filter((p) => p.y !== null && p.y !== undefined);
    if (pts.length > 1) {
      svg.append(
        s("polyline", {
          points: pts.map((p) => `${x(p.x) + dx},${y(p.y)}`).join(" "),
          class: "line",
          stroke: sr.color,
          "stroke-dasharray": sr.dash ? "5 3" : null,
        }),
      );
    }
    for (const p of pts) {
      const cx = x(p.x) + dx;
      const group = s("g", {class: "point"});
      if (p.ci) {
        group.append(
          s("line", {x1: cx, x2: cx, y1: y(p.ci[0]), y2: y(p.ci[1]), class: "ci", stroke: sr.color}),
          s("line", {x1: cx - 3, x2: cx + 3, y1: y(p.ci[0]), y2: y(p.ci[0]), class: "ci", stroke: sr.color}),
          s("line", {x1: cx - 3, x2: cx + 3, y1: y(p.ci[1]), y2: y(p.ci[1]), class: "ci", stroke: sr.color}),
        );
      }
      group.append(
        s(
          "circle",
          {cx, cy: y(p.y), r: 3.5, fill: sr.color, class: "pt", "data-series": sr.name, "data-x": p.x},
          s("title", {}, `${sr.name}, round ${p.x}: ${fmtNum(p.y, 3)}${p.ci ? ` 95 % CI ${fmtInterval(p.ci)}` : ""}`),
        ),
      );
      svg.append(group);
    }
  });
  for (const m of marks) {
    const cx = x(m.x);
    const cy = y(m.y);
    svg.append(
      s(
        "g",
        {class: "rollback", "data-testid": "rollback-mark", "data-x": m.x},
        s("line", {x1: cx - 7, x2: cx + 7, y1: cy - 7, y2: cy + 7}),
        s("line", {x1: cx - 7, x2: cx + 7, y1: cy + 7, y2: cy - 7}),
        s("circle", {cx, cy, r: 9, class: "hit"}, s("title", {}, m.title)),
      ),
    );
  }
  const items = series.map((sr) => ({name: sr.name, color: sr.color, dash: sr.dash}));
  if (marks.length) items.push({name: "rolled back", color: "var(--bad)"});
  return add(box, [svg, legend(items)]);
}

/** rows: [{x, parts: {phase: seconds}}]; one stacked bar per round. */
function stackedBars({testid, title, xs, phases, rows, yLabel}) {
  const box = h("figure", {class: "chart-box"}, h("figcaption", {}, title));
  const totals = rows.map((r) => phases.reduce((sum, p) => sum + (r.parts[p] || 0), 0));
  if (!rows.length || Math.max(...totals) <= 0) return add(box, [h("p", {class: "muted"}, "no timings yet")]);
  const frame = chartFrame({testid, xs, yTicks: niceTicks(0, Math.max(...totals)), xLabel: "round", yLabel});
  const {svg, x, y, slot} = frame;
  const width = Math.min(36, slot * 0.6);
  rows.forEach((r) => {
    let base = 0;
    phases.forEach((phase, i) => {
      const value = r.parts[phase] || 0;
      if (value <= 0) return;
      svg.append(
        s(
          "rect",
          {
            x: x(r.x) - width / 2,
            width,
            y: y(base + value),
            height: Math.max(0.5, y(base) - y(base + value)),
            fill: PALETTE[i % PALETTE.length],
            class: "bar",
            "data-phase": phase,
            "data-x": r.x,
          },
          s("title", {}, `round ${r.x}, ${phase}: ${fmtSeconds(value)} s`),
        ),
      );
      base += value;
    });
  });
  return add(box, [svg, legend(phases.map((p, i) => ({name: p, color: PALETTE[i % PALETTE.length], box: true})))]);
}

// ---------------------------------------------------------------------------------------------
// An evolve run: four charts and the round table

async function evolveView(ctx, id) {
  const run = await api("evolve", {run: id});
  if (!ctx.alive()) return null;
  const rounds = run.rounds || [];
  const xs = rounds.map((r) => r.round);
  const verifiers = run.verifiers || [];
  const color = (i) => PALETTE[(i + 1) % PALETTE.length];

  const accuracy = lineChart({
    testid: "chart-accuracy",
    title: "Eval accuracy and each verifier's precision J(f[w])",
    yLabel: "accuracy",
    xs,
    yFloor: 0,
    yCeil: 1,
    series: [
      {
        name: "eval accuracy",
        color: PALETTE[0],
        points: rounds.map((r) => ({x: r.round, y: r.accuracy, ci: r.accuracy_ci95})),
      },
      {
        name: "J(f) all samples",
        color: "#8b8f96",
        dash: true,
        points: rounds.map((r) => ({x: r.round, y: r.J_f, ci: null})),
      },
      ...verifiers.map((name, i) => ({
        name: `J(f[w]) ${name}`,
        color: color(i),
        points: rounds.map((r) => {
          const vr = r.verifiers?.[name];
          return {x: r.round, y: vr ? vr.J_w : null, ci: vr ? vr.J_w_ci95 : null};
        }),
      })),
    ],
    marks: rounds
      .filter((r) => r.rolled_back !== null && r.rolled_back !== undefined && r.accuracy !== null)
      .map((r) => ({x: r.round, y: r.accuracy, title: `round ${r.round} was rolled back to round ${r.rolled_back}`})),
  });

  const gain = lineChart({
    testid: "chart-gain",
    title: "Gain over round 0 (95 % CI) against each verifier's gap",
    yLabel: "accuracy difference",
    xs,
    series: [
      {
        name: "gain over round 0",
        color: PALETTE[0],
        points: rounds.map((r) => ({x: r.round, y: r.gain ? r.gain.gain : null, ci: r.gain ? r.gain.ci95 : null})),
      },
      ...verifiers.map((name, i) => ({
        name: `gap ${name}`,
        color: color(i),
        dash: true,
        points: rounds.map((r) => ({x: r.round, y: r.verifiers?.[name]?.gap ?? null, ci: null})),
      })),
    ],
  });

  const passKeys = [...new Set(rounds.flatMap((r) => Object.keys(r.pass_at_k || {})))].sort(
    (a, b) => Number(a.split("@")[1]) - Number(b.split("@")[1]),
  );
  const passk = lineChart({
    testid: "chart-passk",
    title: "pass@k and distinct-n of the samples",
    yLabel: "share",
    xs,
    yFloor: 0,
    yCeil: 1,
    series: [
      ...passKeys.map((key, i) => ({
        name: key,
        color: PALETTE[i % PALETTE.length],
        points: rounds.map((r) => ({x: r.round, y: r.pass_at_k?.[key] ?? null, ci: null})),
      })),
      ...["distinct_1", "distinct_2"].map((key, i) => ({
        name: key.replace("_", "-"),
        color: PALETTE[(passKeys.length + i + 2) % PALETTE.length],
        dash: true,
        points: rounds.map((r) => ({x: r.round, y: r.diversity?.[key] ?? null, ci: null})),
      })),
    ],
  });

  const phases = [...new Set(rounds.flatMap((r) => Object.keys(r.seconds || {})))];
  const seconds = stackedBars({
    testid: "chart-seconds",
    title: "Seconds per phase",
    xs,
    phases,
    yLabel: "seconds",
    rows: rounds.map((r) => ({x: r.round, parts: r.seconds || {}})),
  });

  const best = run.best;
  return h(
    "div",
    {class: "page"},
    h("nav", {class: "crumbs"}, h("a", {href: "#/"}, "datasets"), " / evolve"),
    h("h1", {id: "evolve-title"}, run.name || id, id === "." ? null : h("span", {class: "muted mono small"}, ` ${id}`)),
    problemLine(run.error),
    h(
      "dl",
      {class: "meta"},
      metaItem("base model", h("span", {class: "mono"}, run.base_model ?? "–")),
      metaItem("method", run.method ?? "–"),
      metaItem("recipe", h("span", {class: "mono"}, run.recipe_file ?? "–")),
      metaItem("stopped", run.stopped ?? "running or not stopped"),
      metaItem("best", best ? `round ${best.round}, accuracy ${fmtNum(best.accuracy, 3)}` : "–"),
    ),
    h("div", {class: "charts"}, accuracy, gain, passk, seconds),
    section("Rounds", roundsTable(rounds, verifiers)),
    rounds
      .filter((r) => r.agreement && r.agreement.labelled && r.version)
      .map((r) =>
        section(
          `Round ${r.round}: verifiers against people`,
          verifierAgreementTable(r.version.ds, r.version.version, r.verifier_agreement),
          agreementBlock(r.version.ds, r.version.version, r.agreement),
        ),
      ),
  );
}

/** The gap's verifiers (majority vote, judge score, reward model, the reference check) against people's verdicts
 * on the round's samples: accepted vs good. */
function verifierAgreementTable(ds, v, byVerifier) {
  if (!byVerifier || !Object.keys(byVerifier).length) return null;
  const rows = Object.entries(byVerifier).map(([name, a]) => {
    const disagree = a.disagree || [];
    const picked = new URLSearchParams({rows: disagree.map((d) => `${d.part}:${d.index}`).join(","), why: name});
    return h(
      "tr",
      {"data-verifier": name},
      h("td", {class: "mono"}, name),
      numCell(a.n, 0, "n"),
      h("td", {class: "num mono small", title: "tp / fp / fn / tn"}, `${a.tp} / ${a.fp} / ${a.fn} / ${a.tn}`),
      numCell(a.precision, 3, "precision"),
      numCell(a.recall, 3, "recall"),
      h("td", {class: `num ${kappaClass(a.kappa)}`, "data-col": "kappa"}, fmtNum(a.kappa, 3)),
      h(
        "td",
        {class: "num", "data-col": "disagree"},
        disagree.length === 0
          ? h("span", {class: "muted"}, "0")
          : h("a", {href: versionRoute(ds, v, "rows", picked)}, String(disagree.length)),
      ),
    );
  });
  return table(
    ["verifier (gap)", "n", "tp / fp / fn / tn", "precision", "recall", "Cohen's κ", "disagree"],
    rows,
    {"data-testid": "verifier-agreement"},
  );
}

function roundsTable(rounds, verifiers) {
  const rows = rounds.map((r) => {
    const g = r.gain;
    const gainCell = g
      ? h(
          "td",
          {
            class: `num mono ${g.significant ? signClass(g.gain) : ""}`,
            title:
              `${g.improved ?? "?"} items improved, ${g.worsened ?? "?"} worsened` +
              (g.significant ? "; the interval excludes zero" : ""),
          },
          `${fmtSigned(g.gain)} ${fmtInterval(g.ci95, 3, true)}${g.significant ? " *" : ""}`,
        )
      : h("td", {}, dash());
    const status =
      r.round === 0
        ? h("span", {class: "muted"}, "base model")
        : r.rolled_back !== null && r.rolled_back !== undefined
          ? h("span", {class: "bad", "data-testid": "rolled-back"}, `rolled back to round ${r.rolled_back}`)
          : h("span", {class: "good"}, "kept");
    return h(
      "tr",
      {"data-round": r.round},
      h("td", {class: "num"}, String(r.round)),
      h(
        "td",
        {class: "num mono"},
        fmtNum(r.accuracy, 3),
        r.accuracy_ci95 ? h("span", {class: "muted small"}, ` ${fmtInterval(r.accuracy_ci95)}`) : null,
      ),
      gainCell,
      numCell(r.win_rate, 3),
      numCell(r.J_f, 3),
      h(
        "td",
        {class: "mono small nowrap"},
        verifiers.map((name) => {
          const vr = r.verifiers?.[name];
          return vr ? h("div", {}, `${name}: gap ${fmtSigned(vr.gap)}, J ${fmtNum(vr.J_w, 3)} (${vr.accepted})`) : null;
        }),
      ),
      numCell(r.train_loss, 4),
      h("td", {}, status),
      h(
        "td",
        {class: "mono nowrap"},
        r.version
          ? h(
              "a",
              {href: versionRoute(r.version.ds, r.version.version), "data-testid": "round-version"},
              `${r.version.ds} v${r.version.version}`,
            )
          : dash(),
      ),
    );
  });
  return table(
    [
      "round",
      "accuracy [95 % CI]",
      "gain over round 0 [95 % CI]",
      "win rate",
      "J(f)",
      "verifiers: gap, J(f[w]) (accepted)",
      "train loss",
      "status",
      "dataset version",
    ],
    rows,
    {id: "rounds-table"},
  );
}

// ---------------------------------------------------------------------------------------------

document.getElementById("error-close").addEventListener("click", clearError);
window.addEventListener("hashchange", render);
// Errors outside a request (a bug in this page) still reach the bar instead of failing silently.
window.addEventListener("unhandledrejection", (e) => showError(`page error: ${e.reason?.message || e.reason}`));
render();
