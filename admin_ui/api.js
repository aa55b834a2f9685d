// The admin API over fetch: adds the bearer token, turns HTTP errors into exceptions.
// The token lives in sessionStorage only (never in a URL): it is gone when the tab closes.

const TOKEN_KEY = "trisocks.adminToken";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** The token was refused (HTTP 401): the user has to sign in again. */
export class AuthError extends Error {}

/** Any other non-2xx answer; `message` is the API's {"error": "..."} text. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function authHeaders() {
  return { Authorization: `Bearer ${token.get()}` };
}

export async function checkStatus(response) {
  if (response.status === 401) throw new AuthError("The admin token was rejected.");
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error ?? message;
  } catch {
    // not JSON: keep the status line
  }
  throw new ApiError(response.status, message);
}

async function request(method, path, body) {
  const headers = authHeaders();
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await checkStatus(await fetch(path, init));
  return response.status === 204 ? null : response.json();
}

const user = (name) => `/api/users/${encodeURIComponent(name)}`;

export const api = {
  stats: () => request("GET", "/api/stats"),
  users: async () => (await request("GET", "/api/users")).users,
  killSession: (id) => request("DELETE", `/api/sessions/${encodeURIComponent(id)}`),
  killUserSessions: (name) => request("DELETE", `${user(name)}/sessions`),
  addUser: (name, password) => request("POST", "/api/users", { user: name, password }),
  removeUser: (name) => request("DELETE", user(name)),
  setPassword: (name, password) => request("PUT", `${user(name)}/password`, { password }),
};
