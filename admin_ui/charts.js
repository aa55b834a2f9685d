// Small hand-drawn SVG charts: a time-series line chart and a horizontal bar chart.
// Each draw replaces the chart's content; sizes come from the <svg>'s own layout box.

const SVG = "http://www.w3.org/2000/svg";
const PAD = { top: 10, right: 12, bottom: 22, left: 64 };

function el(name, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function frame(svg) {
  const width = svg.clientWidth || 300;
  const height = svg.clientHeight || 160;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  return { width, height };
}

/**
 * The smallest round number >= `value` (at least 1): 1, 2 or 5 times a power of ten, or with
 * `binary`, that many KiB, MiB, ... so byte gridlines read "50 MiB/s" rather than "47.7 MiB/s".
 */
function niceCeiling(value, binary) {
  const unit = binary && value >= 1024 ? 1024 ** Math.floor(Math.log(value) / Math.log(1024)) : 1;
  const scaled = Math.max(1, value / unit);
  const power = 10 ** Math.floor(Math.log10(scaled));
  const step = [1, 2, 5, 10].map((m) => m * power).find((v) => v >= scaled);
  return unit * (binary && step === 1000 ? 1024 : step); // "1 MiB/s", not "1000 KiB/s"
}

/**
 * samples: [{t (ms), values: [number, ...]}], oldest first; series: [{className}] per value.
 * The x axis always spans the last `windowSeconds`, ending at `now`; `binary` is for bytes.
 */
export function drawLines(svg, { samples, series, now, windowSeconds, format, binary = false }) {
  const { width, height } = frame(svg);
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const peak = Math.max(1, ...samples.flatMap((s) => s.values));
  const top = 4 * niceCeiling(peak / 4, binary); // four gridlines, each a round number
  const x = (t) => PAD.left + plotW * (1 - (now - t) / (windowSeconds * 1000));
  const y = (v) => PAD.top + plotH * (1 - v / top);

  const left = PAD.left;
  const right = width - PAD.right;
  for (let i = 0; i <= 4; i += 1) {
    const value = (top * i) / 4;
    svg.append(el("line", { class: "grid", x1: left, x2: right, y1: y(value), y2: y(value) }));
    svg.append(el("text", { class: "axis", x: left - 6, y: y(value) + 4, "text-anchor": "end" },
      format(value)));
  }
  for (let minutes = Math.round(windowSeconds / 60); minutes >= 0; minutes -= 1) {
    const at = { x: x(now - minutes * 60000), y: height - 6, "text-anchor": minutes ? "middle" : "end" };
    svg.append(el("text", { class: "axis", ...at }, minutes ? `−${minutes}m` : "now"));
  }
  if (samples.length < 2) return;
  const base = y(0).toFixed(1);
  series.forEach(({ className }, i) => {
    const points = samples.map((s) => `${x(s.t).toFixed(1)},${y(s.values[i]).toFixed(1)}`).join("L");
    const [first, last] = [samples[0], samples.at(-1)].map((s) => x(s.t).toFixed(1));
    svg.append(el("path", { class: `area ${className}`, d: `M${first},${base}L${points}L${last},${base}Z` }));
    svg.append(el("path", { class: `line ${className}`, d: `M${points}` }));
  });
}

/** bars: [{label, values: [up, down]}], largest first; drawn as stacked up/down bars. */
export function drawBars(svg, { bars, format }) {
  const { width, height } = frame(svg);
  if (!bars.length) {
    const middle = { x: width / 2, y: height / 2, "text-anchor": "middle" };
    svg.append(el("text", { class: "axis", ...middle }, "No traffic yet"));
    return;
  }
  const labelW = 84;
  const valueW = 70;
  const rowH = Math.min(26, (height - 8) / bars.length);
  const barH = rowH * 0.62;
  const peak = Math.max(1, ...bars.map((b) => b.values[0] + b.values[1]));
  const scale = (width - labelW - valueW) / peak;
  bars.forEach(({ label, values: [up, down] }, i) => {
    const middle = 4 + (i + 0.5) * rowH;
    const bar = { y: middle - barH / 2, height: barH, rx: 2 };
    const name = el("text", { class: "bar-label", x: labelW - 8, y: middle + 4, "text-anchor": "end" },
      label.length > 12 ? `${label.slice(0, 11)}…` : label);
    name.append(el("title", {}, label));
    svg.append(name);
    svg.append(el("rect", { class: "bar up", x: labelW, width: up * scale, ...bar }));
    svg.append(el("rect", { class: "bar down", x: labelW + up * scale, width: down * scale, ...bar }));
    svg.append(el("text", { class: "axis", x: labelW + (up + down) * scale + 6, y: middle + 4 },
      format(up + down)));
  });
}
