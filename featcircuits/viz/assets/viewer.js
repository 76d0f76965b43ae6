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

  function scoreText(entry, detection, fuzzing) {
    var parts = [];
    if (typeof entry[detection] === "number") parts.push("detection " + fmt(entry[detection]));
    if (typeof entry[fuzzing] === "number") parts.push("fuzzing " + fmt(entry[fuzzing]));
    return parts.join(", ");
  }
  // The feature's label and explanation with their held-out scores (featcircuits.explain), when it has them.
  function labelLines(entry, box) {
    if (entry.label) {
      var offline = scoreText(entry, "detection", "fuzzing");
      box.appendChild(el("p", "fc-label", "Label: " + entry.label + (offline ? " (" + offline + ", held out)" : "")));
    }
    if (entry.explanation && entry.explanation !== entry.label && entry.explanation_source) {
      var judged = scoreText(entry, "llm_detection", "llm_fuzzing");
      box.appendChild(el("p", "fc-label", "Explanation: " + entry.explanation + " (" + entry.explanation_source +
                                          (judged ? "; " + judged : "") + ")"));
    }
  }

  function featureDashboard(entry) {
    var box = el("div", "fc-dashboard");
    labelLines(entry, box);
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

    // ---- supernodes: each drawn as one node over its members until expanded -----------------------------
    var groups = data.supernodes || [];
    var owner = nodes.map(function () { return -1; });  // the first supernode a node belongs to
    groups.forEach(function (group, number) {
      group.members.forEach(function (index) { if (owner[index] < 0) owner[index] = number; });
    });
    var expanded = groups.map(function () { return false; });
    function mean(values) { return values.reduce(function (a, b) { return a + b; }, 0) / Math.max(values.length, 1); }
    var groupX = groups.map(function (group) { return mean(group.members.map(function (i) { return xs[i]; })); });
    var groupY = groups.map(function (group) { return mean(group.members.map(function (i) { return ys[i]; })); });
    // A drawn node is "n<index>" (a node) or "s<number>" (a collapsed supernode).
    function shownAs(index) {
      var group = owner[index];
      return group >= 0 && !expanded[group] ? "s" + group : "n" + index;
    }
    function keyX(key) { return key[0] === "s" ? groupX[Number(key.slice(1))] : xs[Number(key.slice(1))]; }
    function keyY(key) { return key[0] === "s" ? groupY[Number(key.slice(1))] : ys[Number(key.slice(1))]; }
    function keyLabel(key) {
      return key[0] === "s" ? "\u25a3 " + groups[Number(key.slice(1))].name : nodes[Number(key.slice(1))].label;
    }

    // ---- edges: one per link between drawn nodes, links into or out of a collapsed supernode summed ---------
    var edgeLayer = svgEl("g", {"class": "fc-edges"});
    svg.appendChild(edgeLayer);
    var shown = [], edgeEls = [], edgesOf = {}, maxAbs = 0;
    function buildEdges() {
      edgeLayer.textContent = "";
      var byPair = {};
      shown = []; edgesOf = {}; maxAbs = 0;
      links.forEach(function (link, index) {
        var from = shownAs(link[0]), to = shownAs(link[1]);
        if (from === to) return;  // inside a collapsed supernode
        var pair = from + ">" + to;
        if (!byPair[pair]) { byPair[pair] = {from: from, to: to, weight: 0, links: []}; shown.push(byPair[pair]); }
        byPair[pair].weight += link[2];
        byPair[pair].links.push(index);
      });
      shown.forEach(function (edge) { maxAbs = Math.max(maxAbs, Math.abs(edge.weight)); });
      // weakest first, so the strongest are drawn on top
      var order = shown.map(function (_, index) { return index; });
      order.sort(function (a, b) { return Math.abs(shown[a].weight) - Math.abs(shown[b].weight); });
      edgeEls = new Array(shown.length);
      order.forEach(function (index) {
        var edge = shown[index], strength = maxAbs > 0 ? Math.abs(edge.weight) / maxAbs : 0;
        var x1 = keyX(edge.from), y1 = keyY(edge.from), x2 = keyX(edge.to), y2 = keyY(edge.to), middle = (y1 + y2) / 2;
        var path = svgEl("path", {
          d: "M" + x1 + " " + y1 + " C" + x1 + " " + middle + " " + x2 + " " + middle + " " + x2 + " " + y2,
          "class": "fc-edge " + (edge.weight >= 0 ? "fc-positive" : "fc-negative") +
            (edge.from[0] === "s" || edge.to[0] === "s" ? " fc-aggregate" : ""),
          "stroke-width": (0.6 + 5 * strength).toFixed(2),
          "stroke-opacity": (0.25 + 0.65 * strength).toFixed(3),
          "data-weight": edge.weight, "data-from": edge.from, "data-to": edge.to,
        });
        edgeEls[index] = path;
        (edgesOf[edge.from] = edgesOf[edge.from] || []).push(index);
        (edgesOf[edge.to] = edgesOf[edge.to] || []).push(index);
        edgeLayer.appendChild(path);
      });
    }

    var nodeLayer = svgEl("g", {"class": "fc-nodes"});
    function addEvents(group, key) {
      group.addEventListener("mouseenter", function () { if (selected === null) showCard(key); });
      group.addEventListener("mouseleave", function () { if (selected === null) showHint(); });
      group.addEventListener("click", function (event) {
        event.stopPropagation();
        if (event.shiftKey) togglePin(key); else select(key);
      });
    }
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
      addEvents(group, "n" + index);
      nodeLayer.appendChild(group);
      return group;
    });
    var superEls = groups.map(function (group, number) {
      var element = svgEl("g", {"class": "fc-node fc-supernode-node", "data-supernode": number,
                                transform: "translate(" + groupX[number] + " " + groupY[number] + ")"});
      var shape = svgEl("rect", {x: -15, y: -9, width: 30, height: 18, rx: 8});
      shape.setAttribute("class", "fc-shape");
      element.appendChild(shape);
      var count = svgEl("text", {y: 4, "text-anchor": "middle", "class": "fc-supernode-count"});
      count.textContent = String(group.members.length);
      element.appendChild(count);
      var name = svgEl("text", {y: 21, "text-anchor": "middle", "class": "fc-supernode-label"});
      name.textContent = group.name.length > 22 ? group.name.slice(0, 21) + "\u2026" : group.name;
      element.appendChild(name);
      var tip = svgEl("title", {});
      tip.textContent = "supernode " + group.name + " (" + group.members.length + " members; click to see them)";
      element.appendChild(tip);
      addEvents(element, "s" + number);
      nodeLayer.appendChild(element);
      return element;
    });
    svg.appendChild(nodeLayer);
    function elementOf(key) { return key[0] === "s" ? superEls[Number(key.slice(1))] : nodeEls[Number(key.slice(1))]; }

    // ---- card --------------------------------------------------------------------------------
    var selected = null;
    function showHint() {
      card.textContent = "";
      card.classList.remove("fc-card-open");
      card.removeAttribute("data-node-id");
      card.appendChild(el("p", "fc-muted", "Hover over a node to see its card; click to keep it; shift-click to " +
                                           "pin it to the subgraph below."));
    }
    function neighbourList(title, key, outgoing) {
      var items = (edgesOf[key] || []).filter(function (edge) { return (shown[edge].from === key) === outgoing; });
      items.sort(function (a, b) { return Math.abs(shown[b].weight) - Math.abs(shown[a].weight); });
      var box = el("div", "fc-neighbours");
      box.appendChild(el("h4", null, title + " (" + items.length + ")"));
      items.slice(0, 8).forEach(function (edge) {
        var other = outgoing ? shown[edge].to : shown[edge].from;
        var line = el("div", "fc-neighbour");
        line.setAttribute("data-key", other);
        line.appendChild(el("span", shown[edge].weight >= 0 ? "fc-w-pos" : "fc-w-neg", fmt(shown[edge].weight)));
        line.appendChild(el("span", null, " " + keyLabel(other)));
        line.addEventListener("click", function () { select(other); });
        box.appendChild(line);
      });
      if (items.length > 8) box.appendChild(el("div", "fc-muted", "and " + (items.length - 8) + " more"));
      return box;
    }
    function button(text, id, onClick) {
      var element = el("button", "fc-button", text);
      element.type = "button";
      element.id = id;
      element.addEventListener("click", function (event) { event.stopPropagation(); onClick(); });
      return element;
    }
    function showCard(key) {
      card.textContent = "";
      card.classList.add("fc-card-open");
      if (key[0] === "s") return showSupernodeCard(Number(key.slice(1)));
      var index = Number(key.slice(1)), node = nodes[index];
      card.setAttribute("data-node-id", node.id);
      card.appendChild(el("h2", "fc-card-title", node.label));
      card.appendChild(button(pins.indexOf(index) >= 0 ? "Unpin" : "Pin to subgraph", "fc-pin-button",
                              function () { togglePin(key); showCard(key); }));
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
      var member = groups.filter(function (group) { return group.members.indexOf(index) >= 0; });
      if (member.length) fact("supernode", member.map(function (group) { return group.name; }).join(", "));
      var entry = node.kind === "feature" && node.dash_key !== null ? dashboards[node.dash_key] : undefined;
      card.appendChild(facts);
      if (node.kind === "feature") {
        if (entry) card.appendChild(featureDashboard(entry));
        else card.appendChild(el("p", "fc-muted fc-no-dashboard",
          "No dashboard entry for this feature; pass dashboards= to write_viewer to see its contexts and logits."));
      }
      card.appendChild(neighbourList("Inputs", key, false));
      card.appendChild(neighbourList("Outputs", key, true));
    }
    function showSupernodeCard(number) {
      var group = groups[number];
      card.setAttribute("data-supernode", String(number));
      card.appendChild(el("h2", "fc-card-title", "Supernode " + group.name));
      card.appendChild(button(expanded[number] ? "Collapse" : "Expand", "fc-toggle-supernode",
                              function () { setExpanded(number, !expanded[number]); }));
      card.appendChild(button("Pin members", "fc-pin-button", function () { togglePin("s" + number); }));
      card.appendChild(el("h4", null, "Members (" + group.members.length + ")"));
      group.members.forEach(function (index) {
        var line = el("div", "fc-neighbour fc-member", nodes[index].label);
        line.setAttribute("data-node-id", nodes[index].id);
        line.addEventListener("click", function () { setExpanded(number, true); select("n" + index); });
        card.appendChild(line);
      });
      if (!expanded[number]) {  // its edges, summed over the members
        card.appendChild(neighbourList("Inputs (summed)", "s" + number, false));
        card.appendChild(neighbourList("Outputs (summed)", "s" + number, true));
      }
    }
    function select(key) {
      if (selected !== null && elementOf(selected)) elementOf(selected).classList.remove("fc-selected");
      edgeEls.forEach(function (edge) { edge.classList.remove("fc-edge-active"); });
      selected = key;
      if (key === null) { svg.classList.remove("fc-has-selection"); showHint(); return; }
      elementOf(key).classList.add("fc-selected");
      (edgesOf[key] || []).forEach(function (edge) { edgeEls[edge].classList.add("fc-edge-active"); });
      svg.classList.add("fc-has-selection");
      showCard(key);
    }
    svg.addEventListener("click", function () { select(null); });
    document.addEventListener("keydown", function (event) { if (event.key === "Escape") select(null); });

    // ---- threshold ---------------------------------------------------------------------------
    // An edge shows when |w| >= threshold * max|w|. A feature, error or supernode shows while one of its
    // edges does (at threshold 0 every one shows); tokens and logits always show; a collapsed supernode's
    // members show only through it.
    function applyThreshold() {
      var fraction = Number(slider.value), cutoff = fraction * maxAbs;
      var visibleEdges = 0, visibleNodes = 0, degree = {};
      shown.forEach(function (edge, index) {
        var visible = fraction === 0 || Math.abs(edge.weight) >= cutoff;
        edgeEls[index].style.display = visible ? "" : "none";
        if (visible) { visibleEdges++; degree[edge.from] = (degree[edge.from] || 0) + 1; degree[edge.to] = (degree[edge.to] || 0) + 1; }
      });
      nodes.forEach(function (node, index) {
        var key = "n" + index;
        var visible = shownAs(index) === key &&
          (fraction === 0 || node.kind === "embedding" || node.kind === "logit" || degree[key] > 0);
        nodeEls[index].style.display = visible ? "" : "none";
        if (visible) visibleNodes++;
      });
      groups.forEach(function (_, number) {
        var visible = !expanded[number] && (fraction === 0 || degree["s" + number] > 0);
        superEls[number].style.display = visible ? "" : "none";
        if (visible) visibleNodes++;
      });
      thresholdText.textContent = "|w| \u2265 " + fmt(cutoff);
      var collapsed = expanded.filter(function (open) { return !open; }).length;
      counts.textContent = visibleNodes + " of " + nodes.length + " nodes" +
        (collapsed ? " (" + collapsed + " supernodes drawn as one)" : "") + " \u00b7 " + visibleEdges + " of " +
        shown.length + " edges";
      counts.setAttribute("data-nodes", String(visibleNodes));
      counts.setAttribute("data-edges", String(visibleEdges));
    }
    slider.addEventListener("input", applyThreshold);
    function setExpanded(number, open) {
      expanded[number] = open;
      var keep = selected;
      buildEdges();
      applyThreshold();
      if (keep !== null && elementOf(keep) && elementOf(keep).style.display !== "none") select(keep);
      else select(null);
      var barButton = supernodeBar && supernodeBar.querySelector('[data-supernode="' + number + '"]');
      if (barButton) barButton.classList.toggle("fc-open", open);
    }

    // ---- pinned subgraph: chosen nodes and the graph's edges among them ----------------------------
    var pins = [];
    var pinPanel = el("section", "fc-pinned");
    pinPanel.id = "fc-pinned";
    app.appendChild(pinPanel);
    function togglePin(key) {
      var members = key[0] === "s" ? groups[Number(key.slice(1))].members : [Number(key.slice(1))];
      var allPinned = members.every(function (index) { return pins.indexOf(index) >= 0; });
      members.forEach(function (index) {
        var at = pins.indexOf(index);
        if (allPinned && at >= 0) pins.splice(at, 1);
        else if (!allPinned && at < 0) pins.push(index);
      });
      renderPins();
    }
    function renderPins() {
      nodeEls.forEach(function (element, index) { element.classList.toggle("fc-pinned", pins.indexOf(index) >= 0); });
      superEls.forEach(function (element, number) {
        element.classList.toggle("fc-pinned", groups[number].members.every(function (i) { return pins.indexOf(i) >= 0; }));
      });
      pinPanel.textContent = "";
      var head = el("div", "fc-pinned-head");
      var title = el("h3", null, "Pinned subgraph");
      var count = el("span", "fc-counts", pins.length + " nodes");
      count.id = "fc-pin-count";
      count.setAttribute("data-pins", String(pins.length));
      head.appendChild(title); head.appendChild(count);
      head.appendChild(button("Clear", "fc-clear-pins", function () { pins = []; renderPins(); if (selected) showCard(selected); }));
      pinPanel.appendChild(head);
      if (pins.length === 0) {
        pinPanel.appendChild(el("p", "fc-muted", "Shift-click nodes, or use Pin on a node's card, to collect them " +
                                                 "here with the edges among them."));
        return;
      }
      var pinned = {};
      pins.forEach(function (index) { pinned[index] = true; });
      var inner = links.filter(function (link) { return pinned[link[0]] && pinned[link[1]]; });
      // layout: rows by layer (as in the graph), columns by position, side by side within a cell
      var rowsUsed = [], colsUsed = [];
      pins.forEach(function (index) {
        if (rowsUsed.indexOf(nodes[index].row) < 0) rowsUsed.push(nodes[index].row);
        if (colsUsed.indexOf(nodes[index].col) < 0) colsUsed.push(nodes[index].col);
      });
      rowsUsed.sort(function (a, b) { return b - a; });
      colsUsed.sort(function (a, b) { return a - b; });
      var cellsUsed = {}, px = {}, py = {}, SUB_W = 120, SUB_H = 64;
      pins.forEach(function (index) {
        var key = nodes[index].row + ":" + nodes[index].col;
        (cellsUsed[key] = cellsUsed[key] || []).push(index);
      });
      var widest = 1;
      Object.keys(cellsUsed).forEach(function (key) { widest = Math.max(widest, cellsUsed[key].length); });
      Object.keys(cellsUsed).forEach(function (key) {
        var parts = key.split(":"), members = cellsUsed[key];
        members.forEach(function (index, slot) {
          px[index] = 40 + colsUsed.indexOf(Number(parts[1])) * SUB_W * widest + slot * SUB_W;
          py[index] = 24 + rowsUsed.indexOf(Number(parts[0])) * SUB_H;
        });
      });
      var subWidth = 80 + colsUsed.length * SUB_W * widest, subHeight = 40 + rowsUsed.length * SUB_H;
      var sub = svgEl("svg", {id: "fc-subgraph", width: subWidth, height: subHeight,
                              viewBox: "0 0 " + subWidth + " " + subHeight});
      var innerMax = 0;
      inner.forEach(function (link) { innerMax = Math.max(innerMax, Math.abs(link[2])); });
      inner.forEach(function (link) {
        var strength = innerMax > 0 ? Math.abs(link[2]) / innerMax : 0;
        sub.appendChild(svgEl("line", {x1: px[link[0]], y1: py[link[0]], x2: px[link[1]], y2: py[link[1]],
          "class": "fc-sub-edge " + (link[2] >= 0 ? "fc-positive" : "fc-negative"),
          "stroke-width": (0.8 + 4 * strength).toFixed(2), "data-weight": link[2]}));
      });
      pins.forEach(function (index) {
        var node = nodes[index];
        var group = svgEl("g", {"class": "fc-sub-node fc-" + node.kind, "data-node-id": node.id,
                                transform: "translate(" + px[index] + " " + py[index] + ")"});
        var shape = node.kind === "error" ? svgEl("rect", {x: -6, y: -6, width: 12, height: 12})
          : node.kind === "logit" ? svgEl("polygon", {points: "0,-9 9,0 0,9 -9,0"})
          : node.kind === "embedding" ? svgEl("rect", {x: -8, y: -6, width: 16, height: 12, rx: 3})
          : svgEl("circle", {r: 6.5});
        shape.setAttribute("class", "fc-shape");
        group.appendChild(shape);
        var text = svgEl("text", {y: 20, "text-anchor": "middle", "class": "fc-sub-label"});
        text.textContent = node.label.length > 18 ? node.label.slice(0, 17) + "\u2026" : node.label;
        group.appendChild(text);
        var tip = svgEl("title", {});
        tip.textContent = node.label;
        group.appendChild(tip);
        group.addEventListener("click", function () { if (owner[index] >= 0) setExpanded(owner[index], true); select("n" + index); });
        sub.appendChild(group);
      });
      pinPanel.appendChild(sub);
      var list = el("div", "fc-pin-list");
      pins.forEach(function (index) {
        var item = el("div", "fc-pin-item");
        item.setAttribute("data-node-id", nodes[index].id);
        item.appendChild(button("\u00d7", "fc-unpin-" + index, function () { togglePin("n" + index); }));
        item.lastChild.className = "fc-unpin";
        item.appendChild(el("span", null, " " + nodes[index].label));
        list.appendChild(item);
      });
      pinPanel.appendChild(list);
      var edgeList = el("div", "fc-sub-edges");
      edgeList.appendChild(el("h4", null, "Edges among them (" + inner.length + ")"));
      inner.slice().sort(function (a, b) { return Math.abs(b[2]) - Math.abs(a[2]); }).forEach(function (link) {
        var line = el("div", "fc-sub-edge-row");
        line.appendChild(el("span", link[2] >= 0 ? "fc-w-pos" : "fc-w-neg", fmt(link[2])));
        line.appendChild(el("span", null, " " + nodes[link[0]].label + " \u2192 " + nodes[link[1]].label));
        edgeList.appendChild(line);
      });
      pinPanel.appendChild(edgeList);
    }

    // ---- search and supernode buttons: highlight matching nodes -------------------------------------
    function highlight(indices) {
      nodeEls.forEach(function (element) { element.classList.remove("fc-match"); });
      indices.forEach(function (index) { nodeEls[index].classList.add("fc-match"); });
      superEls.forEach(function (element, number) {  // a collapsed supernode shows that a member matched
        element.classList.toggle("fc-match", groups[number].members.some(function (i) { return indices.indexOf(i) >= 0; }));
      });
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
    groups.forEach(function (group, number) {
      var barButton = el("button", "fc-supernode", group.name + " (" + group.members.length + ")");
      barButton.type = "button";
      barButton.setAttribute("data-supernode", String(number));
      barButton.setAttribute("title", "Show the members (expand) and highlight them; click again to collapse");
      barButton.addEventListener("click", function () {
        setExpanded(number, !expanded[number]);
        highlight(expanded[number] ? group.members : []);
      });
      supernodeBar.appendChild(barButton);
    });

    buildEdges();
    applyThreshold();
    showHint();
    renderPins();
  }

  if (data.mode === "dashboards") renderDashboardPage(); else renderGraphPage();
  window.__fcReady = true;
})();
