// The per-user accounting table and user management (add, remove, change password, end
// sessions). Every change goes through the API; the table is redrawn from GET /api/users.

import { api } from "./api.js";
import { formatBytes, formatCount, formatSince, parseTime } from "./format.js";

const ANONYMOUS = "(anonymous)"; // accounts unauthenticated sessions; not a manageable user
// Sources whose users are managed here. Accounts another source vouched for (ldap:alice,
// gssapi:bob) only get "End sessions": their password and existence belong to that source.
const MANAGED = ["store", null, undefined];

const ACTIONS = [
  { action: "kill", label: "End sessions", className: "quiet small" },
  { action: "password", label: "Password…", className: "quiet small" },
  { action: "remove", label: "Remove", className: "danger small" },
];

export class UsersPanel {
  /** run(promise, doneMessage) reports the outcome and reloads the table (see app.js). */
  constructor({ run }) {
    this.body = document.querySelector("#users tbody");
    this.dialog = document.getElementById("password-dialog");
    this.run = run;

    const form = document.getElementById("add-user");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const { user, password } = Object.fromEntries(new FormData(form));
      if (await run(api.addUser(user.trim(), password), `User ${user.trim()} added.`)) form.reset();
    });
    this.body.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) this.#act(button.dataset.action, button.closest("tr").dataset.user);
    });
  }

  /** Rows are kept per user and updated in place, so a focused button survives a refresh. */
  render(users, now = Date.now()) {
    const existing = new Map([...this.body.rows].map((tr) => [tr.dataset.user, tr]));
    const rows = users.map((u) => {
      const tr = existing.get(u.user) ?? this.#createRow(u.user, u.source);
      const texts = [
        u.user,
        u.source ?? "—",
        formatCount(u.active_sessions),
        formatCount(u.sessions_total),
        formatBytes(u.bytes_up),
        formatBytes(u.bytes_down),
        `${formatCount(u.datagrams_up)} / ${formatCount(u.datagrams_down)}`,
        formatSince(parseTime(u.last_seen), now),
      ];
      texts.forEach((text, i) => {
        if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text;
      });
      const kill = tr.querySelector('[data-action="kill"]');
      if (kill) kill.disabled = !u.active_sessions;
      return tr;
    });
    const order = (list) => list.map((tr) => tr.dataset.user).join("\n");
    if (order(rows) !== order([...this.body.rows])) this.body.replaceChildren(...rows);
  }

  #createRow(name, source) {
    const tr = document.createElement("tr");
    tr.dataset.user = name;
    tr.dataset.source = source ?? "";
    for (const className of ["col-user", "col-source", "num", "num", "num", "num", "num", ""]) {
      tr.insertCell().className = className;
    }
    const actions = tr.insertCell();
    actions.className = "actions";
    if (name === ANONYMOUS) return tr;
    const external = !MANAGED.includes(source);
    for (const { action, label, className } of ACTIONS) {
      if (external && action !== "kill") continue;
      const button = document.createElement("button");
      button.type = "button";
      button.className = className;
      button.dataset.action = action;
      button.textContent = label;
      button.setAttribute("aria-label", `${label.replace("…", "")} of ${name}`);
      actions.append(button);
    }
    return tr;
  }

  async #act(action, name) {
    if (action === "kill") {
      if (!confirm(`End all live sessions of ${name}?`)) return;
      await this.run(api.killUserSessions(name), ({ killed }) => `Ended ${killed} session(s) of ${name}.`);
    } else if (action === "remove") {
      if (!confirm(`Remove user ${name}? Their live sessions end and they can no longer sign in.`)) return;
      await this.run(api.removeUser(name), `User ${name} removed.`);
    } else if (action === "password") {
      const password = await this.#askPassword(name);
      if (password) await this.run(api.setPassword(name, password), `Password of ${name} changed.`);
    }
  }

  #askPassword(name) {
    const form = this.dialog.querySelector("form");
    form.reset();
    document.getElementById("password-user").textContent = name;
    this.dialog.showModal();
    return new Promise((resolve) => {
      this.dialog.addEventListener("close", () => {
        resolve(this.dialog.returnValue === "save" ? form.elements.password.value : null);
      }, { once: true });
    });
  }
}
