// The live sessions table: filter, sort, then show one page. Rows are a fixed pool of <tr>
// elements whose cells are rewritten in place, so a render costs the same at 10 or 10,000
// sessions (plus one sort). app.js calls render() at most once per animation frame.

import { formatBytes, formatDuration, formatRate } from "./format.js";

const PAGE_SIZE = 50;
const dash = (v) => v ?? "—";

const age = (r, now) => now - Date.parse(r.session.started_at); // ms

// value: what sorting compares; text: what the cell shows (value itself when absent).
const COLUMNS = [
  { key: "id", label: "ID", value: (r) => r.session.id },
  { key: "user", label: "User", value: (r) => r.session.user ?? "", text: (r) => dash(r.session.user) },
  // What vouched for the user: store, pam, ldap, http, gssapi or tls.
  { key: "source", label: "Source", value: (r) => r.session.source ?? "",
    text: (r) => dash(r.session.source) },
  { key: "client", label: "Client", value: (r) => r.session.client },
  { key: "command", label: "Command", value: (r) => dash(r.session.command) },
  // socks5, socks4, http-connect or http; "+tls" inside a TLS listener.
  { key: "protocol", label: "Protocol",
    value: (r) => `${r.session.protocol ?? "socks5"}${r.session.tls ? "+tls" : ""}` },
  { key: "target", label: "Target", value: (r) => r.session.target ?? "",
    text: (r) => dash(r.session.target) },
  { key: "state", label: "State", value: (r) => r.session.state },
  // Age ascending (the default sort) lists the newest first.
  { key: "age", label: "Age", num: true, value: age,
    text: (r, now) => formatDuration(age(r, now) / 1000) },
  { key: "bytes_up", label: "Up", num: true, largestFirst: true,
    value: (r) => r.session.bytes_up, text: (r) => formatBytes(r.session.bytes_up) },
  { key: "bytes_down", label: "Down", num: true, largestFirst: true,
    value: (r) => r.session.bytes_down, text: (r) => formatBytes(r.session.bytes_down) },
  { key: "rate", label: "Throughput", num: true, largestFirst: true,
    value: (r) => r.rateUp + r.rateDown,
    text: (r) => `↑ ${formatRate(r.rateUp)}  ↓ ${formatRate(r.rateDown)}` },
];
const TARGET = COLUMNS.findIndex((c) => c.key === "target");

export class SessionsTable {
  /** onKill(session) is called when a row's Kill button is pressed. */
  constructor(store, { onKill }) {
    this.store = store;
    this.table = document.getElementById("sessions");
    this.empty = document.getElementById("sessions-empty");
    this.pageInfo = document.getElementById("page-info");
    this.prev = document.getElementById("page-prev");
    this.next = document.getElementById("page-next");
    this.sort = { key: "age", descending: false };
    this.filter = "";
    this.page = 0;
    this.rows = [];
    this.visible = [];
    this.onChange = () => {};
    this.#buildHeader();
    this.table.tBodies[0].addEventListener("click", (event) => {
      const button = event.target.closest("button[data-row]");
      if (button) onKill(this.visible[Number(button.dataset.row)].session);
    });
    this.prev.addEventListener("click", () => this.#turn(-1));
    this.next.addEventListener("click", () => this.#turn(1));
  }

  setFilter(text) {
    this.filter = text.trim().toLowerCase();
    this.page = 0;
    this.onChange();
  }

  render(now = Date.now()) {
    const matches = this.#matching(now);
    const pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    this.page = Math.min(this.page, pages - 1);
    const first = this.page * PAGE_SIZE;
    this.visible = matches.slice(first, first + PAGE_SIZE);
    this.#ensureRows(this.visible.length);
    this.visible.forEach((record, i) => this.#fill(this.rows[i], record, now));
    this.rows.forEach((row, i) => { row.hidden = i >= this.visible.length; });
    this.empty.hidden = matches.length > 0;
    this.empty.textContent = this.store.size ? "No session matches the filter." : "No live sessions.";
    this.pageInfo.textContent = matches.length
      ? `${first + 1}–${first + this.visible.length} of ${matches.length.toLocaleString("en-US")}`
      : "";
    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
  }

  #matching(now) {
    const q = this.filter;
    const records = [...this.store.records()].filter(
      (r) => !q || (r.session.user ?? "").toLowerCase().includes(q)
        || (r.session.target ?? "").toLowerCase().includes(q),
    );
    const column = COLUMNS.find((c) => c.key === this.sort.key);
    const sign = this.sort.descending ? -1 : 1;
    const keyed = records.map((r) => [column.value(r, now), r]);
    keyed.sort(([a], [b]) => sign * (a < b ? -1 : a > b ? 1 : 0));
    return keyed.map(([, r]) => r);
  }

  #buildHeader() {
    const tr = this.table.tHead.rows[0];
    for (const column of COLUMNS) {
      const th = document.createElement("th");
      th.scope = "col";
      th.dataset.key = column.key;
      if (column.num) th.className = "num";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.textContent = column.label;
      button.addEventListener("click", () => {
        const same = this.sort.key === column.key;
        this.sort = { key: column.key, descending: same ? !this.sort.descending : !!column.largestFirst };
        this.#markSorted();
        this.onChange();
      });
      th.append(button);
      tr.append(th);
    }
    const actions = document.createElement("th");
    actions.scope = "col";
    actions.innerHTML = '<span class="visually-hidden">Actions</span>';
    tr.append(actions);
    this.#markSorted();
  }

  #markSorted() {
    for (const th of this.table.tHead.rows[0].cells) {
      if (!th.dataset.key) continue;
      const sorted = th.dataset.key === this.sort.key;
      th.setAttribute("aria-sort", sorted ? (this.sort.descending ? "descending" : "ascending") : "none");
    }
  }

  #ensureRows(count) {
    const body = this.table.tBodies[0];
    while (this.rows.length < count) {
      const row = body.insertRow();
      for (const column of COLUMNS) {
        const cell = row.insertCell();
        cell.className = `col-${column.key}${column.num ? " num" : ""}`;
      }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger small";
      button.textContent = "Kill";
      button.dataset.row = String(this.rows.length);
      row.insertCell().append(button);
      this.rows.push(row);
    }
  }

  #fill(row, record, now) {
    COLUMNS.forEach((column, i) => {
      const text = String(column.text ? column.text(record, now) : column.value(record, now));
      const cell = row.cells[i];
      if (cell.textContent !== text) cell.textContent = text;
    });
    row.dataset.id = record.session.id;
    row.dataset.state = record.session.state;
    row.cells[TARGET].title = record.session.resolved ? `resolved: ${record.session.resolved}` : "";
    const kill = row.cells[COLUMNS.length].firstChild;
    kill.setAttribute("aria-label", `Kill session ${record.session.id}`);
  }

  #turn(delta) {
    this.page = Math.max(0, this.page + delta);
    this.onChange();
  }
}
