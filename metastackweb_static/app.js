// MetaStack web console. Plain JS, no build step, no external assets.
// It uses only the JSON API under /api/v1/ and one event stream
// (/api/v1/events) that keeps what it shows current: no polling.
"use strict";

const state = {
  me: null,            // {user, role, csrf}
  data: {vm: new Map(), host: new Map(), flavour: new Map(), image: new Map()},
  rev: new Map(),      // "kind/name" -> revision of the last streamed change
  stream: null,        // the EventSource
  streamVm: null,      // the VM whose console and history the stream carries
  etcd: "ok",
  connected: false,
  sort: {key: "name", dir: 1},
  filter: "",
  console: "",
  history: [],
  detailError: "",
};

// -- DOM helpers (no innerHTML: names from etcd are text, never markup) ------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const isAdmin = () => state.me && state.me.role === "admin";

// -- API ---------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const opts = {method, headers: {}, credentials: "same-origin"};
  if (method !== "GET") opts.headers["X-CSRF-Token"] = state.me ? state.me.csrf : "";
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch("/api/v1/" + path, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    if (resp.status === 401 && path !== "session") { loggedOut(); }
    throw new ApiError(resp.status, (data && data.error) || resp.statusText);
  }
  return {data, rev: Number(resp.headers.get("X-MetaStack-Revision") || 0)};
}

// -- data: lists from GET, changes from the stream ---------------------------
const LISTS = {vm: "vms", host: "hosts", flavour: "flavours", image: "images"};
const keyOf = (kind, obj) => kind === "host" ? obj.node : obj.name;

async function refetch(kind) {
  const {data, rev} = await api("GET", LISTS[kind]);
  const map = state.data[kind];
  const fresh = new Map(data.map((o) => [keyOf(kind, o), o]));
  for (const name of [...map.keys()]) {   // keep what the stream told us after this read
    if (!fresh.has(name) && !((state.rev.get(kind + "/" + name) || 0) > rev)) map.delete(name);
  }
  for (const [name, obj] of fresh) {
    if (!((state.rev.get(kind + "/" + name) || 0) > rev)) map.set(name, obj);
  }
}

async function refetchAll() {
  try {
    await Promise.all(Object.keys(LISTS).map(refetch));
    const vm = currentVm();
    if (vm) await loadDetail(vm);
  } catch (e) {
    if (e.status !== 401) showBanner("Cannot read the cluster state: " + e.message);
  }
  render();
}

function onChange(msg) {
  if (msg.kind === "console") {
    if (msg.name === currentVm()) { state.console = msg.object.text; renderConsole(); }
    return;
  }
  if (msg.kind === "history") {
    if (msg.name === currentVm()) {
      if (!state.history.some((e) => e.key === msg.object.key)) {
        state.history.push(msg.object);
        state.history.sort((a, b) => (a.key < b.key ? -1 : 1));
      }
      render();
    }
    return;
  }
  const map = state.data[msg.kind];
  if (!map) return;
  state.rev.set(msg.kind + "/" + msg.name, msg.revision);
  if (msg.op === "delete") map.delete(msg.name); else map.set(msg.name, msg.object);
  scheduleRender();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; render(); });
}

// -- the event stream --------------------------------------------------------
function openStream() {
  const vm = currentVm();
  if (state.stream && state.streamVm === vm) return;
  closeStream();
  state.streamVm = vm;
  const es = new EventSource("/api/v1/events" + (vm ? "?vm=" + encodeURIComponent(vm) : ""));
  state.stream = es;
  es.addEventListener("change", (ev) => onChange(JSON.parse(ev.data)));
  es.addEventListener("status", (ev) => {
    const s = JSON.parse(ev.data);
    state.etcd = s.etcd;
    state.connected = true;
    updateBanner();
    if (s.resync || s.etcd === "ok") refetchAll();
  });
  es.addEventListener("error", () => {
    state.connected = false;
    updateBanner();
    // The browser reconnects by itself (retry: 1 s). A stream refused
    // (logged out) stays closed: check the session then.
    if (es.readyState === EventSource.CLOSED) {
      state.stream = null;
      setTimeout(checkSession, 1000);
    }
  });
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  state.streamVm = null;
}

function showBanner(text) {
  const b = $("#banner");
  b.textContent = text;
  b.hidden = !text;
}

function updateBanner() {
  if (!state.me) return showBanner("");
  if (!state.connected) return showBanner("Connection to the server lost: reconnecting…");
  if (state.etcd !== "ok") return showBanner("The server has lost etcd: what you see may be out of date.");
  showBanner("");
}

// -- session -----------------------------------------------------------------
async function checkSession() {
  try {
    const {data} = await api("GET", "session");
    loggedIn(data);
  } catch (e) {
    if (e.status === 401) loggedOut();
    else { showBanner("Server unreachable: retrying…"); setTimeout(checkSession, 2000); }
  }
}

function loggedIn(me) {
  state.me = me;
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  $("#whoami").textContent = `${me.user} (${me.role})`;
  document.body.classList.toggle("viewer", me.role !== "admin");
  if (!location.hash) location.hash = "#/vms";
  route();
}

function loggedOut() {
  state.me = null;
  closeStream();
  for (const m of Object.values(state.data)) m.clear();
  $("#login").hidden = false;
  $("#nav").hidden = true;
  $("#who").hidden = true;
  $("#view").replaceChildren();
  showBanner("");
}

async function login(ev) {
  ev.preventDefault();
  const err = $("#login-error");
  err.textContent = "";
  try {
    const {data} = await api("POST", "session", {user: $("#login-user").value, password: $("#login-password").value});
    $("#login-password").value = "";
    loggedIn(data);
  } catch (e) {
    err.textContent = e.status === 429 ? "Too many failed attempts: wait a few minutes." : e.message;
  }
}

async function logout() {
  try { await api("DELETE", "session"); } catch (e) { /* gone already */ }
  loggedOut();
}

// -- routing -----------------------------------------------------------------
function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return {page: parts[0] || "vms", name: parts[1] ? decodeURIComponent(parts[1]) : null};
}
function currentVm() {
  const r = currentRoute();
  return r.page === "vms" && r.name ? r.name : null;
}

async function route() {
  if (!state.me) return;
  const r = currentRoute();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.nav === r.page);
    if (a.dataset.nav === r.page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  state.console = ""; state.history = []; state.detailError = "";
  const reopen = state.streamVm !== currentVm() || !state.stream;
  render();
  if (reopen) openStream();   // its first status message triggers the reads
  else if (currentVm()) { await loadDetail(currentVm()); render(); }
}

async function loadDetail(name) {
  try {
    const [c, ev] = await Promise.all([api("GET", `vms/${encodeURIComponent(name)}/console`),
                                       api("GET", `vms/${encodeURIComponent(name)}/events`)]);
    state.console = c.data.text;
    state.history = ev.data;
    state.detailError = "";
  } catch (e) {
    state.detailError = e.message;
  }
}

// -- rendering ---------------------------------------------------------------
const SYMBOL = {running: "▶", stopped: "■", pending: "…", starting: "↑", stopping: "↓", error: "✖",
                untrusted: "?", ready: "✔", lost: "✖", down: "✖"};
function stateLabel(s) {
  const key = String(s || "").split(" ")[0];
  return h("span", {class: "state state-" + key}, (SYMBOL[key] || "•") + " " + s);
}

function age(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (isNaN(s)) return "";
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

function render() {
  if (!state.me) return;
  const r = currentRoute();
  const view = $("#view");
  let content;
  if (r.page === "vms" && r.name) content = renderVm(r.name);
  else if (r.page === "hosts") content = renderHosts();
  else if (r.page === "flavours") content = renderFlavours();
  else if (r.page === "images") content = renderImages();
  else content = renderVms();
  // Keep focus and typed text in forms across re-renders.
  const active = document.activeElement && document.activeElement.id;
  const keep = {};
  for (const el of view.querySelectorAll("input, select")) if (el.id) keep[el.id] = el.type === "checkbox" ? el.checked : el.value;
  const errors = {};
  for (const el of view.querySelectorAll(".error[id]")) errors[el.id] = el.textContent;
  view.replaceChildren(content);
  for (const [id, v] of Object.entries(keep)) {
    const el = document.getElementById(id);
    if (!el || id === "vm-filter") continue;
    if (el.type === "checkbox") el.checked = v; else if ([...(el.options || [{value: v}])].some((o) => o.value === v)) el.value = v;
  }
  for (const [id, t] of Object.entries(errors)) { const el = document.getElementById(id); if (el && !el.textContent) el.textContent = t; }
  if (active && document.getElementById(active)) {
    const el = document.getElementById(active);
    el.focus();
    if (el.setSelectionRange && el.type === "text") el.setSelectionRange(el.value.length, el.value.length);
  }
}

function confirmThen(text, fn) {
  const d = $("#confirm");
  $("#confirm-text").textContent = text;
  d.returnValue = "";
  d.onclose = () => { if (d.returnValue === "yes") fn(); };
  d.showModal();
}

async function act(errEl, fn) {
  errEl.textContent = "";
  try { await fn(); } catch (e) { errEl.textContent = e.message; }
}

function vmActions(vm, errId) {
  if (!isAdmin()) return [];
  const err = () => document.getElementById(errId);
  const q = encodeURIComponent(vm.name);
  const out = [];
  if (vm.desired === "stopped") out.push(h("button", {type: "button", "data-action": "start",
    onclick: () => act(err(), () => api("POST", `vms/${q}/start`))}, "Start"));
  if (vm.desired === "running") out.push(h("button", {type: "button", "data-action": "stop",
    onclick: () => confirmThen(`Stop VM ${vm.name}?`, () => act(err(), () => api("POST", `vms/${q}/stop`)))}, "Stop"));
  if (vm.desired !== "(deleted)") out.push(h("button", {type: "button", class: "danger", "data-action": "destroy",
    onclick: () => confirmThen(`Destroy VM ${vm.name}? Its disk is removed.`,
      () => act(err(), () => api("DELETE", `vms/${q}`)))}, "Destroy"));
  return out;
}

function renderVms() {
  const vms = [...state.data.vm.values()];
  const counts = {};
  for (const v of vms) counts[v.state] = (counts[v.state] || 0) + 1;
  const f = state.filter.toLowerCase();
  const shown = vms.filter((v) => !f || [v.name, v.flavour, v.state, v.host, v.desired, v.reason]
    .some((x) => String(x || "").toLowerCase().includes(f)));
  const {key, dir} = state.sort;
  shown.sort((a, b) => {
    const x = key === "age" ? -(Date.parse(a.updated) || 0) : String(a[key] || "");
    const y = key === "age" ? -(Date.parse(b.updated) || 0) : String(b[key] || "");
    return (x < y ? -1 : x > y ? 1 : 0) * dir || (a.name < b.name ? -1 : 1);
  });
  const cols = [["name", "Name"], ["flavour", "Flavour"], ["desired", "Desired"], ["state", "State"],
                ["host", "Host"], ["reason", "Reason"], ["age", "Age"]];
  const head = h("tr", {}, cols.map(([k, label]) => h("th", {scope: "col", "aria-sort": key === k ? (dir > 0 ? "ascending" : "descending") : null,
      title: k === "age" ? "time since its owner last reported a change" : null},
    h("button", {type: "button", class: "sort", "data-sort": k, onclick: () => {
      state.sort = {key: k, dir: state.sort.key === k ? -state.sort.dir : 1}; render(); }},
      label + (key === k ? (dir > 0 ? " ▲" : " ▼") : "")))), isAdmin() ? h("th", {scope: "col"}, "Actions") : null);
  const rows = shown.map((v) => h("tr", {"data-vm": v.name},
    h("td", {class: "name"}, h("a", {href: "#/vms/" + encodeURIComponent(v.name)}, v.name)),
    h("td", {}, v.flavour), h("td", {class: "desired"}, v.desired), h("td", {class: "vmstate"}, stateLabel(v.state)),
    h("td", {class: "host"}, v.host), h("td", {class: "reason"}, v.reason), h("td", {}, age(v.updated)),
    isAdmin() ? h("td", {class: "actions"}, vmActions(v, "vm-error-" + v.name),
                  h("span", {class: "error", id: "vm-error-" + v.name, role: "alert"})) : null));
  return h("div", {},
    h("h1", {}, "Virtual machines"),
    h("p", {class: "counts", id: "vm-counts"}, `${vms.length} VM(s): `,
      Object.keys(counts).sort().map((s) => h("span", {class: "count"}, stateLabel(s), " ", counts[s]))),
    isAdmin() ? createVmForm() : null,
    h("label", {class: "filter"}, "Filter ", h("input", {id: "vm-filter", type: "search", value: state.filter,
      placeholder: "name, state, host…", oninput: (e) => { state.filter = e.target.value; render(); }})),
    h("div", {class: "scroll"}, h("table", {id: "vm-table"}, h("thead", {}, head), h("tbody", {}, rows))),
    shown.length ? null : h("p", {class: "empty"}, vms.length ? "No VM matches the filter." : "No VMs yet."));
}

function createVmForm() {
  const flavours = [...state.data.flavour.keys()].sort();
  const images = [...state.data.image.keys()].sort();
  const hosts = [...state.data.host.keys()].sort();
  const submit = async (ev) => {
    ev.preventDefault();
    const err = $("#create-error");
    const body = {name: $("#create-name").value.trim(), flavour: $("#create-flavour").value};
    if ($("#create-image").value) body.image = $("#create-image").value;
    if ($("#create-host").value) body.host = $("#create-host").value;
    if ($("#create-stopped").checked) body.state = "stopped";
    err.textContent = "";
    $("#create-name").removeAttribute("aria-invalid");
    try {
      await api("POST", "vms", body);
      $("#create-name").value = "";
    } catch (e) {
      err.textContent = e.message;
      if (/VM name|VM named/.test(e.message)) $("#create-name").setAttribute("aria-invalid", "true");
    }
  };
  return h("form", {id: "create-form", class: "inline-form", onsubmit: submit},
    h("fieldset", {}, h("legend", {}, "Create a VM"),
      h("label", {}, "Name ", h("input", {id: "create-name", required: true, autocomplete: "off", maxlength: 63,
                                           "aria-describedby": "create-error"})),
      h("label", {}, "Flavour ", h("select", {id: "create-flavour", required: true},
        flavours.map((f) => { const o = state.data.flavour.get(f);
          return h("option", {value: f}, `${f} (${o.vcpus} vCPU, ${o.ram_mb} MiB)`); }))),
      h("label", {}, "Image ", h("select", {id: "create-image"}, h("option", {value: ""}, "none"),
        images.map((i) => h("option", {value: i}, i)))),
      h("label", {}, "Pin to ", h("select", {id: "create-host"}, h("option", {value: ""}, "any host"),
        hosts.map((n) => h("option", {value: n}, n)))),
      h("label", {class: "check"}, h("input", {id: "create-stopped", type: "checkbox"}), " start stopped"),
      h("button", {id: "create-submit", type: "submit"}, "Create"),
      h("span", {id: "create-error", class: "error", role: "alert"})));
}

function renderVm(name) {
  const vm = state.data.vm.get(name);
  const back = h("p", {}, h("a", {href: "#/vms"}, "← all VMs"));
  if (!vm) return h("div", {}, back, h("h1", {}, name), h("p", {class: "empty"}, "No such VM (or it was destroyed)."));
  let desired = vm.desired_entry;
  try { desired = JSON.stringify(JSON.parse(vm.desired_entry), null, 2); } catch (e) { /* show it raw */ }
  const dl = (pairs) => h("dl", {}, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  return h("div", {id: "vm-detail", "data-vm": name}, back,
    h("h1", {}, "VM ", name, " ", stateLabel(vm.state)),
    h("div", {class: "actions"}, vmActions(vm, "detail-error"), h("span", {class: "error", id: "detail-error", role: "alert"})),
    h("div", {class: "grid"},
      h("section", {}, h("h2", {}, "Actual state"), dl([["State", vm.state], ["Host", vm.host], ["Reason", vm.reason],
        ["Updated", vm.updated ? `${vm.updated} (${age(vm.updated)} ago)` : ""], ["Disk", vm.disk],
        ["Given up by", vm.given_up_by ? Object.entries(vm.given_up_by).map(([n, w]) => `${n}: ${w}`).join("; ") : ""]])),
      h("section", {}, h("h2", {}, "Desired entry"), dl([["Flavour", vm.flavour], ["Desired", vm.desired]]),
        h("pre", {id: "desired-entry"}, desired || "(deleted)"))),
    h("section", {}, h("h2", {}, "Serial console (read-only, live)"),
      h("pre", {id: "console", class: "console", tabindex: 0}, state.console || "(no console output published)")),
    h("section", {}, h("h2", {}, "History"),
      state.detailError ? h("p", {class: "error"}, state.detailError) : null,
      h("div", {class: "scroll"}, h("table", {id: "history"},
        h("thead", {}, h("tr", {}, ["Time", "Event", "Node", "Detail"].map((c) => h("th", {scope: "col"}, c)))),
        h("tbody", {}, state.history.map((e) => h("tr", {"data-event": e.event},
          h("td", {}, e.at), h("td", {class: "event"}, e.event), h("td", {}, e.node), h("td", {}, e.detail)))))),
      state.history.length ? null : h("p", {class: "empty"}, "No recorded events.")));
}

function renderConsole() {
  const el = $("#console");
  if (!el) return;
  const atEnd = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
  el.textContent = state.console || "(no console output published)";
  if (atEnd) el.scrollTop = el.scrollHeight;
}

function bar(label, used, total, unit) {
  const pct = total ? Math.round((100 * used) / total) : 0;
  return h("div", {class: "bar"}, h("span", {class: "bar-label"}, `${label}: ${used ?? "?"} / ${total ?? "?"}${unit} (${pct}%)`),
    h("meter", {min: 0, max: total || 1, value: used || 0, high: (total || 1) * 0.85, "aria-label": label}));
}

function renderHosts() {
  const hosts = [...state.data.host.values()].sort((a, b) => (a.node < b.node ? -1 : 1));
  const vmsOf = (node) => [...state.data.vm.values()].filter((v) => v.host === node).map((v) => v.name).sort();
  return h("div", {},
    h("h1", {}, "Hosts"),
    h("div", {class: "cards"}, hosts.map((n) => h("article", {class: "card host-" + String(n.state).split(" ")[0], "data-host": n.node},
      h("h2", {}, n.node, " ", stateLabel(n.state)),
      n.vcpus !== null ? [bar("vCPUs", n.vcpus_used, n.vcpus, ""), bar("RAM", n.ram_mb_used, n.ram_mb, " MiB")] :
        h("p", {}, "No live host record: it stopped renewing its lease."),
      n.address ? h("p", {}, "Address: ", n.address) : null,
      n.fence ? h("p", {class: "fence"}, "Fence: ", n.fence) : null,
      h("p", {class: "vms"}, "VMs: ", vmsOf(n.node).length ? vmsOf(n.node).flatMap((v, i) =>
        [i ? ", " : "", h("a", {href: "#/vms/" + encodeURIComponent(v)}, v)]) : "none")))),
    hosts.length ? null : h("p", {class: "empty"}, "No hosts registered."));
}

function renderFlavours() {
  const fl = [...state.data.flavour.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
  const submit = async (ev) => {
    ev.preventDefault();
    const err = $("#flavour-error");
    await act(err, async () => {
      await api("POST", "flavours", {name: $("#flavour-name").value.trim(),
        vcpus: Number($("#flavour-vcpus").value), ram_mb: Number($("#flavour-ram").value)});
      $("#flavour-name").value = "";
    });
  };
  return h("div", {},
    h("h1", {}, "Flavours"),
    isAdmin() ? h("form", {id: "flavour-form", class: "inline-form", onsubmit: submit}, h("fieldset", {}, h("legend", {}, "Create a flavour"),
      h("label", {}, "Name ", h("input", {id: "flavour-name", required: true, autocomplete: "off"})),
      h("label", {}, "vCPUs ", h("input", {id: "flavour-vcpus", type: "number", min: 1, value: 1, required: true})),
      h("label", {}, "RAM (MiB) ", h("input", {id: "flavour-ram", type: "number", min: 1, value: 512, required: true})),
      h("button", {id: "flavour-submit", type: "submit"}, "Create"),
      h("span", {id: "flavour-error", class: "error", role: "alert"}))) : null,
    h("div", {class: "scroll"}, h("table", {id: "flavour-table"},
      h("thead", {}, h("tr", {}, ["Name", "vCPUs", "RAM (MiB)", "Used by"].map((c) => h("th", {scope: "col"}, c)),
        isAdmin() ? h("th", {scope: "col"}, "Actions") : null)),
      h("tbody", {}, fl.map((f) => {
        const users = [...state.data.vm.values()].filter((v) => v.flavour === f.name).length;
        return h("tr", {"data-flavour": f.name}, h("td", {}, f.name), h("td", {}, f.vcpus ?? "malformed"),
          h("td", {}, f.ram_mb ?? ""), h("td", {}, `${users} VM(s)`),
          isAdmin() ? h("td", {}, h("button", {type: "button", class: "danger", "data-action": "delete",
            onclick: () => confirmThen(`Delete flavour ${f.name}?`, () => act(document.getElementById("flavour-error-" + f.name),
              () => api("DELETE", "flavours/" + encodeURIComponent(f.name))))}, "Delete"),
            h("span", {class: "error", id: "flavour-error-" + f.name, role: "alert"})) : null);
      })))));
}

function renderImages() {
  const im = [...state.data.image.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
  return h("div", {},
    h("h1", {}, "Images"),
    h("p", {class: "hint"}, "Import images with metastackctl image import (uploads go to Ceph)."),
    h("div", {class: "scroll"}, h("table", {id: "image-table"},
      h("thead", {}, h("tr", {}, ["Name", "Pool", "RBD", "Size", "Boot"].map((c) => h("th", {scope: "col"}, c)),
        isAdmin() ? h("th", {scope: "col"}, "Actions") : null)),
      h("tbody", {}, im.map((i) => h("tr", {"data-image": i.name}, h("td", {}, i.name), h("td", {}, i.pool),
        h("td", {}, i.rbd), h("td", {}, i.size ? `${(i.size / 1048576).toFixed(1)} MiB` : ""), h("td", {}, i.boot),
        isAdmin() ? h("td", {}, h("button", {type: "button", class: "danger", "data-action": "delete",
          onclick: () => confirmThen(`Delete image ${i.name}?`, () => act(document.getElementById("image-error-" + i.name),
            () => api("DELETE", "images/" + encodeURIComponent(i.name))))}, "Delete"),
          h("span", {class: "error", id: "image-error-" + i.name, role: "alert"})) : null))))),
    im.length ? null : h("p", {class: "empty"}, "No images."));
}

// -- start ---------------------------------------------------------------------
window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  setInterval(() => { if (state.me && currentRoute().page === "vms") scheduleRender(); }, 10000);  // ages only
  checkSession();
});
