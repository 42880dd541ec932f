// Line charts on a <canvas>, drawn here so that the page needs no library: a title, axes
// with a few ticks, one line per series and a legend. Each canvas also records what it
// drew (data-points: the points of its first series; data-series: the series' names).
"use strict";

const Charts = (() => {
  const COLORS = ["#2f6fd0", "#d0612f", "#2f9e5a", "#8e44ad", "#b58900"];

  function format(value) {
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs >= 10000 || abs < 0.001) return value.toExponential(1);
    if (abs >= 100) return value.toFixed(0);
    if (abs >= 1) return value.toFixed(2);
    return value.toPrecision(2);
  }

  // series: [{name, points: [[step, value], ...]}]
  function draw(canvas, title, series, emptyText) {
    const ctx = canvas.getContext("2d");
    const width = canvas.width, height = canvas.height;
    const pad = {left: 58, right: 14, top: 28, bottom: 34};
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    ctx.fillStyle = "#1d2430";
    ctx.font = "600 13px system-ui, sans-serif";
    ctx.fillText(title, pad.left, 18);
    const shown = series.filter((s) => s.points.length);
    canvas.dataset.points = shown.length ? String(shown[0].points.length) : "0";
    canvas.dataset.series = shown.map((s) => s.name).join(",");
    if (!shown.length) {
      ctx.fillStyle = "#5f6b7a";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText(emptyText || "no data yet", pad.left, height / 2);
      return;
    }
    const all = shown.flatMap((s) => s.points);
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const sx = (x) => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
    const sy = (y) => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
    ctx.strokeStyle = "#d8dee6";
    ctx.fillStyle = "#5f6b7a";
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = y0 + (y1 - y0) * i / 4;
      ctx.beginPath(); ctx.moveTo(pad.left, sy(y)); ctx.lineTo(width - pad.right, sy(y)); ctx.stroke();
      ctx.fillText(format(y), 4, sy(y) + 4);
      const x = x0 + (x1 - x0) * i / 4;
      ctx.fillText(String(Math.round(x)), sx(x) - 8, height - pad.bottom + 16);
    }
    ctx.fillText("step", width - pad.right - 26, height - 4);
    // the legend at the top right, wide enough for the longest name (eval_rewards/accuracies)
    const legend = Math.max(150, 20 + Math.max(...shown.map((s) => ctx.measureText(s.name).width)));
    shown.forEach((s, index) => {
      const color = COLORS[index % COLORS.length];
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
      ctx.stroke();
      if (s.points.length < 40) s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(sx(x), sy(y), 2.5, 0, 7); ctx.fill(); });
      const lx = width - pad.right - legend, ly = pad.top + 4 + index * 16;
      ctx.fillRect(lx, ly - 5, 14, 3);
      ctx.fillStyle = "#1d2430";
      ctx.fillText(s.name, lx + 20, ly);
    });
  }

  return {draw};
})();
