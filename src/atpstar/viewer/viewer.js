/* atpstar report viewer: circuit graphs with a size slider, sortable/filterable tables, heatmaps with hover.
   Plain JavaScript, no dependencies, nothing fetched. Part of atpstar (Apache-2.0).
   Data: <script type="application/json"> elements named by each container's data-source (graph format:
   see atpstar/viewer/page.py). SVG is written as markup, which the HTML parser puts in the SVG namespace. */
(function () {
  "use strict";
  var MIB_FRACTIONS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1];

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmt(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    var a = Math.abs(value);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? value.toExponential(3) : String(Number(value.toPrecision(4)));
  }
  function num(label, value, cls) {
    var data = value === null || value === undefined ? "" : " data-value='" + value + "'";
    return "<span class='" + cls + "'" + data + ">" + esc(label) + " " + fmt(value) + "</span>";
  }
  function data(element) {
    var source = document.getElementById(element.getAttribute("data-source"));
    return JSON.parse(source.textContent);
  }

  /* ---- graphs ---------------------------------------------------------------------------------- */
  function nodeName(n, i) {
    if (n.name !== undefined) return n.name;
    if (typeof n.id === "string") return n.id;
    var parts = [n.dictionary !== undefined ? n.dictionary : "layer " + n.layer];
    if (n.index !== undefined && n.index !== null) parts.push("#" + n.index);
    if (n.position !== undefined && n.position !== null) parts.push("@pos " + n.position);
    return parts.length > 1 ? parts.join(" ") : "node " + i;
  }
  function prepare(g) {
    var byId = {};
    var nodes = g.nodes.map(function (n, i) {
      var id = n.id !== undefined ? n.id : i;
      var layer = n.layer === null || n.layer === undefined ? Infinity : Number(n.layer);  // no layer: the output row
      var node = { id: id, i: i, raw: n, name: nodeName(n, i), layer: layer, score: n.score, exact: n.exact };
      byId[id] = node;
      return node;
    });
    var edges = (g.edges || []).map(function (e, i) {
      var w = e.weight !== undefined ? e.weight : e.score;
      var s = byId[e.source], t = byId[e.target];
      return { i: i, s: s, t: t, w: w === undefined || w === null ? 0 : w, exact: e.exact, kind: e.kind,
               name: e.name !== undefined ? e.name : s.name + " -> " + t.name };
    });
    return { nodes: nodes, edges: edges, circuits: g.circuits || defaultCircuits(edges) };
  }
  function defaultCircuits(edges) {
    var order = edges.map(function (e) { return e.i; });
    order.sort(function (a, b) { return Math.abs(edges[b].w) - Math.abs(edges[a].w) || a - b; });
    return MIB_FRACTIONS.map(function (x) {
      var k = Math.floor(x * edges.length);
      return { fraction: x, n_edges: k, faithfulness: null, edges: order.slice(0, k) };
    });
  }
  function layout(nodes) {
    var layers = [], rows = {};
    nodes.forEach(function (n) {
      if (!(n.layer in rows)) { rows[n.layer] = []; layers.push(n.layer); }
      rows[n.layer].push(n);
    });
    layers.sort(function (a, b) { return a - b; });
    var width = 1000, rowH = Math.max(24, Math.min(54, 1500 / layers.length)), height = layers.length * rowH + 20;
    layers.forEach(function (layer, r) {
      var row = rows[layer];
      row.forEach(function (n, j) {
        var across = typeof n.raw.x === "number" ? n.raw.x : (j + 0.5) / row.length;  // a node's own x in [0, 1] wins
        n.x = 60 + across * (width - 80);
        n.y = height - 20 - r * rowH;
        n.labelled = row.length <= 14;
      });
    });
    return { width: width, height: height, layers: layers, rows: rows, rowH: rowH };
  }
  function edgePath(e, offset) {
    var my = (e.s.y + e.t.y) / 2;
    return "M" + e.s.x.toFixed(1) + " " + e.s.y.toFixed(1) + " C" + (e.s.x + offset).toFixed(1) + " " + my.toFixed(1) +
      " " + (e.t.x + offset).toFixed(1) + " " + my.toFixed(1) + " " + e.t.x.toFixed(1) + " " + e.t.y.toFixed(1);
  }
  function defaultSize(circuits) {
    for (var i = 0; i < circuits.length; i++) if (circuits[i].edges.length >= 20) return i;
    return circuits.length - 1;
  }

  function GraphView(root, g) {
    var d = prepare(g), box = layout(d.nodes);
    var maxW = d.edges.reduce(function (m, e) { return Math.max(m, Math.abs(e.w)); }, 0) || 1;
    var meta = Object.keys(g.meta || {}).map(function (k) { return esc(k) + ": " + esc(g.meta[k]); }).join(" · ");
    var hasF = d.circuits.some(function (c) { return c.faithfulness !== null && c.faithfulness !== undefined; });
    root.innerHTML = "<h3>" + esc(g.title || "graph") + "</h3><p class='atp-meta'>" + meta + "</p>" +
      "<div class='atp-controls'><label>circuit size <input type='range' class='atp-size' min='0' max='" +
      Math.max(0, d.circuits.length - 1) + "' step='1'></label> <span class='atp-size-label'></span></div>" +
      (hasF ? "<div class='atp-curve'></div>" : "") +
      "<div class='atp-canvas'></div><div class='atp-details'>Click a node or an edge.</div>";
    var slider = root.querySelector(".atp-size"), canvas = root.querySelector(".atp-canvas");
    var details = root.querySelector(".atp-details"), label = root.querySelector(".atp-size-label");
    var current = null;

    function render(index) {
      var c = d.circuits[index], chosen = c.edges.map(function (i) { return d.edges[i]; });
      current = chosen;
      var touched = {}, pairs = {}, seen = {};
      chosen.forEach(function (e) {
        touched[e.s.i] = touched[e.t.i] = true;
        var key = e.s.i + ">" + e.t.i;
        pairs[key] = (pairs[key] || 0) + 1;
      });
      var parts = ["<svg class='atp-svg' viewBox='0 0 " + box.width + " " + box.height + "' role='img'>"];
      box.layers.forEach(function (layer) {
        var y = box.rows[layer][0].y;
        parts.push("<text class='atp-row' x='4' y='" + (y + 4) + "'>" + esc(rowLabel(box.rows[layer], layer)) + "</text>");
      });
      chosen.forEach(function (e) {
        var key = e.s.i + ">" + e.t.i, k = seen[key] = (seen[key] || 0) + 1;
        var offset = (k - 1 - (pairs[key] - 1) / 2) * 14, share = Math.abs(e.w) / maxW;
        var path = edgePath(e, offset), stroke = e.w >= 0 ? "#2166ac" : "#b2182b";
        if (e.exact !== undefined && e.exact !== null)
          parts.push("<path class='atp-halo' d='" + path + "' stroke-width='" + (3 + 5 * share).toFixed(2) + "'/>");
        parts.push("<path class='edge' data-edge='" + e.i + "' d='" + path + "' stroke='" + stroke + "' stroke-width='" +
          (0.8 + 5 * share).toFixed(2) + "' stroke-opacity='" + (0.35 + 0.65 * share).toFixed(2) + "'><title>" +
          esc(e.name + "  score " + fmt(e.w) + (e.exact !== undefined ? "  exact " + fmt(e.exact) : "")) + "</title></path>");
      });
      d.nodes.forEach(function (n) {
        parts.push("<g class='node" + (touched[n.i] ? "" : " idle") + "' data-node='" + n.i + "'><circle cx='" +
          n.x.toFixed(1) + "' cy='" + n.y.toFixed(1) + "' r='7'/>" +
          (n.labelled ? nodeLabel(n, box.rowH) : "") +
          "<title>" + esc(n.name + "  score " + fmt(n.score)) + "</title></g>");
      });
      parts.push("</svg>");
      canvas.innerHTML = parts.join("");
      var drawn = chosen.length;
      root.setAttribute("data-circuit-edges", c.n_edges);
      root.setAttribute("data-drawn-edges", drawn);
      label.textContent = "fraction " + c.fraction + " of edges: " + c.n_edges + " edges" +
        (drawn < c.n_edges ? " (the strongest " + drawn + " drawn)" : "") +
        (c.faithfulness !== null && c.faithfulness !== undefined ? " · faithfulness f = " + fmt(c.faithfulness) : "");
      if (hasF) drawCurve(root.querySelector(".atp-curve"), d.circuits, index, function (i) { slider.value = i; render(i); });
    }
    function showNode(n) {
      var incoming = current.filter(function (e) { return e.t === n; });
      var outgoing = current.filter(function (e) { return e.s === n; });
      var list = outgoing.concat(incoming).slice(0, 12).map(function (e) {
        return "<li>" + esc(e.name) + " " + num("score", e.w, "score") + (e.exact !== undefined ? " " + num("exact", e.exact, "exact") : "") + "</li>";
      }).join("");
      details.innerHTML = "<b class='name'>" + esc(n.name) + "</b> " + num("score", n.score, "score") +
        (n.exact !== undefined ? " " + num("exact effect", n.exact, "exact") : "") +
        rawFacts(n.raw) + "<br>in this circuit: " + incoming.length + " incoming, " + outgoing.length +
        " outgoing edges" + (list ? "<ul>" + list + "</ul>" : "");
    }
    function showEdge(e) {
      details.innerHTML = "<b class='name'>" + esc(e.name) + "</b> " + num("score", e.w, "score") + " " +
        (e.exact !== undefined && e.exact !== null ? num("exact effect", e.exact, "exact") : "<span class='exact'>exact effect: not verified</span>") +
        (e.kind ? " · kind " + esc(e.kind) : "") + "<br>" + esc(e.s.name) + " → " + esc(e.t.name);
    }
    canvas.addEventListener("click", function (event) {
      var node = event.target.closest("[data-node]"), edge = event.target.closest("[data-edge]");
      if (!node && !edge) return;
      canvas.querySelectorAll(".selected").forEach(function (el) { el.classList.remove("selected"); });
      (node || edge).classList.add("selected");
      if (node) showNode(d.nodes[Number(node.getAttribute("data-node"))]);
      else showEdge(d.edges[Number(edge.getAttribute("data-edge"))]);
    });
    slider.addEventListener("input", function () { render(Number(slider.value)); });
    slider.value = defaultSize(d.circuits);
    render(Number(slider.value));
  }
  function nodeLabel(n, rowH) {  // above the node when rows leave room, else to its right
    var above = rowH >= 40, x = above ? n.x : n.x + 10, y = above ? n.y - 10 : n.y + 3.5;
    return "<text x='" + x.toFixed(1) + "' y='" + y.toFixed(1) + "'" + (above ? "" : " class='side'") + ">" + esc(n.name) + "</text>";
  }
  function rowLabel(row, layer) {
    var kinds = {};
    row.forEach(function (n) { if (n.raw.kind) kinds[n.raw.kind] = true; });
    var names = Object.keys(kinds);
    if (names.length === 1 && (names[0] === "input" || names[0] === "logits")) return names[0];
    if (layer === Infinity) return "output";
    return "L" + Math.floor(layer) + (names.length === 1 ? " " + names[0] : "");
  }
  function rawFacts(raw) {
    var keys = ["kind", "layer", "dictionary", "index", "position"].filter(function (k) { return raw[k] !== undefined && raw[k] !== null; });
    return keys.length ? " <span class='atp-facts'>(" + keys.map(function (k) { return k + " " + esc(raw[k]); }).join(", ") + ")</span>" : "";
  }
  function drawCurve(box, circuits, index, pick) {
    var values = circuits.map(function (c) { return c.faithfulness; });
    var finite = values.filter(function (v) { return v !== null && v !== undefined; });
    var lo = Math.min(0, Math.min.apply(null, finite)), hi = Math.max(1, Math.max.apply(null, finite));
    var w = 320, h = 120, n = circuits.length;
    function px(i) { return 30 + i * (w - 40) / Math.max(1, n - 1); }
    function py(v) { return h - 18 - (v - lo) / (hi - lo) * (h - 30); }
    var points = [], marks = [];
    values.forEach(function (v, i) {
      if (v === null || v === undefined) return;
      points.push(px(i).toFixed(1) + "," + py(v).toFixed(1));
      marks.push("<circle class='atp-point" + (i === index ? " current" : "") + "' data-size='" + i + "' cx='" + px(i).toFixed(1) +
        "' cy='" + py(v).toFixed(1) + "' r='" + (i === index ? 5 : 3) + "'><title>fraction " + circuits[i].fraction +
        ": f = " + fmt(v) + "</title></circle>");
    });
    box.innerHTML = "<svg viewBox='0 0 " + w + " " + h + "' class='atp-curve-svg'><line class='atp-one' x1='30' x2='" + (w - 10) +
      "' y1='" + py(1).toFixed(1) + "' y2='" + py(1).toFixed(1) + "'/><polyline points='" + points.join(" ") + "'/>" + marks.join("") +
      "<text x='30' y='" + (h - 3) + "'>faithfulness f by circuit size (" + esc(circuits[0].fraction) + " … " +
      esc(circuits[n - 1].fraction) + " of edges)</text></svg>";
    box.onclick = function (event) {
      var point = event.target.closest("[data-size]");
      if (point) pick(Number(point.getAttribute("data-size")));
    };
  }

  /* ---- tables ---------------------------------------------------------------------------------- */
  function sortKey(cell) {
    var text = cell.textContent.trim(), value = parseFloat(text.replace(/,/g, ""));
    return /^[-+]?[\d.,]+(e[-+]?\d+)?$/i.test(text) && isFinite(value) ? value : text === "–" || text === "" ? null : text;
  }
  function SortableTable(table) {
    var filter = document.createElement("input");
    filter.type = "search";
    filter.className = "atp-filter";
    filter.placeholder = "filter rows";
    table.parentNode.insertBefore(filter, table);
    var head = table.rows[0], body = head.parentNode === table.tBodies[0] ? head.parentNode : table.tBodies[0];
    function rows() { return Array.prototype.slice.call(table.rows, 1); }
    Array.prototype.forEach.call(head.cells, function (th, col) {
      th.classList.add("atp-sortable");
      th.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(head.cells, function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        var sorted = rows().sort(function (a, b) {
          var x = sortKey(a.cells[col]), y = sortKey(b.cells[col]);
          if (x === null || y === null) return x === y ? 0 : x === null ? 1 : -1;  // blanks last
          var order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
          return descending ? -order : order;
        });
        sorted.forEach(function (row) { body.appendChild(row); });
      });
    });
    filter.addEventListener("input", function () {
      var query = filter.value.toLowerCase();
      rows().forEach(function (row) { row.hidden = query !== "" && row.textContent.toLowerCase().indexOf(query) < 0; });
    });
  }

  /* ---- heatmaps -------------------------------------------------------------------------------- */
  function colour(share) {
    var a = [247, 251, 255], b = [8, 48, 107];
    return "rgb(" + a.map(function (v, i) { return Math.round(v + (b[i] - v) * share); }).join(",") + ")";
  }
  function HeatmapView(root, maps) {
    var tip = document.createElement("div");
    tip.className = "atp-tip";
    tip.hidden = true;
    document.body.appendChild(tip);
    root.innerHTML = maps.map(function (m, k) { return "<div class='atp-heatmap' data-map='" + k + "'></div>"; }).join("");
    maps.forEach(function (m, k) {
      var rows = m.values.length, cols = m.columns.length, max = 0;
      m.values.forEach(function (row) { row.forEach(function (v) { if (v > max) max = v; }); });
      var cw = Math.max(8, Math.min(44, 860 / cols)), ch = Math.max(8, Math.min(24, 480 / rows));
      var left = 70, top = 6, bottom = 90, parts = [];
      var width = left + cw * cols + 10, height = top + ch * rows + bottom;
      parts.push("<svg viewBox='0 0 " + width + " " + height + "' width='" + width + "' height='" + height + "' class='atp-heat-svg'>");
      for (var r = 0; r < rows; r++) {
        var y = top + (rows - 1 - r) * ch;
        parts.push("<text class='atp-row' x='2' y='" + (y + ch / 2 + 4).toFixed(1) + "'>" + esc(m.rows[r]) + "</text>");
        for (var c = 0; c < cols; c++) {
          parts.push("<rect class='cell' data-row='" + r + "' data-col='" + c + "' x='" + (left + c * cw).toFixed(1) + "' y='" +
            y.toFixed(1) + "' width='" + cw.toFixed(1) + "' height='" + ch.toFixed(1) + "' fill='" + colour(max ? (m.values[r][c] || 0) / max : 0) + "'/>");
        }
      }
      var every = Math.ceil(cols / 40);
      for (var j = 0; j < cols; j += every) {
        var x = left + (j + 0.5) * cw, yl = top + ch * rows + 8;
        parts.push("<text class='atp-col' transform='rotate(-60 " + x.toFixed(1) + " " + yl + ")' x='" + x.toFixed(1) + "' y='" + yl + "'>" + esc(m.columns[j]) + "</text>");
      }
      parts.push("</svg>");
      var box = root.querySelector("[data-map='" + k + "']");
      box.innerHTML = "<h3>" + esc(m.title) + "</h3>" + parts.join("") + "<div class='atp-cell'>Hover a cell.</div>";
      box.addEventListener("mouseover", function (event) {
        var cell = event.target.closest(".cell");
        if (!cell) return;
        tip.innerHTML = cellText(m, Number(cell.getAttribute("data-row")), Number(cell.getAttribute("data-col")));
        box.querySelector(".atp-cell").innerHTML = tip.innerHTML;
        var rect = cell.getBoundingClientRect(), room = document.documentElement.clientWidth - rect.right;
        tip.style.left = (window.scrollX + (room > 380 ? rect.right + 8 : Math.max(0, rect.left - 388))) + "px";
        tip.style.top = (window.scrollY + rect.top) + "px";
        tip.hidden = false;
      });
      box.addEventListener("mouseleave", function () { tip.hidden = true; });
    });
  }
  function cellText(m, r, c) {
    var top = m.top[r][c], verified = m.verified[r][c];
    return "<b>" + esc(m.node_type + ", " + m.rows[r] + ", " + m.columns[c]) + "</b><br>" + num("Σ|score|", m.values[r][c], "total") +
      "<br>strongest: <span class='name'>" + esc(top[0]) + "</span> " + num("score", top[1], "score") + " " +
      (top[2] !== null && top[2] !== undefined ? num("exact effect", top[2], "exact") : "<span class='exact'>exact effect: not verified</span>") +
      "<br>verified here: " + verified[0] + (verified[0] ? " nodes, " + num("Σ exact", verified[1], "sum-exact") : "");
  }

  function start() {
    document.querySelectorAll("table.sortable").forEach(function (t) { SortableTable(t); });
    document.querySelectorAll(".atp-graph").forEach(function (el) { GraphView(el, data(el)); });
    document.querySelectorAll(".atp-heatmaps").forEach(function (el) { HeatmapView(el, data(el)); });
    document.body.setAttribute("data-viewer", "ready");
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
