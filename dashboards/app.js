/* saelab feature dashboard: renders index.html and feature.html from the data files under data/.
   Token text comes from arbitrary corpora, so the DOM is built with createElement and textContent only:
   no data ever passes through innerHTML. */
"use strict";

var saelab = (function () {
  var PAGE_SIZE = 200;
  var features = {};

  function el(tag, props, children) {
    var node = document.createElement(tag);
    Object.keys(props || {}).forEach(function (key) {
      if (key === "text") node.textContent = props[key];
      else if (key === "className") node.className = props[key];
      else node.setAttribute(key, props[key]);
    });
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (Number.isInteger(x) && a < 1e9) return x.toLocaleString("en-US");
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return String(Number(x.toPrecision(4)));
  }

  function fmtDensity(d) {
    if (d === null || d === undefined) return "–";
    if (d === 0) return "0";
    var pct = d * 100;
    return (pct < 0.01 ? pct.toExponential(1) : String(Number(pct.toPrecision(3)))) + "%";
  }

  /* Whitespace would be invisible: show newlines, returns and tabs as symbols, the spaces of an all-whitespace
     piece as middle dots, and an empty piece as ∅. */
  function visible(token) {
    if (token === "") return "∅";
    var shown = token.replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥");
    return token.trim() === "" ? shown.replace(/ /g, "·") : shown;
  }

  function tokenChip(token) {
    return el("span", { className: "chip", text: visible(token), title: JSON.stringify(token) });
  }

  function featureLink(id, label) {
    return el("a", { href: "feature.html?id=" + Number(id), text: label === undefined ? String(id) : label });
  }

  function badges(dead, dense) {
    var out = [];
    if (dead) out.push(el("span", { className: "badge dead", text: "dead" }));
    if (dense) out.push(el("span", { className: "badge dense", text: "dense" }));
    return out;
  }

  function bars(target, edges, counts, options) {
    if (!window.Plotly) {
      target.appendChild(el("p", { className: "muted", text: "plotly.min.js is missing: no chart." }));
      return;
    }
    var centers = [], widths = [], colours = [];
    for (var i = 0; i < counts.length; i++) {
      centers.push((edges[i] + edges[i + 1]) / 2);
      widths.push(edges[i + 1] - edges[i]);
      colours.push(options.signed && centers[i] < 0 ? "#2f6fdb" : "#e8590c");
    }
    var trace = { type: "bar", x: centers, y: counts, width: widths, marker: { color: colours },
                  hovertemplate: "%{x:.3g}: %{y}<extra></extra>" };
    Plotly.newPlot(target, [trace], {
      height: options.height || 240, margin: { l: 50, r: 10, t: 10, b: 45 }, bargap: 0,
      xaxis: { title: { text: options.xTitle } }, yaxis: { title: { text: options.yTitle }, type: options.yType || "linear" },
    }, { displayModeBar: false, responsive: true });
  }

  /* A latent's label and notes (window.SAELAB_LABELS, from data/labels.js), or null. */
  function labelOf(id) {
    var labels = window.SAELAB_LABELS || {};
    return labels[String(id)] || null;
  }

  /* The lower-cased text a search query is matched against for a token: the raw token and the token as shown. */
  function tokenSearchText(token) {
    return (token + "\u0000" + visible(token)).toLowerCase();
  }

  function indexRows() {
    var index = window.SAELAB_INDEX || { columns: [], rows: [] };
    return index.rows.map(function (row) {
      var record = {};
      index.columns.forEach(function (name, i) { record[name] = row[i]; });
      var label = labelOf(record.id);
      record.label = label ? label.label : "";
      record.notes = label ? label.notes : "";
      record.search = record.top_tokens.map(tokenSearchText).concat([record.label.toLowerCase(), record.notes.toLowerCase()]);
      return record;
    });
  }

  /* The token index (data/tokens.js) with each entry's search text, computed once per page:
     [{id, entries: [[token, hits], ...], search: [text per entry]}] for every latent of the SAE. */
  function tokenIndex() {
    var index = window.SAELAB_TOKENS;
    if (!index) return [];
    return index.latents.map(function (entries, id) {
      return { id: id, entries: entries, search: entries.map(function (entry) { return tokenSearchText(entry[0]); }) };
    });
  }

  /* Every latent of `latents` (tokenIndex()), with a page or not, with a top token that matches `query` (lower
     case): [{id, hits (its top activations on matching tokens), matched, tokens}], most hits first. */
  function tokenMatches(latents, query) {
    if (!query) return [];
    var out = [];
    latents.forEach(function (latent) {
      var entries = latent.entries, id = latent.id;
      var matched = entries.filter(function (_, i) { return latent.search[i].indexOf(query) >= 0; });
      if (matched.length) {
        var hits = matched.reduce(function (sum, entry) { return sum + entry[1]; }, 0);
        out.push({ id: id, hits: hits, matched: matched, tokens: entries });
      }
    });
    return out.sort(function (a, b) { return b.hits - a.hits || a.id - b.id; });
  }

  function labelCell(id) {
    var label = labelOf(id);
    if (!label) return [];
    return [el("span", { className: "label", text: label.label || "(notes)", title: label.notes || "" })];
  }

  function flatten(value, prefix, out) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      Object.keys(value).forEach(function (key) { flatten(value[key], prefix ? prefix + "." + key : key, out); });
    } else if (!Array.isArray(value)) {
      out.push([prefix, value]);
    }
    return out;
  }

  function header(summary) {
    document.getElementById("subtitle").textContent = [summary.architecture, summary.hook, summary.model,
      "d_sae " + fmt(summary.d_sae), fmt(summary.n_tokens) + " tokens"].join(" · ");
  }

  /* ---------------------------------------------------------------- index page */

  function renderIndex() {
    var summary = window.SAELAB_SUMMARY;
    var rows = indexRows();
    var latents = tokenIndex();
    document.title = "SAE features: " + summary.sae;
    document.getElementById("title").textContent = "SAE features: " + summary.sae;
    header(summary);

    var metrics = clear(document.getElementById("metrics"));
    var facts = [["latents in this dashboard", summary.n_features], ["signed activations", summary.signed ? "yes" : "no"]];
    if (summary.selection) facts.splice(1, 0, ["chosen by", summary.selection]);
    facts.forEach(function (kv) {
      metrics.appendChild(el("tr", {}, [el("th", { text: kv[0] }), el("td", { text: fmt(kv[1]) })]));
    });
    var names = summary.metric_names || {};
    flatten(summary.metrics || {}, "", []).forEach(function (kv) {
      var value = /fraction$/.test(kv[0]) ? fmtDensity(kv[1]) : fmt(kv[1]);
      metrics.appendChild(el("tr", {}, [el("th", { text: names[kv[0]] || kv[0], title: kv[0] }), el("td", { text: value })]));
    });
    var hist = summary.density_histogram;
    if (hist && hist.counts.length) {
      bars(document.getElementById("density-histogram"), hist.edges, hist.counts,
           { xTitle: "log10 firing density", yTitle: "latents" });
    }

    var state = { key: "id", dir: 1, page: 0, query: "", dead: true, dense: true };
    var saved = new URLSearchParams(location.hash.slice(1));
    if (saved.has("sort")) state.key = saved.get("sort");
    if (saved.has("dir")) state.dir = saved.get("dir") === "-1" ? -1 : 1;
    if (saved.has("page")) state.page = parseInt(saved.get("page"), 10) || 0;
    if (saved.has("q")) state.query = saved.get("q");
    if (saved.has("dead")) state.dead = saved.get("dead") === "1";
    if (saved.has("dense")) state.dense = saved.get("dense") === "1";

    var search = document.getElementById("search");
    var showDead = document.getElementById("show-dead");
    var showDense = document.getElementById("show-dense");
    search.value = state.query;
    showDead.checked = state.dead;
    showDense.checked = state.dense;
    var headers = Array.prototype.slice.call(document.querySelectorAll("#features th[data-key]"));
    var tbody = document.querySelector("#features tbody");

    function sortValue(row, key) {
      if (key === "flags") return (row.dead ? 2 : 0) + (row.dense ? 1 : 0);
      if (key === "label") return row.label || null;
      if (key === "top_tokens") return row.top_tokens.length ? row.top_tokens[0] : null;
      return row[key];
    }

    function compare(a, b) {
      var x = sortValue(a, state.key), y = sortValue(b, state.key);
      if (x === y) return a.id - b.id;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * state.dir;
    }

    function visibleRows() {
      var query = state.query.trim().toLowerCase();
      return rows.filter(function (row) {
        if (!state.dead && row.dead) return false;
        if (!state.dense && row.dense) return false;
        return !query || row.search.some(function (t) { return t.indexOf(query) >= 0; });
      }).sort(compare);
    }

    function render() {
      var shown = visibleRows();
      var pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
      state.page = Math.min(Math.max(0, state.page), pages - 1);
      clear(tbody);
      shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).forEach(function (row) {
        tbody.appendChild(el("tr", { "data-id": row.id }, [
          el("td", { className: "num" }, [featureLink(row.id)]),
          el("td", { className: "num", text: fmtDensity(row.density) }),
          el("td", { className: "num", text: fmt(row.max_act) }),
          el("td", { className: "num", text: fmt(row.mean_act) }),
          el("td", {}, badges(row.dead, row.dense)),
          el("td", {}, labelCell(row.id)),
          el("td", { className: "tokens" }, row.top_tokens.map(tokenChip)),
        ]));
      });
      renderTokenMatches(summary, rows, latents, state.query.trim().toLowerCase());
      headers.forEach(function (th) {
        var sorted = th.getAttribute("data-key") === state.key;
        th.setAttribute("aria-sort", sorted ? (state.dir > 0 ? "ascending" : "descending") : "none");
      });
      document.getElementById("count").textContent = shown.length + " of " + rows.length + " latents";
      document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
      document.getElementById("prev").disabled = state.page === 0;
      document.getElementById("next").disabled = state.page >= pages - 1;
      var hash = new URLSearchParams({ sort: state.key, dir: String(state.dir), page: String(state.page),
                                       q: state.query, dead: state.dead ? "1" : "0", dense: state.dense ? "1" : "0" });
      history.replaceState(null, "", "#" + hash.toString());
    }

    headers.forEach(function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        if (key === state.key) state.dir = -state.dir;
        else {
          state.key = key;
          state.dir = th.getAttribute("data-type") === "number" && key !== "id" ? -1 : 1;
        }
        state.page = 0;
        render();
      });
    });
    search.addEventListener("input", function () { state.query = search.value; state.page = 0; render(); });
    showDead.addEventListener("change", function () { state.dead = showDead.checked; state.page = 0; render(); });
    showDense.addEventListener("change", function () { state.dense = showDense.checked; state.page = 0; render(); });
    document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); });
    document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); });
    render();
  }

  var TOKEN_MATCHES_SHOWN = 100;

  /* Below the table: every latent of the SAE whose top tokens match the query, built or not (the token index). */
  function renderTokenMatches(summary, rows, latents, query) {
    var panel = document.getElementById("token-search");
    if (!panel) return;
    var built = {};
    rows.forEach(function (row) { built[row.id] = true; });
    var matches = tokenMatches(latents, query);
    panel.classList.toggle("hidden", !query || !window.SAELAB_TOKENS);
    var body = clear(document.querySelector("#token-matches tbody"));
    var topK = (window.SAELAB_TOKENS || {}).top_k;
    var unbuilt = matches.filter(function (m) { return !built[m.id]; });
    document.getElementById("token-count").textContent = matches.length + " of " + fmt(summary.d_sae) +
      " latents list a token matching \u201c" + query + "\u201d among the top tokens of their top " + topK +
      " activations; " + (matches.length - unbuilt.length) + " have a page here" +
      (matches.length > TOKEN_MATCHES_SHOWN ? " (the first " + TOKEN_MATCHES_SHOWN + " shown)" : "") + ".";
    matches.slice(0, TOKEN_MATCHES_SHOWN).forEach(function (m) {
      var link = built[m.id] ? featureLink(m.id)
        : el("a", { href: "feature.html?id=" + Number(m.id), className: "unbuilt", text: m.id + " (no page)",
                    title: "Not in this dashboard: the page explains how to build it" });
      var chips = m.tokens.map(function (entry) {
        var chip = tokenChip(entry[0]);
        chip.title = entry[1] + " of its top " + topK + " activations";
        if (m.matched.indexOf(entry) >= 0) chip.classList.add("match");
        return chip;
      });
      body.appendChild(el("tr", { "data-id": m.id }, [
        el("td", { className: "num" }, [link]),
        el("td", { className: "num", text: m.hits + " of " + topK }),
        el("td", {}, labelCell(m.id)),
        el("td", { className: "tokens" }, chips),
      ]));
    });
    var note = clear(document.getElementById("token-build"));
    if (unbuilt.length) {
      var ids = unbuilt.slice(0, TOKEN_MATCHES_SHOWN).map(function (m) { return m.id; });
      note.appendChild(document.createTextNode("Build pages for the matching latents without one: "));
      note.appendChild(el("code", { text: buildCommand(summary, ids, "dashboard_search") }));
    }
  }

  /* ---------------------------------------------------------------- feature page */

  function register(chunk) {
    chunk.features.forEach(function (feature) { features[feature.id] = feature; });
  }

  function chunkFile(id, chunkSize) {
    return "data/features_" + String(Math.floor(id / chunkSize)).padStart(4, "0") + ".js";
  }

  /* The command that builds pages for latents `ids`: this dashboard's own command (summary.build_command, written
     by `saelab dashboard`) completed with the selection of those latents, into a folder of their own (`out`). */
  function buildCommand(summary, ids, out) {
    var start = summary.build_command || "saelab dashboard --sae SAE_FOLDER --cache CACHE";
    return start + " --select ids --features " + ids.join(" ") + " --out " + out;
  }

  /* A page that cannot show a latent says why, with a way back to the index; no data file is requested. */
  function explain(status, sentence, summary, id) {
    clear(status);
    status.appendChild(document.createTextNode(sentence + " "));
    status.appendChild(el("a", { href: "index.html", text: "Back to the index of the latents this dashboard has." }));
    if (id !== undefined) {
      status.appendChild(el("br"));
      status.appendChild(document.createTextNode("To build a page for it: "));
      status.appendChild(el("code", { text: buildCommand(summary, [id], "dashboard_" + id) }));
    }
  }

  function renderFeature() {
    var summary = window.SAELAB_SUMMARY;
    var rows = indexRows();
    var raw = new URLSearchParams(location.search).get("id");
    var status = document.getElementById("status");
    if (raw === null && rows.length) raw = String(rows[0].id);
    if (raw === null) {
      explain(status, "No latent id given: open this page as feature.html?id=N.", summary);
      return;
    }
    if (!/^[0-9]+$/.test(raw)) {
      explain(status, "\u201c" + raw + "\u201d is not a latent number: open this page as feature.html?id=N, " +
              "N a latent id such as " + (rows.length ? rows[0].id : 0) + ".", summary);
      return;
    }
    var id = parseInt(raw, 10);
    header(summary);
    /* The index lists every latent the site holds, so a latent outside it is explained without asking for a
       chunk file that may not exist (a failed script load is a console error). */
    if (!rows.some(function (row) { return row.id === id; })) {
      if (summary.d_sae && id >= summary.d_sae) {
        explain(status, "Latent " + id + " does not exist: this SAE has latents 0 to " + fmt(summary.d_sae - 1) + ".",
                summary);
      } else {
        explain(status, "Latent " + id + " has no page in this dashboard.", summary, id);
        document.title = "Latent " + id + " · " + summary.sae;
        document.getElementById("title").textContent = "Latent " + id + " ";
        showLabel(id);
        livePanels(document.getElementById("feature"), id, null, summary);
      }
      return;
    }
    var script = document.createElement("script");
    script.charset = "utf-8";
    script.src = chunkFile(id, summary.chunk_size);
    script.onload = function () {
      if (features[id]) showFeature(features[id], summary, rows);
      else explain(status, "Latent " + id + " is listed in the index but missing from its data file; " +
                   "rebuild the dashboard.", summary);
    };
    script.onerror = function () {
      explain(status, "The data file " + script.getAttribute("src") + " of latent " + id + " is missing; " +
              "rebuild the dashboard.", summary);
    };
    document.head.appendChild(script);
  }

  function section(title, children, className) {
    return el("section", { className: "panel " + (className || "") }, [el("h2", { text: title })].concat(children));
  }

  function tokenLine(example, scale) {
    var line = el("div", { className: "tokens-line" });
    example.tokens.forEach(function (token, i) {
      var act = example.acts[i];
      var span = el("span", { className: "tok", text: visible(token), title: fmt(act), "data-act": String(act) });
      if (act !== 0 && act !== null) {
        var strength = Math.min(1, Math.abs(act) / scale);
        span.classList.add(act > 0 ? "pos" : "neg");
        span.style.backgroundColor = act > 0 ? "rgba(232, 89, 12, " + strength + ")"
                                             : "rgba(47, 111, 219, " + strength + ")";
        if (strength > 0.6) span.classList.add("strong");
      }
      if (i === example.focus) span.classList.add("focus");
      line.appendChild(span);
    });
    return line;
  }

  function exampleList(examples, scale) {
    if (!examples.length) return el("p", { className: "muted", text: "No examples." });
    return el("div", { className: "examples" }, examples.map(function (example) {
      var where = "context " + example.context + ", position " + example.position;
      if (example.heads) {
        where += "; DFA by head: " + example.heads.map(function (h, i) { return "H" + i + " " + fmt(h); }).join(", ");
      }
      var value = el("span", { className: "value", text: fmt(example.acts[example.focus]), title: where });
      return el("div", { className: "example", "data-context": example.context, "data-position": example.position },
                [value, tokenLine(example, scale)]);
    }));
  }

  function logitTable(title, entries) {
    return el("div", { className: "logits" }, [
      el("h3", { text: title }),
      el("table", {}, entries.map(function (entry) {
        return el("tr", {}, [el("td", {}, [tokenChip(entry[0])]), el("td", { className: "num", text: fmt(entry[1]) })]);
      })),
    ]);
  }

  function showFeature(f, summary, rows) {
    var main = clear(document.getElementById("feature"));
    var byId = {};
    rows.forEach(function (row) { byId[row.id] = row; });
    document.title = "Latent " + f.id + " · " + summary.sae;
    var title = clear(document.getElementById("title"));
    title.appendChild(document.createTextNode("Latent " + f.id + " "));
    badges(f.dead, f.dense).forEach(function (b) { title.appendChild(b); });
    showLabel(f.id);
    var position = rows.findIndex(function (row) { return row.id === f.id; });
    [["prev-feature", position - 1, "← latent "], ["next-feature", position + 1, "latent "]].forEach(function (nav) {
      var link = document.getElementById(nav[0]);
      if (position >= 0 && nav[1] >= 0 && nav[1] < rows.length) {
        var other = rows[nav[1]].id;
        link.href = "feature.html?id=" + Number(other);
        link.textContent = nav[0] === "prev-feature" ? nav[2] + other : nav[2] + other + " →";
        link.classList.remove("hidden");
      }
    });

    var stats = [["density", fmtDensity(f.density)], ["max", fmt(f.max_act)]];
    if (summary.signed) stats.push(["min", fmt(f.min_act)]);
    stats.push(["mean (firing)", fmt(f.mean_act)]);
    var statLine = el("div", { className: "stats" }, stats.map(function (kv) {
      return el("span", { className: "stat" }, [el("b", { text: kv[0] + " " }), kv[1]]);
    }));
    statLine.appendChild(el("span", { className: "stat" }, [el("b", { text: "top tokens " })].concat(f.top_tokens.map(tokenChip))));

    var scale = summary.signed ? Math.max(Math.abs(f.max_act || 0), Math.abs(f.min_act || 0)) : f.max_act;
    if (!(scale > 0)) scale = 1;
    var left = el("div", { className: "column wide" }, [
      section(summary.signed ? "Top activations (by |activation|)" : "Top activations", [exampleList(f.top, scale)]),
    ]);
    f.quantiles.slice().reverse().forEach(function (bin) {
      left.appendChild(section("Activations in [" + fmt(bin.low) + ", " + fmt(bin.high) + "]",
                               [exampleList(bin.examples, scale)], "quantile"));
    });

    var histogram = el("div", { id: "activation-histogram", className: "plot" });
    var right = el("div", { className: "column" }, [section("Activation histogram (firing tokens)", [histogram])]);
    if (f.logits) {
      right.appendChild(section("Logit effects", [el("div", { className: "logit-columns" }, [
        logitTable("promoted", f.logits.positive), logitTable("suppressed", f.logits.negative)])]));
    } else {
      right.appendChild(section("Logit effects", [el("p", { className: "muted",
        text: "Not available: the model has no unembedding (encoder) or the dashboard was built without one." })]));
    }
    /* Each neighbour is [id, cosine, top tokens]; only neighbours with a page here are links. */
    var unbuilt = [];
    var neighbours = el("table", { className: "neighbours" }, f.neighbours.map(function (entry) {
      var other = byId[entry[0]];
      var tokens = entry.length > 2 ? entry[2] : (other ? other.top_tokens.slice(0, 5) : []);
      if (!other) unbuilt.push(entry[0]);
      var cells = tokens.length ? tokens.map(tokenChip) : [el("span", { className: "muted", text: "never fired" })];
      return el("tr", {}, [
        el("td", { className: "num" }, [other ? featureLink(entry[0])
          : el("span", { className: "unbuilt", text: String(entry[0]),
                         title: "No page in this dashboard. Build one: " +
                                buildCommand(summary, [entry[0]], "dashboard_" + entry[0]) })]),
        el("td", { className: "num", text: fmt(entry[1]) }),
        el("td", { className: "tokens" }, cells.concat(other ? [] : [el("span", { className: "muted", text: " (no page)" })])),
      ]);
    }));
    var neighbourParts = [neighbours];
    if (unbuilt.length) {
      neighbourParts.push(el("p", { className: "muted note" }, [
        "Latents marked \u201cno page\u201d are not in this dashboard; build pages for them with ",
        el("code", { text: buildCommand(summary, unbuilt, "dashboard_near_" + f.id) }), ".",
      ]));
    }
    right.appendChild(section("Nearest latents (decoder cosine)", neighbourParts));
    var heads = null;
    if (f.heads) {
      heads = el("div", { id: "heads", className: "plot" });
      right.appendChild(section("Direct feature attribution by head", [heads]));
    }
    main.appendChild(statLine);
    var live = el("div", { id: "live" });
    main.appendChild(live);
    main.appendChild(el("div", { className: "columns" }, [left, right]));
    livePanels(live, f.id, f, summary);

    if (f.histogram && f.histogram.counts.length) {
      bars(histogram, f.histogram.edges, f.histogram.counts,
           { xTitle: "activation", yTitle: "tokens", signed: summary.signed });
    } else {
      histogram.appendChild(el("p", { className: "muted", text: "Never fired on the scanned tokens." }));
    }
    if (heads && window.Plotly) {
      Plotly.newPlot(heads, [{ type: "bar", x: f.heads.map(function (_, i) { return "H" + i; }), y: f.heads,
                               marker: { color: "#e8590c" } }],
                     { height: 220, margin: { l: 50, r: 10, t: 10, b: 30 }, yaxis: { title: { text: "mean DFA" } } },
                     { displayModeBar: false, responsive: true });
    }
  }

  /* The label and notes of latent `id` under the page title. */
  function showLabel(id) {
    var label = labelOf(id);
    var title = document.getElementById("title");
    var old = document.getElementById("feature-label");
    if (old) old.parentNode.removeChild(old);
    if (label && label.label) title.appendChild(el("span", { id: "feature-label", className: "label", text: label.label }));
    var notes = document.getElementById("feature-notes");
    if (!notes) {
      notes = el("p", { id: "feature-notes", className: "notes" });
      title.parentNode.insertBefore(notes, document.getElementById("subtitle").nextSibling);
    }
    notes.textContent = label ? label.notes : "";
  }

  /* ---------------------------------------------------------------- live panels (saelab serve) */

  /* POST a JSON body to the server; resolves with the answer, rejects with the server's one-sentence error. */
  function post(path, body) {
    return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(function (response) {
        return response.json().then(function (data) {
          if (!response.ok) throw new Error(data.error || response.statusText);
          return data;
        });
      });
  }

  /* callback(info) with the server's /api/info when this page came from `saelab serve`, else callback(null);
     a page opened from disk asks nothing (a request from file:// would be a console error). */
  function whenServed(callback) {
    if (location.protocol === "file:") {
      callback(null);
      return;
    }
    fetch("api/info").then(function (response) { return response.ok ? response.json() : null; })
      .then(callback, function () { callback(null); });
  }

  function livePanels(container, id, f, summary) {
    whenServed(function (info) {
      if (!info) {
        container.appendChild(el("p", { id: "live-hint", className: "muted note" }, [
          "To see this latent on your own text, steer with it and label it, serve this dashboard: ",
          el("code", { text: summary.serve_command || "saelab serve --sae SAE_FOLDER" }), "."]));
        return;
      }
      var scale = f ? (summary.signed ? Math.max(Math.abs(f.max_act || 0), Math.abs(f.min_act || 0)) : f.max_act) : 0;
      var panels = [textPanel(id, scale), steerPanel(id, scale, info)];
      if (info.labels_editable) panels.push(labelPanel(id));
      container.appendChild(el("div", { className: "columns live" }, panels));
    });
  }

  function field(label, input) {
    return el("label", { className: "field" }, [el("span", { text: label }), input]);
  }

  function busy(button, status, text) {
    button.disabled = true;
    status.className = "muted";
    status.textContent = text;
  }

  function failed(button, status) {
    return function (error) {
      button.disabled = false;
      status.className = "error";
      status.textContent = error.message;
    };
  }

  /* Your own text: this latent's activation on every token, and the latents most active anywhere in it. */
  function textPanel(id, scale) {
    var box = el("textarea", { id: "live-text", rows: "3", placeholder: "Type or paste some text" });
    var run = el("button", { id: "live-run", type: "button", text: "Show activations" });
    var status = el("span", { id: "live-status", className: "muted" });
    var out = el("div", { id: "live-out" });
    run.addEventListener("click", function () {
      busy(run, status, "running the model…");
      post("api/activations", { text: box.value, latent: id }).then(function (data) {
        run.disabled = false;
        status.textContent = "";
        clear(out);
        var firing = data.acts.filter(function (a) { return a !== 0; });
        var peak = firing.reduce(function (m, a) { return Math.max(m, Math.abs(a)); }, 0);
        out.appendChild(el("p", { id: "live-summary", className: "muted note",
          text: "Latent " + id + " fires on " + firing.length + " of " + data.tokens.length + " tokens" +
                (firing.length ? " (strongest " + fmt(peak) + ")." : ".") }));
        out.appendChild(tokenLine({ tokens: data.tokens, acts: data.acts, focus: -1 }, Math.max(scale || 0, peak) || 1));
        out.appendChild(el("h3", { text: "Latents most active in this text" }));
        var head = el("tr", {}, ["latent", "strongest", "on", "fires on", "label"].map(function (name) {
          return el("th", { text: name });
        }));
        out.appendChild(el("table", { id: "live-top", className: "neighbours" }, [el("thead", {}, [head]),
          el("tbody", {}, data.top.map(function (row) {
            var link = featureLink(row.latent);
            if (row.latent === id) link.classList.add("current");
            return el("tr", { "data-id": row.latent }, [
              el("td", { className: "num" }, [link]),
              el("td", { className: "num", text: fmt(row.max) }),
              el("td", {}, [tokenChip(row.token)]),
              el("td", { className: "num muted", text: row.firing + " of " + data.tokens.length }),
              el("td", {}, labelCell(row.latent)),
            ]);
          }))]));
      }, failed(run, status));
    });
    return section("Your text", [box, el("div", { className: "actions" }, [run, status]), out], "column wide");
  }

  /* Steering: completions of a prompt with and without this latent, and the change of the next-token loss. */
  function steerPanel(id, scale, info) {
    var strength = { add: Math.round(2 * (scale || 8)), clamp: Math.round(2 * (scale || 8)), project: 0 };
    var mode = el("select", { id: "steer-mode" }, ["add", "clamp", "project"].map(function (m) {
      return el("option", { value: m, text: m });
    }));
    var alpha = el("input", { id: "steer-alpha", type: "number", step: "any", value: String(strength.add) });
    mode.addEventListener("change", function () { alpha.value = String(strength[mode.value]); });
    var prompt = el("input", { id: "steer-prompt", type: "text", value: "In the beginning" });
    var count = el("input", { id: "steer-tokens", type: "number", min: "1", max: String(info.max_new_tokens), value: "24" });
    var run = el("button", { id: "steer-run", type: "button", text: "Generate" });
    var status = el("span", { id: "steer-status", className: "muted" });
    var out = el("div", { id: "steer-out" });
    run.addEventListener("click", function () {
      busy(run, status, "generating with and without steering…");
      post("api/steer", { latent: id, mode: mode.value, alpha: parseFloat(alpha.value), prompt: prompt.value,
                          max_new_tokens: parseInt(count.value, 10) }).then(function (data) {
        run.disabled = false;
        status.textContent = "";
        clear(out);
        out.appendChild(el("h3", { text: "without steering" }));
        out.appendChild(el("p", { id: "steer-clean", className: "completion", text: data.clean }));
        out.appendChild(el("h3", { text: mode.value + " latent " + id + " at " + alpha.value }));
        out.appendChild(el("p", { id: "steer-steered", className: "completion", text: data.steered }));
        var change = data.loss_change;
        out.appendChild(el("p", { id: "steer-loss", className: "muted note", title: data.reference,
          text: "Next-token loss on the prompt and the clean completion: " + fmt(data.clean_loss) + " without, " +
                fmt(data.steered_loss) + " with steering (" + (change >= 0 ? "+" : "") + fmt(change) + " nats)." }));
      }, failed(run, status));
    });
    var controls = el("div", { className: "fields" }, [
      field("mode", mode), field(info.signed ? "strength (negative: the opposite sign)" : "strength", alpha),
      field("new tokens", count)]);
    return section("Steer with latent " + id, [controls, field("prompt", prompt),
                                                el("div", { className: "actions" }, [run, status]), out], "column");
  }

  /* The latent's label and notes, saved to the SAE's labels.json. */
  function labelPanel(id) {
    var current = labelOf(id) || { label: "", notes: "" };
    var text = el("input", { id: "label-text", type: "text", value: current.label, maxlength: "200" });
    var notes = el("textarea", { id: "label-notes", rows: "3" });
    notes.value = current.notes;
    var save = el("button", { id: "label-save", type: "button", text: "Save" });
    var status = el("span", { id: "label-status", className: "muted" });
    save.addEventListener("click", function () {
      busy(save, status, "saving…");
      post("api/labels", { latent: id, label: text.value, notes: notes.value }).then(function (labels) {
        window.SAELAB_LABELS = labels;
        save.disabled = false;
        status.textContent = "saved";
        showLabel(id);
      }, failed(save, status));
    });
    return section("Label", [field("label", text), field("notes", notes), el("div", { className: "actions" }, [save, status])],
                   "column narrow");
  }

  return { register: register, renderIndex: renderIndex, renderFeature: renderFeature, visible: visible };
})();
