// memscope's HTML report: switches views and drives the allocation-sites table (sort,
// filter, pages, stacks). Strings from the tracked program are only ever inserted as
// text (textContent, createTextNode), never parsed as HTML.
(function () {
  "use strict";

  // ---- views: one section at a time, chosen by the URL's fragment ----
  const views = Array.from(document.querySelectorAll("section.view"));
  const links = Array.from(document.querySelectorAll("#nav a[data-view]"));

  // Sections are `view-<name>` and links `#<name>`, so that the browser does not
  // scroll to a section of its own accord. `#sites/<id>` opens one site's stack.
  function show(id) {
    if (!views.some((v) => v.id === "view-" + id)) id = "overview";
    for (const v of views) v.classList.toggle("shown", v.id === "view-" + id);
    for (const a of links) a.classList.toggle("active", a.dataset.view === id);
  }
  let siteTable = null;
  function route() {
    const [view, arg] = location.hash.slice(1).split("/");
    show(view);
    if (view === "sites" && arg !== undefined && siteTable) siteTable.focus(Number(arg));
    else window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", route);

  // ---- figures, formatted as the terminal summary formats them ----
  const count = (n) => n.toLocaleString("en-US");
  function bytesShort(n) {
    const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if (n < 1024) return n + " B";
    let value = n / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return value.toFixed(1) + " " + units[unit];
  }

  const plural = (n, noun) => (n === 1 ? "1 " + noun : count(n) + " " + noun + "s");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const dataNode = document.getElementById("memscope-data");
  const data = dataNode ? JSON.parse(dataNode.textContent) : { sites: [], stacks: {}, site_frames: {}, frames: [] };

  // ---- stacks: frames are [function, file, line, inlined, place] ----
  function frameList(siteId, depth) {
    const box = document.createDocumentFragment();
    const ids = data.stacks[siteId] || [];
    if (ids.length === 0) {
      box.appendChild(el("p", "muted", "No stack was recorded for this site."));
      return box;
    }
    const list = el("ol", "frames");
    ids.forEach((i, n) => {
      const [fn, file, line, inlined, place] = data.frames[i];
      const li = el("li");
      if (data.site_frames[siteId] === n) li.className = "site-frame";
      li.appendChild(el("span", "fn", fn || place || "?"));
      if (file) li.appendChild(el("span", "file", file + (line === null ? "" : ":" + line)));
      if (inlined) li.appendChild(el("span", "tag", "inlined"));
      list.appendChild(li);
    });
    box.appendChild(list);
    if (depth > ids.length) {
      box.appendChild(el("p", "note", "… " + count(depth - ids.length) + " more frames in report.json"));
    }
    return box;
  }

  // The stacks of leaks and of the runtime's groups, drawn when first opened.
  for (const details of document.querySelectorAll("details.stack[data-site]")) {
    details.addEventListener("toggle", () => {
      if (details.open && !details.dataset.drawn) {
        details.dataset.drawn = "1";
        const depth = Number(details.dataset.depth || 0);
        details.appendChild(frameList(Number(details.dataset.site), depth));
      }
    });
  }

  // ---- the sites table ----
  const table = document.getElementById("site-table");
  if (table) siteTable = sitesTable(table);

  function sitesTable(table) {
    const PAGE = 100;
    const sites = data.sites;
    const body = table.tBodies[0];
    const filter = document.getElementById("site-filter");
    const origin = document.getElementById("site-origin");
    const status = document.getElementById("site-status");
    const pageLabel = document.getElementById("site-page");
    const prev = document.getElementById("site-prev");
    const next = document.getElementById("site-next");

    // What the filter searches: every frame's function and file, lower-cased once.
    const haystack = sites.map((s) => {
      const parts = [];
      if (s.location) parts.push(s.location.function || "", s.file || "");
      for (const v of s.variables) parts.push(v.name, v.type);
      for (const i of data.stacks[s.id] || []) parts.push(data.frames[i][0] || "", data.frames[i][1] || "");
      return parts.join("\n").toLowerCase();
    });
    const keys = {
      id: (s) => s.id,
      location: (s) => (s.location && s.location.function) || "",
      bytes_allocated: (s) => s.bytes_allocated,
      count: (s) => s.allocations + s.reallocations,
      bytes_at_peak: (s) => s.bytes_at_peak,
      live_bytes_at_exit: (s) => s.live_bytes_at_exit,
    };
    const originName = { user: "your code", library: "library", std: "std only", unknown: "no symbols" };
    let sortKey = "bytes_allocated";
    let descending = true;
    let rows = [];
    let page = 0;
    const open = new Set();

    function update() {
      const needle = filter.value.trim().toLowerCase();
      const wanted = origin.value;
      rows = [];
      for (let i = 0; i < sites.length; i++) {
        if (wanted && sites[i].origin !== wanted) continue;
        if (needle && !haystack[i].includes(needle)) continue;
        rows.push(i);
      }
      const key = keys[sortKey];
      rows.sort((a, b) => {
        const x = key(sites[a]);
        const y = key(sites[b]);
        const order = x < y ? -1 : x > y ? 1 : sites[a].id - sites[b].id;
        return descending ? -order : order;
      });
      page = Math.min(page, Math.max(0, Math.ceil(rows.length / PAGE) - 1));
      draw();
    }

    function draw() {
      body.replaceChildren();
      const from = page * PAGE;
      const to = Math.min(rows.length, from + PAGE);
      for (const i of rows.slice(from, to)) {
        body.appendChild(row(sites[i]));
        if (open.has(sites[i].id)) body.appendChild(stackRow(sites[i]));
      }
      if (rows.length === 0) {
        const tr = el("tr");
        const td = el("td", "muted", "No site matches.");
        td.colSpan = 7;
        tr.appendChild(td);
        body.appendChild(tr);
      }
      status.textContent =
        rows.length === sites.length
          ? plural(sites.length, "site")
          : count(rows.length) + " of " + count(sites.length) + " sites match";
      pageLabel.textContent = rows.length ? count(from + 1) + "–" + count(to) + " of " + count(rows.length) : "";
      prev.disabled = page === 0;
      next.disabled = to >= rows.length;
      for (const th of table.tHead.rows[0].cells) {
        th.classList.toggle("sorted", th.dataset.key === sortKey);
        th.classList.toggle("ascending", th.dataset.key === sortKey && !descending);
      }
    }

    function row(site) {
      const tr = el("tr", "site");
      tr.dataset.site = site.id;
      tr.tabIndex = 0;
      tr.appendChild(el("td", "num muted", "#" + site.id));
      const where = el("td", "where");
      where.appendChild(el("span", "fn", (site.location && site.location.function) || "?"));
      where.appendChild(el("span", "tag origin-" + site.origin, originName[site.origin] || site.origin));
      if (site.file) {
        const line = site.location.line;
        where.appendChild(el("span", "file", site.file + (line === null ? "" : ":" + line)));
      }
      for (const v of site.variables.slice(0, 3)) {
        const div = el("div", "var small", "variable ");
        div.appendChild(el("code", "", v.name));
        if (v.type) {
          div.appendChild(document.createTextNode(": "));
          div.appendChild(el("code", "", v.type));
        }
        where.appendChild(div);
      }
      if (site.variables.length > 3) where.appendChild(el("div", "muted small", "and " + count(site.variables.length - 3) + " more variables"));
      tr.appendChild(where);
      tr.appendChild(figure(count(site.bytes_allocated), bytesShort(site.bytes_allocated)));
      tr.appendChild(
        figure(count(site.allocations), site.reallocations ? "+" + count(site.reallocations) + " reallocations" : "")
      );
      tr.appendChild(figure(count(site.bytes_at_peak), (site.peak_share * 100).toFixed(1) + "% of peak"));
      tr.appendChild(
        figure(count(site.live_bytes_at_exit), site.live_blocks_at_exit ? "in " + plural(site.live_blocks_at_exit, "block") : "")
      );
      const basisCell = el("td");
      basisCell.appendChild(el("span", "basis basis-" + site.basis, site.basis));
      tr.appendChild(basisCell);
      tr.addEventListener("click", () => toggle(site.id));
      tr.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          toggle(site.id);
        }
      });
      return tr;
    }

    function figure(main, sub) {
      const td = el("td", "num", main);
      if (sub) td.appendChild(el("div", "sub", sub));
      return td;
    }

    function stackRow(site) {
      const tr = el("tr", "stack-row");
      const td = el("td");
      td.colSpan = 7;
      td.appendChild(frameList(site.id, site.depth));
      const pids = site.pids.length === 1 ? "process " : "processes ";
      td.appendChild(
        el(
          "p",
          "muted small",
          plural(site.allocations, "allocation") + " and " + plural(site.reallocations, "reallocation") + " in " + pids + site.pids.join(", ")
        )
      );
      tr.appendChild(td);
      return tr;
    }

    function toggle(id) {
      if (open.has(id)) open.delete(id);
      else open.add(id);
      draw();
    }

    for (const th of table.tHead.rows[0].cells) {
      if (!th.dataset.key) continue;
      th.tabIndex = 0;
      const sort = () => {
        if (sortKey === th.dataset.key) descending = !descending;
        else {
          sortKey = th.dataset.key;
          descending = sortKey !== "location" && sortKey !== "id";
        }
        update();
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter") sort();
      });
    }
    let pending = 0;
    filter.addEventListener("input", () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        page = 0;
        update();
      }, 120);
    });
    origin.addEventListener("change", () => {
      page = 0;
      update();
    });
    prev.addEventListener("click", () => {
      page -= 1;
      draw();
    });
    next.addEventListener("click", () => {
      page += 1;
      draw();
    });
    update();

    // Shows the site with this id, its stack open, whatever the filter and page.
    function focus(id) {
      filter.value = "";
      origin.value = "";
      update();
      const at = rows.findIndex((i) => sites[i].id === id);
      if (at < 0) {
        status.textContent = "Site #" + id + " is not among the sites in this page; report.json has it.";
        return;
      }
      open.add(id);
      page = Math.floor(at / PAGE);
      draw();
      const tr = body.querySelector('tr[data-site="' + id + '"]');
      if (tr) tr.scrollIntoView({ block: "center" });
    }
    return { focus };
  }

  route();

  // For tests and the curious: how long the page took to become usable (laid out,
  // which reading offsetHeight forces).
  void document.body.offsetHeight;
  document.documentElement.dataset.readyMs = String(Math.round(performance.now()));
})();
