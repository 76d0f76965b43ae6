// featcircuits viewer: draws an attribution graph (mode "graph") or a set of feature dashboards
// (mode "dashboards") from the JSON in the fc-data script element. Plain DOM + SVG, no dependencies.
// Every string from the data goes through textContent or setAttribute, never innerHTML, so token
// strings cannot inject markup.
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("fc-data").textContent);
  var app = document.getElementById("fc-app");
  var info = data.dashboard_info || {};
  var dashboards = data.dashboards || {};

  // ---- small helpers ------------------------------------------------------------------------
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    for (var key in attrs) if (Object.prototype.hasOwnProperty.call(attrs, key)) node.setAttribute(key, attrs[key]);
    return node;
  }
  // SentencePiece byte-fallback pieces ("<0x0A>") stand for one byte: show printable ASCII as itself.
  function byteFallback(text) {
    var match = /^<0x([0-9A-Fa-f]{2})>$/.exec(text);
    if (!match) return text;
    var code = parseInt(match[1], 16);
    return code === 10 || code === 9 || code === 13 || (code >= 32 && code < 127) ? String.fromCharCode(code) : text;
  }
  // Whitespace-only and empty tokens would be invisible: show them with visible stand-ins.
  function showToken(token) {
    var text = byteFallback(String(token === undefined || token === null ? "" : token));
    if (text.length === 0) return "\u2205";
    return text.replace(/\u2581/g, " ").replace(/ /g, "\u2423").replace(/\n/g, "\u23ce")
      .replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
  }
  // Inside running text spaces read better as spaces; only line breaks and tabs get stand-ins.
  function contextToken(token) {
    return byteFallback(String(token)).replace(/\u2581/g, " ").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  }
  function fmt(value) {
    if (value === null || value === undefined) return "\u2013";
    var magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e4)) return value.toExponential(2);
    return value.toFixed(3);
  }
  function clamp01(value) { return Math.max(0, Math.min(1, value)); }

  // ---- dashboard entry (shared by graph cards and dashboard pages) --------------------------
  function histogram(entry) {
    var counts = entry.histogram || [];
    var edges = info.histogram_edges || [];
    var width = 240, height = 56, peak = Math.max.apply(null, [1].concat(counts));
    var chart = svgEl("svg", {width: width, height: height + 14, "class": "fc-histogram"});
    var barWidth = width / Math.max(counts.length, 1);
    counts.forEach(function (count, index) {
      var barHeight = height * count / peak;
      var bar = svgEl("rect", {x: index * barWidth, y: height - barHeight, width: Math.max(barWidth - 1, 1),
                               height: barHeight, "class": "fc-bar"});
      var tip = svgEl("title", {});
      tip.textContent = count + " activations" +
        (edges.length > index + 1 ? " in [" + fmt(Math.pow(10, edges[index])) + ", " +
         fmt(Math.pow(10, edges[index + 1])) + ")" : "");
      bar.appendChild(tip);
      chart.appendChild(bar);
    });
    if (edges.length > 1) {
      [[0, "start"], [edges.length - 1, "end"]].forEach(function (pair) {
        var label = svgEl("text", {x: pair[0] === 0 ? 0 : width, y: height + 12, "text-anchor": pair[1],
                                   "class": "fc-axis"});
        label.textContent = fmt(Math.pow(10, edges[pair[0]]));
        chart.appendChild(label);
      });
    }
    return chart;
  }

  function contextRow(context, maxAct) {
    var row = el("div", "fc-context");
    (context.tokens || []).forEach(function (token, index) {
      var act = (context.acts || [])[index] || 0;
      var span = el("span", "fc-tok" + (index === context.focus ? " fc-focus" : ""), contextToken(token));
      var alpha = maxAct > 0 ? clamp01(act / maxAct) : 0;
      if (alpha > 0) span.style.backgroundColor = "rgba(234, 88, 12, " + (0.12 + 0.78 * alpha).toFixed(3) + ")";
      span.setAttribute("title", "act " + fmt(act) + "  |  " + JSON.stringify(String(token)));
      row.appendChild(span);
    });
    var value = el("span", "fc-context-act", fmt(context.act));
    row.insertBefore(value, row.firstChild);
    return row;
  }

  function logitList(title, pairs, className) {
    var box = el("div", "fc-logits " + className);
    box.appendChild(el("h4", null, title));
    if (!pairs || pairs.length === 0) box.appendChild(el("p", "fc-muted", "none"));
    (pairs || []).forEach(function (pair) {
      var line = el("div", "fc-logit");
      line.appendChild(el("span", "fc-tok", showToken(pair[0])));
      line.appendChild(el("span", "fc-logit-value", fmt(pair[1])));
      box.appendChild(line);
    });
    return box;
  }

  function featureDashboard(entry) {
    var box = el("div", "fc-dashboard");
    var scanned = entry.n_tokens || info.n_tokens || 0;
    if (!entry.n_fired) {
      box.appendChild(el("p", "fc-dead", "Never fired on the " + scanned + " tokens scanned."));
    } else {
      box.appendChild(el("p", "fc-stats", "Fires on " + fmt(100 * entry.density) + "% of " + scanned +
                         " tokens; max activation " + fmt(entry.max_act) + "."));
      box.appendChild(el("h4", null, "Activation density (log scale)"));
      box.appendChild(histogram(entry));
      box.appendChild(el("h4", null, "Top activating contexts"));
      var contexts = el("div", "fc-contexts");
      (entry.top_contexts || []).forEach(function (context) {
        contexts.appendChild(contextRow(context, entry.max_act));
      });
      box.appendChild(contexts);
    }
    if (entry.top_logits || entry.bottom_logits) {
      var logits = el("div", "fc-logit-columns");
      logits.appendChild(logitList("Promotes", entry.top_logits, "fc-promotes"));
      logits.appendChild(logitList("Suppresses", entry.bottom_logits, "fc-suppresses"));
      box.appendChild(logits);
    } else if (entry.logit_note) {
      box.appendChild(el("p", "fc-muted", entry.logit_note));
    }
    return box;
  }

  // ---- dashboard page -----------------------------------------------------------------------
  function renderDashboardPage() {
    app.appendChild(el("h1", null, data.title));
    var keys = data.order || Object.keys(dashboards);
    var subtitle = keys.length + " features" + (info.model ? " of " + info.model : "") +
      (info.n_tokens ? ", " + info.n_tokens + " tokens scanned" : "");
    app.appendChild(el("p", "fc-muted", subtitle));
    if (keys.length === 0) app.appendChild(el("div", "fc-empty", "No features in this dashboard set."));
    var list = el("div", "fc-feature-list");
    app.appendChild(list);
    // Cards are built a page at a time: a set of thousands of features would otherwise stall the first paint.
    var PAGE = data.page_size || 200, shown = 0;
    var more = el("button", "fc-more");
    more.id = "fc-more";
    function showMore() {
      keys.slice(shown, shown + PAGE).forEach(function (key) {
        var entry = dashboards[key];
        var card = el("section", "fc-feature-card");
        card.setAttribute("data-key", key);
        card.appendChild(el("h2", null, "Layer " + entry.layer + " \u00b7 feature " + entry.feature));
        card.appendChild(featureDashboard(entry));
        list.appendChild(card);
      });
      shown = Math.min(keys.length, shown + PAGE);
      more.textContent = "Show " + Math.min(PAGE, keys.length - shown) + " more of " + (keys.length - shown);
      more.style.display = shown < keys.length ? "" : "none";
    }
    more.addEventListener("click", showMore);
    app.appendChild(more);
    showMore();
  }

  // ---- graph page ---------------------------------------------------------------------------
  function renderGraphPage() {
    var nodes = data.nodes, links = data.links, rows = data.rows, tokens = data.tokens;
    var header = el("header", "fc-header");
    header.appendChild(el("h1", null, data.title));
    if (data.prompt) header.appendChild(el("p", "fc-prompt", data.prompt));
    var controls = el("div", "fc-controls");
    var sliderLabel = el("label", null, "Edge threshold ");
    var slider = el("input");
    slider.id = "fc-threshold";
    slider.type = "range"; slider.min = "0"; slider.max = "1"; slider.step = "0.01"; slider.value = "0";
    sliderLabel.appendChild(slider);
    var thresholdText = el("span", null, "|w| \u2265 0");
    thresholdText.id = "fc-threshold-value";
    var counts = el("span", "fc-counts");
    counts.id = "fc-counts";
    controls.appendChild(sliderLabel); controls.appendChild(thresholdText); controls.appendChild(counts);
    var searchLabel = el("label", null, "Find ");
    var search = el("input");
    search.id = "fc-search"; search.type = "search"; search.placeholder = "label or node id";
    searchLabel.appendChild(search);
    var searchCount = el("span", "fc-counts");
    searchCount.id = "fc-search-count";
    controls.appendChild(searchLabel); controls.appendChild(searchCount);
    header.appendChild(controls);
    var supernodeBar = null;
    if ((data.supernodes || []).length) {
      supernodeBar = el("div", "fc-supernodes");
      supernodeBar.id = "fc-supernodes";
      supernodeBar.appendChild(el("span", "fc-muted", "Supernodes: "));
      header.appendChild(supernodeBar);
    }
    app.appendChild(header);

    if (nodes.length === 0) {
      app.appendChild(el("div", "fc-empty", "This graph has no nodes to show (an empty circuit)."));
      counts.textContent = "0 nodes \u00b7 0 edges";
      counts.setAttribute("data-nodes", "0"); counts.setAttribute("data-edges", "0");
      return;
    }
    if (data.n_feature_nodes === 0) {
      app.appendChild(el("div", "fc-notice", "This graph has no feature nodes: only tokens, errors and logits."));
    }

    var main = el("div", "fc-main");
    var wrap = el("div", "fc-graph-wrap");
    var card = el("aside", "fc-card");
    card.id = "fc-card";
    main.appendChild(wrap); main.appendChild(card);
    app.appendChild(main);

    // Layout: columns widen to fit their most crowded (row, position) cell.
    var ROW_H = 84, GAP = 18, MIN_COL = 58, LEFT = 62, TOP = 20, BOTTOM = 96;
    var cells = {}, columnCount = tokens.length;
    nodes.forEach(function (node, index) {
      var key = node.row + ":" + node.col;
      (cells[key] = cells[key] || []).push(index);
    });
    var widths = [];
    for (var column = 0; column < columnCount; column++) widths.push(MIN_COL);
    Object.keys(cells).forEach(function (key) {
      var column = Number(key.split(":")[1]);
      widths[column] = Math.max(widths[column], cells[key].length * GAP + 14);
    });
    var starts = [], total = LEFT;
    widths.forEach(function (width) { starts.push(total); total += width; });
    var width = total + 16, height = TOP + rows.length * ROW_H + BOTTOM;
    function rowY(row) { return TOP + (rows.length - 1 - row) * ROW_H + ROW_H / 2; }
    var xs = new Array(nodes.length), ys = new Array(nodes.length);
    Object.keys(cells).forEach(function (key) {
      var parts = key.split(":"), row = Number(parts[0]), column = Number(parts[1]);
      var members = cells[key], spacing = widths[column] / members.length;
      members.forEach(function (index, slot) {
        xs[index] = starts[column] + spacing * (slot + 0.5);
        ys[index] = rowY(row);
      });
    });

    var svg = svgEl("svg", {id: "fc-graph", width: width, height: height, viewBox: "0 0 " + width + " " + height});
    wrap.appendChild(svg);
    var gridLayer = svgEl("g", {"class": "fc-grid"});
    rows.forEach(function (label, row) {
      var y = rowY(row);
      gridLayer.appendChild(svgEl("line", {x1: LEFT, x2: width - 8, y1: y, y2: y, "class": "fc-row-line"}));
      var text = svgEl("text", {x: LEFT - 8, y: y + 4, "text-anchor": "end", "class": "fc-row-label"});
      text.textContent = label;
      gridLayer.appendChild(text);
    });
    var tokenY = TOP + rows.length * ROW_H + 12;
    tokens.forEach(function (token, column) {
      var x = starts[column] + widths[column] / 2;
      var label = svgEl("text", {x: x, y: tokenY, "class": "fc-token-label", "data-pos": column,
                                 transform: "rotate(35 " + x + " " + tokenY + ")"});
      var shown = showToken(token);
      // Long tokens are cut on the axis; the tooltip keeps the whole string.
      label.textContent = shown.length > 14 ? shown.slice(0, 13) + "\u2026" : shown;
      var tip = svgEl("title", {});
      tip.textContent = "position " + column + ": " + JSON.stringify(String(token));
      label.appendChild(tip);
      gridLayer.appendChild(label);
    });
    svg.appendChild(gridLayer);

    // Edges under nodes, weakest first so the strongest are drawn on top.
    var maxAbs = 0;
    links.forEach(function (link) { maxAbs = Math.max(maxAbs, Math.abs(link[2])); });
    var order = links.map(function (_, index) { return index; });
    order.sort(function (a, b) { return Math.abs(links[a][2]) - Math.abs(links[b][2]); });
    var edgeLayer = svgEl("g", {"class": "fc-edges"});
    var edgeEls = new Array(links.length);
    var edgesOf = nodes.map(function () { return []; });
    order.forEach(function (index) {
      var link = links[index], source = link[0], target = link[1], weight = link[2];
      var strength = maxAbs > 0 ? Math.abs(weight) / maxAbs : 0;
      var x1 = xs[source], y1 = ys[source], x2 = xs[target], y2 = ys[target], middle = (y1 + y2) / 2;
      var path = svgEl("path", {
        d: "M" + x1 + " " + y1 + " C" + x1 + " " + middle + " " + x2 + " " + middle + " " + x2 + " " + y2,
        "class": "fc-edge " + (weight >= 0 ? "fc-positive" : "fc-negative"),
        "stroke-width": (0.6 + 5 * strength).toFixed(2),
        "stroke-opacity": (0.25 + 0.65 * strength).toFixed(3),
        "data-weight": weight,
      });
      edgeEls[index] = path;
      edgesOf[source].push(index);
      edgesOf[target].push(index);
      edgeLayer.appendChild(path);
    });
    svg.appendChild(edgeLayer);

    var nodeLayer = svgEl("g", {"class": "fc-nodes"});
    var nodeEls = nodes.map(function (node, index) {
      var group = svgEl("g", {"class": "fc-node fc-" + node.kind + (node.is_target ? " fc-target" : ""),
                              "data-node-id": node.id, "data-index": index,
                              transform: "translate(" + xs[index] + " " + ys[index] + ")"});
      var shape;
      if (node.kind === "feature") shape = svgEl("circle", {r: 6.5});
      else if (node.kind === "error") shape = svgEl("rect", {x: -6, y: -6, width: 12, height: 12});
      else if (node.kind === "embedding") shape = svgEl("rect", {x: -8, y: -6, width: 16, height: 12, rx: 3});
      else if (node.kind === "component") shape = svgEl("rect", {x: -8, y: -8, width: 16, height: 16, rx: 5});
      else shape = svgEl("polygon", {points: "0,-9 9,0 0,9 -9,0"});
      shape.setAttribute("class", "fc-shape");
      group.appendChild(shape);
      var tip = svgEl("title", {});
      tip.textContent = node.label;
      group.appendChild(tip);
      group.addEventListener("mouseenter", function () { if (pinned === null) showCard(index); });
      group.addEventListener("mouseleave", function () { if (pinned === null) showHint(); });
      group.addEventListener("click", function (event) { event.stopPropagation(); select(index); });
      nodeLayer.appendChild(group);
      return group;
    });
    svg.appendChild(nodeLayer);

    // ---- card --------------------------------------------------------------------------------
    var pinned = null;
    function showHint() {
      card.textContent = "";
      card.classList.remove("fc-card-open");
      card.appendChild(el("p", "fc-muted", "Hover over a node to see its card; click to pin it."));
    }
    function neighbourList(title, index, outgoing) {
      var items = edgesOf[index].filter(function (edge) { return (links[edge][0] === index) === outgoing; });
      items.sort(function (a, b) { return Math.abs(links[b][2]) - Math.abs(links[a][2]); });
      var box = el("div", "fc-neighbours");
      box.appendChild(el("h4", null, title + " (" + items.length + ")"));
      items.slice(0, 6).forEach(function (edge) {
        var other = outgoing ? links[edge][1] : links[edge][0];
        var line = el("div", "fc-neighbour");
        line.appendChild(el("span", links[edge][2] >= 0 ? "fc-w-pos" : "fc-w-neg", fmt(links[edge][2])));
        line.appendChild(el("span", null, " " + nodes[other].label));
        box.appendChild(line);
      });
      return box;
    }
    function showCard(index) {
      var node = nodes[index];
      card.textContent = "";
      card.classList.add("fc-card-open");
      card.setAttribute("data-node-id", node.id);
      card.appendChild(el("h2", "fc-card-title", node.label));
      var facts = el("dl", "fc-facts");
      function fact(name, value) { facts.appendChild(el("dt", null, name)); facts.appendChild(el("dd", null, value)); }
      fact("kind", node.kind);
      fact("layer", node.layer);
      fact("position", node.pos + "  (" + showToken(node.token) + ")");
      if (node.feature !== null) fact("feature", node.feature);
      if (node.kind !== "logit") fact("activation", fmt(node.activation));
      if (node.influence !== null) fact("influence", fmt(node.influence));
      if (node.kind === "logit") fact("probability", fmt(node.token_prob));
      if (node.ablation_effect !== null && node.ablation_effect !== undefined)
        fact("ablation effect", fmt(node.ablation_effect) + "  (on the main target, measured)");
      var groups = (data.supernodes || []).filter(function (group) { return group.members.indexOf(index) >= 0; });
      if (groups.length) fact("supernode", groups.map(function (group) { return group.name; }).join(", "));
      card.appendChild(facts);
      if (node.kind === "feature") {
        var entry = node.dash_key !== null ? dashboards[node.dash_key] : undefined;
        if (entry) card.appendChild(featureDashboard(entry));
        else card.appendChild(el("p", "fc-muted fc-no-dashboard",
          "No dashboard entry for this feature; pass dashboards= to write_viewer to see its contexts and logits."));
      }
      card.appendChild(neighbourList("Inputs", index, false));
      card.appendChild(neighbourList("Outputs", index, true));
    }
    function select(index) {
      if (pinned !== null) nodeEls[pinned].classList.remove("fc-selected");
      edgeEls.forEach(function (edge) { edge.classList.remove("fc-edge-active"); });
      pinned = index;
      if (index === null) { svg.classList.remove("fc-has-selection"); showHint(); return; }
      nodeEls[index].classList.add("fc-selected");
      edgesOf[index].forEach(function (edge) { edgeEls[edge].classList.add("fc-edge-active"); });
      svg.classList.add("fc-has-selection");
      showCard(index);
    }
    svg.addEventListener("click", function () { select(null); });
    document.addEventListener("keydown", function (event) { if (event.key === "Escape") select(null); });

    // ---- threshold ---------------------------------------------------------------------------
    // An edge shows when |w| >= threshold * max|w|. A feature or error node shows while one of its
    // edges does (at threshold 0 every node shows); tokens and logits always show.
    function applyThreshold() {
      var fraction = Number(slider.value), cutoff = fraction * maxAbs;
      var visibleEdges = 0, visibleNodes = 0, degree = nodes.map(function () { return 0; });
      links.forEach(function (link, index) {
        var visible = fraction === 0 || Math.abs(link[2]) >= cutoff;
        edgeEls[index].style.display = visible ? "" : "none";
        if (visible) { visibleEdges++; degree[link[0]]++; degree[link[1]]++; }
      });
      nodes.forEach(function (node, index) {
        var visible = fraction === 0 || node.kind === "embedding" || node.kind === "logit" || degree[index] > 0;
        nodeEls[index].style.display = visible ? "" : "none";
        if (visible) visibleNodes++;
      });
      thresholdText.textContent = "|w| \u2265 " + fmt(cutoff);
      counts.textContent = visibleNodes + " of " + nodes.length + " nodes \u00b7 " + visibleEdges + " of " +
        links.length + " edges";
      counts.setAttribute("data-nodes", String(visibleNodes));
      counts.setAttribute("data-edges", String(visibleEdges));
    }
    slider.addEventListener("input", applyThreshold);
    applyThreshold();
    showHint();

    // ---- search and supernodes: highlight matching nodes ----------------------------------------
    function highlight(indices) {
      nodeEls.forEach(function (element) { element.classList.remove("fc-match"); });
      indices.forEach(function (index) { nodeEls[index].classList.add("fc-match"); });
      searchCount.textContent = indices.length ? indices.length + " found" : "";
      searchCount.setAttribute("data-matches", String(indices.length));
    }
    search.addEventListener("input", function () {
      var query = search.value.trim().toLowerCase();
      if (!query) { highlight([]); return; }
      highlight(nodes.map(function (node, index) { return index; }).filter(function (index) {
        var node = nodes[index];
        return String(node.label).toLowerCase().indexOf(query) >= 0 || String(node.id).toLowerCase().indexOf(query) >= 0;
      }));
    });
    (data.supernodes || []).forEach(function (group, number) {
      var button = el("button", "fc-supernode", group.name + " (" + group.members.length + ")");
      button.type = "button";
      button.setAttribute("data-supernode", String(number));
      button.addEventListener("click", function () { highlight(group.members); });
      supernodeBar.appendChild(button);
    });
  }

  if (data.mode === "dashboards") renderDashboardPage(); else renderGraphPage();
  window.__fcReady = true;
})();
