// Small hand-written SVG charts. Every chart gets role="img" and an aria-label; the numbers
// behind it are also shown as a table by the caller.
import { h, s } from "./dom.js";
import { num } from "./format.js";

export const PALETTE = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#f59f00", "#0c8599", "#c2255c", "#5c940d"];

/** Ticks for [lo, hi]: about `count` round numbers. */
function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/**
 * Heatmap of per-layer scores per decision: one row per decision, one column per original layer.
 * Scores are scaled within each row (their magnitudes differ between decisions); the chosen layer
 * is outlined and crossed, layers removed by earlier decisions are hatched.
 */
export function layerHeatmap(decisions, nLayers, { label = "Layer scores per decision" } = {}) {
  const cell = Math.max(20, Math.min(44, Math.floor(760 / Math.max(nLayers, 1)))), left = 78, top = 22, rowH = 24;
  const width = left + nLayers * cell + 10;
  const height = top + decisions.length * rowH + 30;
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "chart heatmap", role: "img", "aria-label": label,
    "data-testid": "layer-chart", style: `max-width:${Math.round(Math.max(width, 420) * 1.4)}px`,
  });
  svg.append(s("defs", {}, s("pattern", { id: "hatch", width: 5, height: 5, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
    s("line", { x1: 0, y1: 0, x2: 0, y2: 5, stroke: "var(--removed)", "stroke-width": 1.5, opacity: 0.6 }))));
  for (let layer = 0; layer < nLayers; layer += 1) {
    if (nLayers <= 32 || layer % 2 === 0) {
      svg.append(s("text", { x: left + layer * cell + cell / 2, y: top - 7, "text-anchor": "middle" }, layer));
    }
  }
  svg.append(s("text", { x: left + (nLayers * cell) / 2, y: height - 6, "text-anchor": "middle" }, "layer (original index)"));
  const gone = new Set();
  decisions.forEach((d, row) => {
    const y = top + row * rowH;
    svg.append(s("text", { x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end" }, `decision ${d.step + 1}`));
    const values = Object.values(d.scores).filter(Number.isFinite);
    const lo = Math.min(...values), hi = Math.max(...values);
    for (let layer = 0; layer < nLayers; layer += 1) {
      const x = left + layer * cell;
      const score = d.scores[String(layer)];
      let fill, title;
      if (gone.has(layer)) {
        fill = "url(#hatch)";
        title = `decision ${d.step + 1}, layer ${layer}: already removed`;
      } else if (score === undefined) {
        fill = "transparent";
        title = `decision ${d.step + 1}, layer ${layer}: not a candidate (protected)`;
      } else {
        const t = hi > lo ? (score - lo) / (hi - lo) : 0.5;
        fill = `rgb(${heatColor(t)})`;
        title = `decision ${d.step + 1}, layer ${layer}: score ${num(score, 4)}${layer === d.chosen ? " (removed here)" : ""}`;
      }
      const g = s("g", {}, s("title", {}, title),
        s("rect", { x: x + 1, y: y + 1, width: cell - 2, height: rowH - 2, rx: 2, fill, class: "cell" }));
      if (layer === d.chosen) {
        g.append(s("rect", { x: x + 1, y: y + 1, width: cell - 2, height: rowH - 2, rx: 2, fill: "none", stroke: "var(--removed)", "stroke-width": 2.5, class: "chosen" }));
        g.append(s("text", { x: x + cell / 2, y: y + rowH / 2 + 4, "text-anchor": "middle", class: "chosen-mark", style: "fill:var(--removed);font-weight:700;font-size:13px" }, "×"));
      }
      svg.append(g);
    }
    gone.add(d.chosen);
  });
  return svg;
}

function heatColor(t) {
  const css = getComputedStyle(document.documentElement);
  const lo = css.getPropertyValue("--heat-lo").split(",").map(Number);
  const hi = css.getPropertyValue("--heat-hi").split(",").map(Number);
  return lo.map((v, i) => Math.round(v + (hi[i] - v) * t)).join(",");
}

/**
 * Line chart of several series: [{name, color?, points: [{x, y, label?}]}].
 * Points are drawn as markers with a <title>; `xFormat`/`yFormat` format the ticks.
 */
export function lineChart(series, { xLabel = "", yLabel = "", label = "chart", xFormat = num, yFormat = num, testid } = {}) {
  const width = 640, height = 300, left = 62, right = 16, top = 14, bottom = 44;
  const all = series.flatMap((ser) => ser.points).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": label, "data-testid": testid });
  if (!all.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p.x)), Math.max(...all.map((p) => p.x))];
  let [y0, y1] = [Math.min(...all.map((p) => p.y)), Math.max(...all.map((p) => p.y))];
  if (x0 === x1) { x0 -= 0.05; x1 += 0.05; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const X = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - right);
  const Y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);
  for (const t of ticks(y0, y1)) {
    svg.append(s("line", { x1: left, x2: width - right, y1: Y(t), y2: Y(t), class: "grid-line" }));
    svg.append(s("text", { x: left - 6, y: Y(t) + 4, "text-anchor": "end" }, yFormat(t)));
  }
  for (const t of ticks(x0, x1, 6)) {
    svg.append(s("text", { x: X(t), y: height - bottom + 16, "text-anchor": "middle" }, xFormat(t)));
  }
  svg.append(s("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  svg.append(s("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
  svg.append(s("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  svg.append(s("text", { x: 14, y: (top + height - bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(top + height - bottom) / 2})` }, yLabel));
  series.forEach((ser, i) => {
    const color = ser.color || PALETTE[i % PALETTE.length];
    const pts = ser.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x);
    if (pts.length > 1) {
      svg.append(s("polyline", { points: pts.map((p) => `${X(p.x)},${Y(p.y)}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    }
    for (const p of pts) {
      svg.append(s("g", {}, s("title", {}, p.label || `${ser.name}: ${xFormat(p.x)}, ${yFormat(p.y)}`),
        s("circle", { cx: X(p.x), cy: Y(p.y), r: 4.5, fill: color, stroke: "var(--panel)", "stroke-width": 1.5 })));
    }
  });
  return svg;
}

export function legend(items) {
  return h("div", { class: "legend" }, items.map(({ name, color, pattern }) =>
    h("span", {}, h("span", { class: "swatch", style: pattern || `background:${color}` }), name)));
}
