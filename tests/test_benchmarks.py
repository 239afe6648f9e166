"""The benchmark scripts run and print well-formed JSON lines (no timing asserts)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _kernel_resources():
  """benchmarks/kernel_resources.py as a module (benchmarks/ is a script folder, not a package)."""
  if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
  import kernel_resources
  return kernel_resources


def test_ttt_op_benchmark_smoke(tmp_path):
  out = tmp_path / "r.jsonl"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "ttt_op.py"), "--num_mini_batches=2",
       "--head_dim=16", "--mini_batch=8", "--repeats=1", "--matmul_size=64", f"--out={out}"],
      capture_output=True, text=True, check=True, timeout=600)
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert rows == [json.loads(line) for line in out.read_text().splitlines()]
  # 2 kinds x 2 dtypes x 1 N x 2 modes x 2 forms
  assert len(rows) == 16
  for r in rows:
    assert {"device_kind", "jax", "dtype", "median_ms", "gflops_per_s",
            "pct_of_matmul_rate"} <= set(r)
    assert r["median_ms"] > 0 and r["flops"] > 0
    assert r["rel_err_dual_vs_per_token"] < (1e-5 if r["dtype"] == "float32" else 1e-2)
  assert sum("speedup_vs_per_token" in r for r in rows) == 8


def test_dit_step_benchmark_smoke(tmp_path):
  out = tmp_path / "r.jsonl"
  subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "dit_step.py"), "--seconds=3,9",
       "--variants=ttt_linear,local_attention", "--modes=fwd", "--repeats=1",
       "--matmul_size=64", f"--out={out}"],
      capture_output=True, text=True, check=True, timeout=600)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["seconds"], r["variant"]) for r in rows] == [
      (3, "local_attention"), (3, "ttt_linear"), (9, "local_attention"), (9, "ttt_linear")]
  for r in rows:
    assert r["median_ms"] > 0 and r["flops"] > 0 and r["tokens"] in (96, 288)
  assert rows[1]["x_local_attention"] > 0 and rows[3]["x_shortest"] > 0


def test_ttt_kernels_benchmark_smoke(tmp_path):
  out = tmp_path / "r.jsonl"
  subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "ttt_kernels.py"), "--seconds=3", "--heads=1",
       "--num_mini_batches=3", "--dtypes=float32", "--repeats=1", "--matmul_size=64",
       "--checkpoint_group=2,1", f"--out={out}"],
      capture_output=True, text=True, check=True, timeout=600)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  # A second checkpoint group: pallas rows only, timed against the first group's xla.
  assert [(r["mode"], r["impl"], r["checkpoint_group"]) for r in rows] == [
      (m, impl, g) for m in ("fwd", "fwd_bwd")
      for impl, g in (("xla", 2), ("pallas", 2), ("pallas", 1))]
  assert all(r["median_ms"] > 0 and r["tokens"] == 192 for r in rows)
  assert all(r["speedup_vs_xla"] > 0 for r in rows if r["impl"] != "xla")
  assert "speedup_vs_xla" not in rows[0]
  assert rows[1]["kernel_backend"] == "tpu (interpret)" and rows[0]["kernel_backend"] is None
  # The summary reads it back: a table row per measurement and a plot.
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), str(out),
       f"--svg={tmp_path / 's.svg'}"], capture_output=True, text=True, check=True, timeout=120)
  table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
  assert len(table) == 2 + len(rows) and "(interpret)" in table[2]  # header, rule, rows
  assert (tmp_path / "s.svg").read_text().count("<polyline") == 6  # mode x impl


def test_summarize_model_check(tmp_path):
  """--model: a measured cluster forward against kernel_resources' estimates of the same kernel
  on the same split, in clocks a mini-batch per wave (48 heads on 4 CTAs: 192 CTAs, two waves
  of 132); rows without a matching estimate, XLA's and interpreted ones are left out."""
  gpu = dict(bench="ttt_kernels", device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
             seconds=63, tokens=64000, batch=1, heads=48, num_mini_batches=1000, mode="fwd",
             dtype="bfloat16", checkpoint_group=16, tflops_per_s=1.0, pct_of_matmul_rate=1.0)
  rows = [dict(gpu, impl="xla", gpu_cluster=None, median_ms=50.0),
          dict(gpu, impl="pallas-cluster4", gpu_cluster=4, median_ms=12.0),
          dict(gpu, impl="pallas-cluster8", gpu_cluster=8, median_ms=9.0),  # no estimate
          dict(gpu, impl="pallas-cluster4", gpu_cluster=4, median_ms=1.0, platform="cpu")]
  rows.append(dict(rows[1], mode="fwd_bwd", median_ms=60.0))
  rows.append(dict(rows[1], mode="fwd_bwd", median_ms=30.0, checkpoint_group=1))
  rows.append(dict(rows[1], impl="pallas-cluster4-wg2", gpu_warpgroups=2, median_ms=10.0))
  model = dict(bench="kernel_resources", cluster=4, loop_clocks=2400, loop_issue_clocks=4000,
               loop_latency_clocks=6000)
  models = [dict(model, kernel="cluster_forward"), dict(model, kernel="cluster_forward_g1"),
            dict(model, kernel="cluster_forward", warpgroups=2, loop_latency_clocks=5000),
            dict(model, kernel="cluster_recompute", loop_latency_clocks=5000),
            dict(model, kernel="cluster_backward", loop_latency_clocks=16000,
                 prologue_latency_clocks=32000)]
  files = [tmp_path / "t.jsonl", tmp_path / "m.jsonl"]
  files[0].write_text("".join(json.dumps(r) + "\n" for r in rows))
  files[1].write_text("".join(json.dumps(m) + "\n" for m in models))
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), str(files[0]),
       f"--model={files[1]}", "--clock_mhz=2000"], capture_output=True, text=True, check=True,
      timeout=120)
  tail = result.stdout.split("clocks a mini-batch:")[1]
  checks = [line for line in tail.splitlines() if line.startswith("| ")][2:]
  # 12 ms at 2 GHz over 1000 mini-batches and 2 waves: 12,000 clocks, twice the estimate.
  # Forward + backward at g = 16: forward, recompute and 15 of 16 backward steps a loop's,
  # one the prologue's: 6,000 + 5,000 + 15 / 16 x 16,000 + 32,000 / 16 = 28,000 on (c); at
  # g = 1 the stored-states forward and 999 / 1000 x 16,000 + 32 = 22,016. The forward on two
  # warpgroups against its own estimate.
  assert checks == [
      "| NVIDIA H100 80GB HBM3 | 63 | 48 | 16 | 4 | 1 | fwd | 2 | 12000 | 2400 | 4000 | 6000 "
      "| 2.0 |",
      "| NVIDIA H100 80GB HBM3 | 63 | 48 | 16 | 4 | 1 | fwd_bwd | 2 | 60000 | 7200 | 12000 "
      "| 28000 | 2.14 |",
      "| NVIDIA H100 80GB HBM3 | 63 | 48 | 1 | 4 | 1 | fwd_bwd | 2 | 30000 | 4800 | 8000 "
      "| 22016 | 1.36 |",
      "| NVIDIA H100 80GB HBM3 | 63 | 48 | 16 | 4 | 2 | fwd | 2 | 10000 | 2400 | 4000 | 5000 "
      "| 2.0 |"]


def test_ttt_kernels_benchmark_gpu_cluster_variants(tmp_path):
  """--gpu_cluster: one pallas row per split (here the Mosaic GPU cluster forward on 4 and on
  8 CTAs a head and the Triton forward, interpreted on CPU), each timed against the same xla
  row; the rows say which split ran. --gpu_warpgroups=2 adds the forward on two warpgroups a
  CTA where the split takes it (4, not 8 or Triton)."""
  out = tmp_path / "r.jsonl"
  subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "ttt_kernels.py"), "--seconds=3", "--heads=1",
       "--num_mini_batches=2", "--dtypes=bfloat16", "--modes=fwd", "--repeats=1",
       "--matmul_size=64", "--backend=gpu", "--gpu_cluster=4,8,0", "--gpu_warpgroups=2",
       f"--out={out}"], capture_output=True, text=True, check=True, timeout=600)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["impl"], r["gpu_cluster"], r["gpu_warpgroups"]) for r in rows] == [
      ("xla", None, None), ("pallas-cluster4", 4, 1), ("pallas-cluster4-wg2", 4, 2),
      ("pallas-cluster8", 8, 1), ("pallas-triton", 0, 1)]
  assert rows[1]["kernel_backend"] == "gpu (interpret)" and rows[2]["speedup_vs_xla"] > 0


def test_ttt_kernels_benchmark_tpu_steps_variants(tmp_path):
  """--tpu_mini_batches_per_step: one pallas row per value (TPU kernels, interpreted on CPU)."""
  out = tmp_path / "r.jsonl"
  subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "ttt_kernels.py"), "--seconds=3", "--heads=1",
       "--num_mini_batches=3", "--dtypes=float32", "--modes=fwd", "--repeats=1",
       "--matmul_size=64", "--checkpoint_group=2", "--tpu_mini_batches_per_step=2,1",
       f"--out={out}"], capture_output=True, text=True, check=True, timeout=600)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["impl"], r["mini_batches_per_step"]) for r in rows] == [
      ("xla", None), ("pallas-k2", 2), ("pallas-k1", 1)]
  assert rows[1]["kernel_backend"] == "tpu (interpret)" and rows[2]["speedup_vs_xla"] > 0


def test_kernel_resources_parses_mosaic_and_ptxas_dumps():
  kernel_resources = _kernel_resources()
  text = ("Resources(smem_scratch_bytes=224256, tmem_scratch_cols=0, ...)\n"
          "ptxas warning : Registers are spilled to local memory in function 'k', 6396 bytes "
          "spill stores, 7444 bytes spill loads\n"
          "ptxas         .     3880 bytes stack frame, 6396 bytes spill stores, 7444 bytes spill "
          "loads\nptxas info    : Used 255 registers, used 2 barriers, 17 bytes smem\n")
  assert kernel_resources.parse_dump(text) == dict(
      smem_bytes=224256, registers=255, stack_frame_bytes=3880, spill_store_bytes=6396,
      spill_load_bytes=7444)
  assert kernel_resources.parse_dump("no dumps") == {}


def _tpu_schedule():
  """benchmarks/tpu_schedule.py as a module."""
  _kernel_resources()  # (puts benchmarks/ on sys.path)
  import tpu_schedule
  return tpu_schedule


# libtpu's final bundles, abridged: a grid loop holding two mini-batch loops (one per head),
# the second one's branch back placed one loop level out, a forward branch inside the first.
_BUNDLES = """= control target key start
LB: loop body
= control target key end

     0   :  { %s1 = sld [smem:[#allocation0]] }
   0x1 LB: > { %s2 = sadd.s32 1, %s3 } /* Start region 9 :: Start region 4 */
   0x2   : > { %4 = sbr.rel (%p1) target = $region4 }
   0x3 LB: >> { %v5 = vadd.f32 %v1, %v2 } /* Start region 20 :: Start region 21 */
   0x4   : >> { %6 = sbr.rel (%p2) target = $region22 }
   0x5   : >> { %7 = vmatmul.bf16.gmra.mxu0 %v5  ;;  %v8 = vmul.f32 %v5, %v5 }
   0x6   : >> { %9 = sbr.rel (!%p3) target = $region20 }
   0x7 LB: >> { %v10 = vadd.f32 %v1, %v2 } /* Start region 30 */
   0x8   : >> { %v11 = vpop.f32.mrf.mxu0 }
   0x9   :  {}
   0xa   : > { %12 = sbr.rel (!%p4) target = $region30 }
   0xb   : > { %13 = sbr.rel (!%p5) target = $region9 }
   0xc   :  { %14 = shalt }
"""
_UTILIZATION = """== CAPACTIY:
MXU, XLU, VALU, VPOP
    4     3     4     2
== UTILIZATION:
""" + "\n".join(["0 0 0 0", "0 0 0 0", "0 0 0 0", "0 0 1 0", "0 0 0 0", "1 0 1 0", "0 0 0 0",
                 "0 0 1 0", "0 0 0 1", "0 0 0 0", "0 0 0 0", "0 0 0 0", "0 0 0 0"]) + "\n"


def test_tpu_schedule_reads_libtpu_bundles():
  """Loops run from their first bundle to the branch back to their region (wherever libtpu
  puts it); the grid step's bundles outside them are shared out per mini-batch."""
  ts = _tpu_schedule()
  bundles = ts.parse_bundles(_BUNDLES)
  assert len(bundles) == 13 and bundles[1] == (1, "9", None) and bundles[6] == (6, None, "20")
  assert ts.loops(bundles) == [
      dict(start=1, end=11, bundles=11, innermost=False),
      dict(start=3, end=6, bundles=4, innermost=True),
      dict(start=7, end=10, bundles=4, innermost=True)]
  assert ts.unit_use(_UTILIZATION, [(3, 6), (7, 10)]) == dict(mxu=0.125, xlu=0.0, valu=0.375,
                                                              vpop=0.125)
  row = dict(device_kind="TPU v5", heads_per_step=2, mini_batches_per_step=1,
             flops_per_mini_batch=131072 * 10)
  fields = ts.summarize("forward", _BUNDLES, _UTILIZATION, row)
  # 11 - 8 bundles of the grid step outside the loops, shared by 1 x 2 mini-batches.
  assert fields["step_bundles"] == 4 and fields["step_overhead_bundles"] == 3
  assert fields["bundles_per_mini_batch"] == 5.5 and fields["pct_of_mxu_peak"] == 181.82
  assert fields["clock_ghz"] == 1.751  # 459 TFLOP/s over 2 TensorCores of 4 MXUs 128 x 128
  with pytest.raises(SystemExit, match="expected 4 mini-batch loop"):
    ts.summarize("backward", _BUNDLES, _UTILIZATION, dict(row, checkpoint_group=2))
  # interleave_heads: one forward loop runs both heads (each counts half of its bundles)
  with pytest.raises(SystemExit, match="expected 1 mini-batch loop"):
    ts.summarize("forward", _BUNDLES, _UTILIZATION, dict(row, interleave_heads=True))
  one_loop = _BUNDLES.replace("0x7 LB:", "0x7   :")  # the second loop's body now runs once
  fields = ts.summarize("forward", one_loop, _UTILIZATION, dict(row, interleave_heads=True))
  assert fields["step_bundles"] == 2 and fields["step_overhead_bundles"] == 7


def test_tpu_schedule_compiles_with_libtpu(tmp_path):
  """Both TPU kernels compile for a compile-only v5p (libtpu, no TPU; not installed by
  .[test]) and their mini-batch loops stay within the bundles measured (jax 0.12.0.1, libtpu
  0.0.50.1, 12 heads, bf16 inputs: 589 forward (two heads in one loop), 410.5 + 1,340
  backward; f32 inputs: 624 and 477 + 2,146.5, under jax.default_matmul_precision("highest")
  1,795.5 and 1,391 + 5,813)."""
  pytest.importorskip("libtpu")
  out = tmp_path / "r.jsonl"
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tpu_schedule.py"),
                  "--topologies=v5p-2", "--heads=4", "--num_mini_batches=32", f"--out={out}"],
                 capture_output=True, text=True, check=True, timeout=900)
  forward, backward = [json.loads(line) for line in out.read_text().splitlines()]
  assert forward["kernel"] == "forward" and forward["device_kind"] == "TPU v5"
  assert 500 < forward["step_bundles"] < 700 and 300 < backward["recompute_bundles"] < 480
  assert 1000 < backward["reverse_bundles"] < 1500
  assert 0 < forward["unit_ops_per_bundle"]["mxu"] <= 4
  assert forward["pct_of_mxu_peak"] > 20 and backward["pct_of_mxu_peak"] > 15
  # f32 inputs: f32 operands, one pass at the default precision, six under "highest".
  for precision in ("default", "highest"):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tpu_schedule.py"),
                    "--topologies=v5p-2", "--heads=4", "--num_mini_batches=32",
                    "--dtype=float32", f"--precision={precision}", "--kernels=forward",
                    f"--out={out}"], capture_output=True, text=True, check=True, timeout=900)
  f32, highest = [json.loads(line) for line in out.read_text().splitlines()[2:]]
  assert (f32["dtype"], highest["precision"]) == ("float32", "highest")
  assert forward["step_bundles"] < f32["step_bundles"] < 1000 < 2 * f32["step_bundles"] < (
      highest["step_bundles"])


def test_kernel_resources_compiles_for_h100(tmp_path):
  """The cluster kernels compile for a compile-only H100 and report their resources (needs
  jax's CUDA plugin, which .[test] does not install)."""
  kernel_resources = _kernel_resources()
  from ttt_jax import aot
  try:
    aot.get_topology("h100-1")
  except aot.TopologyError as e:
    pytest.skip(f"needs jax's CUDA plugin: {e}")
  out = tmp_path / "r.jsonl"
  # g = 3: the backward runs its first step apart, then a loop of 2 (a loop of 1 is no loop).
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--heads=2",
       "--num_mini_batches=4", "--checkpoint_group=3", f"--out={out}"],
      capture_output=True, text=True, check=True, timeout=900)
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  kernels = ["cluster_forward", "cluster_recompute", "cluster_backward", "cluster_forward_g1"]
  assert [(r["kernel"], r["cluster"]) for r in rows] == [(k, P) for P in (4, 8) for k in kernels]
  for r in rows:
    assert r["smem_bytes"] <= 227 << 10 and r["registers"] <= 255
    assert r["smem_estimate_bytes"] <= r["smem_bytes"]
    if kernel_resources.find_nvdisasm():  # the loop's SASS: its matmuls (4 HGMMA each)
      # (the recompute leaves the output out; the backward takes W1', W2' from the next state
      # instead of stepping). HGMMA.64xNx16: a [64, 64] x [64, 64] product is 4 of them; on 8
      # CTAs the products over the hidden slice (K = 32: 2 of the forward's 7, 7 of the
      # backward's 21) 2.
      matmuls = dict(cluster_forward=7, cluster_recompute=5, cluster_backward=21,
                     cluster_forward_g1=7)
      p8 = dict(cluster_forward=24, cluster_recompute=18, cluster_backward=70,
                cluster_forward_g1=24)
      hgmma = p8[r["kernel"]] if r["cluster"] == 8 else 4 * matmuls[r["kernel"]]
      assert r["loop_hgmma"] == hgmma
      assert r["loop_instructions"] > r["loop_hgmma"] and 0 < r["tensor_bound_pct"] < 100
      # A mini-batch on the loop's timeline at an instruction a clock (a static count, not a
      # timing) at 12 heads: 2,385, 1,757, 6,277 and 2,447 clocks with jax 0.12.0.1 (on 8 CTAs
      # 1,539, 1,220, 3,930 and 1,669),
      # against 4,607 + stalls, 4,504 + stalls and 12,249 + stalls instructions when every
      # CTA did all [b, d] rows in the dual form.
      limit = dict(cluster_forward=2500, cluster_recompute=1950, cluster_backward=6700,
                   cluster_forward_g1=2650)
      if r["cluster"] == 8:
        limit = dict(cluster_forward=1700, cluster_recompute=1300, cluster_backward=4200,
                     cluster_forward_g1=1800)
      assert r["loop_clocks"] < limit[r["kernel"]]
      # The fuller timeline (ptxas's stall clocks, assumed load and cluster barrier latencies)
      # at 12 heads: 6,355, 5,147, 18,790 and 6,705 clocks (on 8: 5,040, 4,132, 13,708 and
      # 5,041); a peer's rows copied one round trip after another (as before they were all
      # loaded first) cost 3 or 7 round trips more an exchange.
      latency = dict(cluster_forward=6600, cluster_recompute=5400, cluster_backward=19600,
                     cluster_forward_g1=7000)
      if r["cluster"] == 8:
        latency = dict(cluster_forward=5300, cluster_recompute=4350, cluster_backward=14400,
                       cluster_forward_g1=5300)
      assert r["loop_latency_clocks"] < latency[r["kernel"]], r["loop_waits"]
      assert r["loop_instructions"] <= r["loop_issue_clocks"] <= r["loop_latency_clocks"]


def test_kernel_resources_loop_profile():
  """The loop with the most HGMMA is picked (not the prologue's, not a loop without any, not
  the span of a wait's out-of-line retry after EXIT branching back) and its tensor clocks are
  N / 2 per HGMMA.64xNx16."""
  kernel_resources = _kernel_resources()
  sass = """
        /*0000*/                   MOV R1, R2 
.L_x_1:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ 
        /*0020*/              @!P0 BRA `(.L_x_1) 
.L_x_2:
        /*0030*/                   FADD R3, R3, R4 
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ 
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 
        /*0060*/               @P1 FMUL R3, R3, R4 
        /*0068*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 
        /*0070*/                   BRA `(.L_x_2) 
.L_x_3:
        /*0080*/                   FADD R3, R3, R4 
        /*0090*/                   BRA `(.L_x_3) 
        /*00a0*/                   EXIT 
.L_x_4:
        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R5 
        /*00c0*/              @!P1 BRA `(.L_x_4) 
        /*00d0*/                   BRA `(.L_x_1) 
"""
  # The wait is issued at clock 4; the HGMMAs, issued at clocks 1 and 2, are done at 49.
  assert kernel_resources.loop_profile(sass) == dict(
      loop_instructions=6, loop_hgmma=2, loop_tensor_clocks=48, tensor_bound_pct=100.0,
      loop_exposed_tensor_clocks=45, loop_clocks=51, serial_bound_pct=round(100 * 48 / 51, 1),
      # (no control codes: a clock an instruction, no scoreboards)
      loop_issue_clocks=51, loop_latency_clocks=51, latency_bound_pct=round(100 * 48 / 51, 1),
      loop_waits=dict(HGMMA=45), prologue_latency_clocks=3)  # (the 3 lines before .L_x_2)
  assert kernel_resources.loop_profile("no sass") == {}
  # Two groups: waiting for all but the last stalls until the first is done (clock 32), the
  # final wait until the second is (64).
  body = [("HGMMA.64x64x16.F32.BF16", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0"),
          ("HGMMA.64x64x16.F32.BF16", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR8], RZ, gsb0"),
          ("WARPGROUP.DEPBAR.LE", "WARPGROUP.DEPBAR.LE gsb0, 0x1"), ("FADD", "FADD R3, R3, R4"),
          ("WARPGROUP.DEPBAR.LE", "WARPGROUP.DEPBAR.LE gsb0, 0x0")]
  assert kernel_resources._timeline(body) == (65, {"HGMMA": (32 - 2) + (64 - 34)})
  # Two warps (a CTA's two warpgroups) on one scheduler share the tensor cores: the second's
  # HGMMAs, issued at clocks 3 and 4 (the first warp's took 0 to 2), queue behind the first's
  # (done at 32, 64), so its waits end at 96 and 128; the first warp's are as alone.
  clocks, waited = kernel_resources._timeline(body, warps=2)
  assert clocks == 128 + 1 and waited == {"HGMMA": (32 - 2) + (64 - 34)}


def test_kernel_resources_two_warps_meet_at_cluster_barriers():
  """With warps=2 a cluster barrier waits for both warps: the later arrival plus the barrier's
  clocks, for each; in between they take turns at the one issue slot a clock."""
  kr = _kernel_resources()
  line = lambda ctrl, text: (text.split()[0], f"   {ctrl}        /*0010*/     {text} ")
  body = [line("-:-:-:Y:04", "FADD R3, R3, R4"), line("-:-:-:Y:01", "UCGABAR_WAIT"),
          line("-:-:-:Y:01", "MOV R26, R31")]
  barrier = kr.CLUSTER_BARRIER_CLOCKS
  assert kr._timeline(body, issue=True, latency=True) == (
      4 + barrier + 2, {"stall counts": 3, "cluster barrier": barrier})
  # FADDs at 0 and 1; the barrier's waits issued at 4 and 5, released at 5 + barrier; the
  # MOVs then take the slot in turn.
  assert kr._timeline(body, issue=True, latency=True, warps=2) == (
      5 + barrier + 3, {"stall counts": 3, "cluster barrier": barrier + 1})


def test_kernel_resources_split_cluster_barrier():
  """A barrier arrived at (UCGABAR_ARV) before its wait: the round trip counts from the
  arrival, so the instructions in between overlap it; with two warps, from the later arrival."""
  kr = _kernel_resources()
  line = lambda ctrl, text: (text.split()[0], f"   {ctrl}        /*0010*/     {text} ")
  body = [line("-:-:-:Y:02", "UCGABAR_ARV"), *[line("-:-:-:Y:01", "FADD R3, R3, R4")] * 10,
          line("-:-:-:Y:01", "UCGABAR_WAIT"), line("-:-:-:Y:01", "MOV R26, R31")]
  barrier = kr.CLUSTER_BARRIER_CLOCKS
  # Arrival at 0, the FADDs at 2 .. 11, the wait issued at 12 until the release at `barrier`.
  assert kr._timeline(body, issue=True, latency=True) == (
      barrier + 2, {"stall counts": 1, "cluster barrier": barrier - 12})
  # With the wait right after the arrival the 10 FADDs come after the barrier instead.
  moved = [body[0], body[11], *body[1:11], body[12]]
  assert kr._timeline(moved, issue=True, latency=True)[0] == 2 + barrier - 2 + 1 + 11
  # Two warps: arrivals at 0 and 1, released at 1 + barrier; the first warp's wait issued at
  # 12 as alone, the MOVs after the release in turn.
  clocks, waited = kr._timeline(body, issue=True, latency=True, warps=2)
  assert clocks == 1 + barrier + 3 and waited["cluster barrier"] == 1 + barrier - 12


def test_kernel_resources_latency_timeline():
  """`.sass_ctrl` control codes (wait:read:write:yield:stall): stall clocks, waits on the
  scoreboard a load set (one, `a&b`, a hex mask) after its assumed latency, cluster barriers."""
  kr = _kernel_resources()
  line = lambda ctrl, text: (text.split()[0], f"   {ctrl}        /*0010*/     {text} ")
  body = [line("-:-:2:Y:01", "LD.E.64 R26, [R26]"),  # a peer's shared memory: SB 2
          line("-:-:-:Y:04", "FADD R3, R3, R4"),  # 4 clocks to the next issue
          line("-:-:3:Y:01", "SHFL.BFLY PT, R5, R3, 0x1, 0x1f"),  # SB 3
          line("2&3:1:-:Y:01", "STS.64 [R231], R26"),  # waits on both, reads through SB 1
          line("-:-:-:Y:01", "UCGABAR_WAIT"),
          line("0x2:-:-:Y:01", "MOV R26, R31")]  # mask 0x2: SB 1, the store's operands
  assert kr._control(body[3][1]) == ({"2", "3"}, "1", None, 1)
  assert kr._control(body[5][1]) == ({"1"}, None, None, 1)
  assert kr._timeline(body) == (6, {})
  assert kr._timeline(body, issue=True) == (9, {"stall counts": 3})
  ld, barrier = kr.LATENCY["LD"], kr.CLUSTER_BARRIER_CLOCKS
  # The store issues when the load is done (clock 200), the barrier waits, and the MOV waits
  # for the store to have read its operands.
  clocks, waited = kr._timeline(body, issue=True, latency=True)
  store = ld  # the LD issued at 0
  mov = max(store + 1 + barrier + 1, store + kr.READ_LATENCY)
  assert clocks == mov + 1
  assert waited == {"stall counts": 3, "LD": ld - 6, "cluster barrier": barrier}


def test_gpu_check_smoke(tmp_path):
  """gpu_check.py's plumbing on CPU (the Triton kernels interpreted, tiny shapes): every
  quantity of both input sets compared, all within tolerance and deterministic on a rerun."""
  out = tmp_path / "r.jsonl"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--paths=triton-d32",
       "--batch=1", "--heads=1", "--num_mini_batches=3", "--checkpoint_group=2", f"--out={out}"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 2 * 11 and all(r["passed"] for r in rows)
  assert all(r["rerun_max_abs_diff"] == 0.0 and 0 < r["rel_err"] < 2e-2 for r in rows)
