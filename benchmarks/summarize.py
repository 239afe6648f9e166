"""Summary of `ttt_kernels.py` results across accelerators: a Markdown table and an SVG plot.

Reads JSON-lines files (one per device run, e.g. benchmarks/results/*.jsonl), keeps the
`ttt_kernels` rows and prints one table row per (device, seconds, heads, dtype, mode, impl,
checkpoint group), with the cluster kernels' CTAs per head where they ran: median ms, achieved
TFLOP/s, % of that device's measured matmul rate and the kernel's speed-up over the XLA scan.
`--svg` also draws % of the matmul rate against the sequence length, one line per (device,
heads, mode, impl, group), so kernels on different accelerators compare on one axis.

`--model` (`kernel_resources.py` rows: the static estimates) adds a table that checks them against
the cluster kernels' measured rows: the clocks a mini-batch took, from the median time, the SM
clock (`--clock_mhz`, as `nvidia-smi --query-gpu=clocks.max.sm` gives it: if the clock under load
was lower, the measured clocks are an overestimate) and the waves the grid needs (B x H x P CTAs,
one an SM, in clusters of P: sms // P * P a wave, `--sms`), next to kernel_resources' three
timelines of the same kernel on the same split (`loop_clocks`, `loop_issue_clocks`,
`loop_latency_clocks`) and measured / latency timeline: how far the assumed latencies
(`kernel_resources.LATENCY`) are off. Forward + backward (at checkpoint group g) is estimated as
the forward, the recompute and the backward (its group prologue and first step,
`prologue_latency_clocks`, once a group) a mini-batch; at g = 1 the forward storing every state and
the backward, whose prologue comes once.

  python benchmarks/summarize.py benchmarks/results/*.jsonl --svg=benchmarks/results/summary.svg
  python benchmarks/summarize.py $OUT/ttt_kernels.jsonl --model=$OUT/kernel_resources.jsonl \
      --clock_mhz=1980
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

COLUMNS = ("device", "seconds", "tokens", "heads", "dtype", "mode", "impl", "checkpoint_group",
           "gpu_cluster", "median_ms", "tflops_per_s", "pct_of_matmul_rate", "speedup_vs_xla")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def load(paths) -> list[dict]:
  """The `ttt_kernels` rows of the given JSON-lines files, each tagged with a `device` label
  (device kind, plus "(interpret)" where the kernel was interpreted on a CPU)."""
  rows = []
  for path in paths:
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{n}: not a JSON line ({e}); pass ttt_kernels.py --out files.")
      if row.get("bench") != "ttt_kernels":
        continue
      label = row["device_kind"]
      if row["platform"] == "cpu":
        label += " (interpret)"
      rows.append(dict(row, device=label))
  return rows


def table(rows: list[dict]) -> str:
  key = lambda r: (r["device"], r["seconds"], r.get("heads", 0), r["dtype"], r["mode"],
                   r["impl"] != "xla")
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  for r in sorted(rows, key=key):
    lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in COLUMNS)
                 + " |")
  return "\n".join(lines)


MODEL_COLUMNS = ("device", "seconds", "heads", "checkpoint_group", "gpu_cluster", "gpu_warpgroups",
                 "mode", "waves", "measured_clocks", "loop_clocks", "loop_issue_clocks",
                 "loop_latency_clocks", "measured_over_latency")


def model_check(rows: list[dict], resources: list[dict], clock_mhz: float, sms: int) -> list[dict]:
  """The cluster kernels' measured rows against kernel_resources' estimates of the same kernels
  (see the module docstring) on the same split: clocks a mini-batch, per CTA (each CTA runs its
  chain's mini-batches in order, a wave after another). A row's forward on two warpgroups a CTA
  (`gpu_warpgroups`) takes the estimate of that forward; the backward's kernels have one."""
  model = {(r["kernel"], r["cluster"], r.get("warpgroups") or 1): r for r in resources
           if r.get("bench") == "kernel_resources" and "loop_latency_clocks" in r}
  out = []
  for r in rows:
    P, g, N = r.get("gpu_cluster"), r.get("checkpoint_group") or 1, r["num_mini_batches"]
    if not P or r["impl"] == "xla" or "(interpret)" in r["device"]:
      continue
    W = r.get("gpu_warpgroups") or 1
    model_of = lambda k: model.get((k, P, W if k == "cluster_forward" else 1))
    # (kernel, weight a mini-batch): the backward's loop runs all but the first step of a
    # group (of the whole sequence at g = 1), which its prologue does.
    first = 1 / (N if g == 1 else g)
    if r["mode"] == "fwd":
      parts = [("cluster_forward_g1" if g == 1 else "cluster_forward", 1)]
    elif g == 1:
      parts = [("cluster_forward_g1", 1), ("cluster_backward", 1 - first)]
    else:
      parts = [("cluster_forward", 1), ("cluster_recompute", 1), ("cluster_backward", 1 - first)]
    if any(model_of(k) is None for k, _ in parts):
      continue
    fields = MODEL_COLUMNS[9:12]
    estimate = {c: sum(w * model_of(k)[c] for k, w in parts) for c in fields}
    if r["mode"] == "fwd_bwd":  # the prologue on timeline (c); (a), (b) count a loop step
      m = model_of("cluster_backward")
      for c in fields:
        estimate[c] += first * m.get("prologue_latency_clocks" if c == fields[2] else c, m[c])
    per_wave = sms // P * P
    waves = -(-r["batch"] * r["heads"] * P // per_wave)
    measured = r["median_ms"] * 1e-3 * clock_mhz * 1e6 / (N * waves)
    out.append(dict({c: r.get(c) for c in MODEL_COLUMNS[:7]}, gpu_warpgroups=W, waves=waves,
                    measured_clocks=round(measured),
                    **{c: round(v) for c, v in estimate.items()},
                    measured_over_latency=round(measured / estimate["loop_latency_clocks"], 2)))
  return out


def model_table(checks: list[dict]) -> str:
  lines = ["| " + " | ".join(MODEL_COLUMNS) + " |", "|" + " --- |" * len(MODEL_COLUMNS)]
  lines += ["| " + " | ".join(str(c[k]) for k in MODEL_COLUMNS) + " |" for c in checks]
  return "\n".join(lines)


def svg(rows: list[dict], W: int = 720, H: int = 420, pad: int = 60) -> str:
  """% of the matmul rate (y) against tokens per sequence (x, log2), a polyline per series."""
  import math
  series: dict[tuple, list[tuple[float, float]]] = {}
  for r in rows:
    series.setdefault((r["device"], f"H{r.get('heads')}", r["dtype"], r["mode"], r["impl"],
                       f"g{r.get('checkpoint_group')}"), []).append(
        (math.log2(r["tokens"]), r["pct_of_matmul_rate"]))
  xs = [x for pts in series.values() for x, _ in pts]
  ys = [y for pts in series.values() for _, y in pts]
  x0, x1 = min(xs), max(max(xs), min(xs) + 1)
  y1 = max(max(ys), 1e-9) * 1.1
  sx = lambda x: pad + (x - x0) / (x1 - x0) * (W - 2 * pad - 200)
  sy = lambda y: H - pad - y / y1 * (H - 2 * pad)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         'font-family="sans-serif">', f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">TTT-MLP scan: % of '
         'the measured matmul rate</text>',
         f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad - 200}" y2="{H - pad}" stroke="black"/>',
         f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
         f'<text x="{(W - 200) / 2}" y="{H - 15}" text-anchor="middle" font-size="12">tokens '
         'per sequence (log2)</text>']
  for i in range(5):
    y = y1 * i / 4
    out.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" '
               f'font-size="11">{y:.3g}</text>')
  for x in sorted(set(xs)):
    out.append(f'<text x="{sx(x):.1f}" y="{H - pad + 16}" text-anchor="middle" '
               f'font-size="11">{int(round(2 ** x))}</text>')
  for i, (name, pts) in enumerate(sorted(series.items())):
    colour = PALETTE[i % len(PALETTE)]
    pts = sorted(pts)
    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="' +
               " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts) + '"/>')
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
            for x, y in pts]
    out.append(f'<text x="{W - pad - 190}" y="{pad + 14 * i}" font-size="10" '
               f'fill="{colour}">{" ".join(map(str, name))}</text>')
  return "\n".join(out + ["</svg>"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("files", nargs="+", help="JSON-lines files written by ttt_kernels.py --out")
  p.add_argument("--svg", default=None, help="also write the plot here")
  p.add_argument("--model", nargs="*", default=(),
                 help="kernel_resources.py JSON-lines files: check their estimates")
  p.add_argument("--clock_mhz", type=float, default=1980.0,
                 help="the SM clock the kernels ran at (nvidia-smi clocks.max.sm; H100 SXM: 1980)")
  p.add_argument("--sms", type=int, default=132, help="SMs of the device (H100 PCIe: 114)")
  args = p.parse_args(argv)
  rows = load(args.files)
  if not rows:
    raise SystemExit(f"no ttt_kernels rows in {args.files}.")
  print(table(rows))
  if args.model:
    resources = [json.loads(line) for path in args.model
                 for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    checks = model_check(rows, resources, args.clock_mhz, args.sms)
    print("\nThe static estimates (kernel_resources.py) against the measured cluster kernels, "
          "clocks a mini-batch:\n")
    print(model_table(checks) if checks else "(no cluster kernel row with a matching estimate)")
  if args.svg:
    pathlib.Path(args.svg).write_text(svg(rows))
    print(f"wrote {args.svg}", file=sys.stderr)


if __name__ == "__main__":
  main()
