"""Training metrics: JSON lines, TensorBoard event files and an SVG loss plot.

`<workdir>/metrics.jsonl` is the machine-readable record (one line per logged step); the
TensorBoard files (tensorboardX, no TensorFlow needed) go to `<workdir>/tb`; `loss.svg` is
redrawn from the JSON lines at the end of a run. Only process 0 writes.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np


class MetricWriter:
  """write(step, {name: float}) to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / "tb"))
      self._file = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a killed run keeps every line it logged
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """The records of metrics.jsonl; for steps logged twice (a resumed run) the last wins."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  by_step = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def moving_average(values, window: int) -> np.ndarray:
  """Trailing mean over up to `window` values (shorter at the start)."""
  values = np.asarray(values, np.float64)
  cumsum = np.concatenate([[0.0], np.cumsum(values)])
  starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
  return (cumsum[1:] - cumsum[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_loss_svg(records: list[dict], path, *, key: str = "loss", window: int = 10,
                  title: str = "training loss") -> pathlib.Path:
  """Writes an SVG line plot of `key` over steps (raw and its moving average)."""
  steps = np.array([r["step"] for r in records], np.float64)
  values = np.array([r[key] for r in records], np.float64)
  smooth = moving_average(values, window)
  W, H, pad = 640, 360, 50
  x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
  y0, y1 = 0.0, max(values.max(), 1e-12) * 1.05
  sx = lambda s: pad + (s - x0) / (x1 - x0) * (W - 2 * pad)
  sy = lambda v: H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad)
  line = lambda ys, colour, width: (
      f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="' +
      " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in zip(steps, ys)) + '"/>')
  ticks = []
  for v in np.linspace(y0, y1, 5):
    ticks.append(f'<text x="{pad - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" '
                 f'font-size="11">{v:.3g}</text>')
  for s in np.linspace(x0, x1, 5):
    ticks.append(f'<text x="{sx(s):.1f}" y="{H - pad + 16}" text-anchor="middle" '
                 f'font-size="11">{int(round(s))}</text>')
  svg = "\n".join([
      f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
      'font-family="sans-serif">',
      f'<rect width="{W}" height="{H}" fill="white"/>',
      f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
      f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
      f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
      *ticks,
      f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">step</text>',
      line(values, "#9ecae1", 1),
      line(smooth, "#08519c", 2),
      f'<text x="{W - pad}" y="{pad - 8}" text-anchor="end" font-size="11" fill="#08519c">'
      f"{key}, moving average of {window}</text>",
      "</svg>"])
  path = pathlib.Path(path)
  path.write_text(svg, encoding="utf-8")
  return path
