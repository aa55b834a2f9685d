// Number, byte and time formatting shared by the tables and charts.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function formatBytes(n) {
  let value = Number(n) || 0;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits).replace(/\.0$/, "")} ${UNITS[unit]}`;
}

export function formatRate(bytesPerSecond) {
  return `${formatBytes(bytesPerSecond)}/s`;
}

export function formatCount(n) {
  return (Number(n) || 0).toLocaleString("en-US");
}

export function formatDuration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** "12s ago" for recent times, a local date and time for older ones; "never" for null. */
export function formatSince(date, now = Date.now()) {
  if (!date) return "never";
  const seconds = (now - date.getTime()) / 1000;
  if (seconds < 5) return "now";
  if (seconds < 24 * 3600) return `${formatDuration(seconds)} ago`;
  return date.toLocaleString();
}

/** The API sends ISO 8601 strings; older stores may hold epoch seconds. */
export function parseTime(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? new Date(value * 1000) : new Date(value);
}
