"""CogVideoX + TTT: model size presets x video durations x sequence-layer variant.

Usage (ml-collections config file with an argument, big_vision style):

  --config=configs/default.py                          # tiny, 3 s, ttt_mlp
  --config=configs/default.py:preset=5b,seconds=63     # the paper's 63 s stage
  --config=configs/default.py:preset=debug,variant=ttt_linear
  --config.model.ttt.checkpoint_group=4                # override one field

Variants: `ttt_mlp` (the paper's model), `ttt_linear`, `local_attention` (no TTT branch) and
`full_attention` (attention over the whole sequence, no TTT).

Presets: `tiny` runs on a CPU in seconds (tests, the README job); `debug` is upstream's debug
model (512 wide, 8 heads, 6 layers) at the real 480x720 latent size; `5b` is CogVideoX-5B.
Durations 3/9/18/30/63 s set the latent frames, segments and text length (spec 1.3); they are
an argument, never a separate file.
"""

import ml_collections

from ttt_jax import config as config_lib

PRESETS = {
    # name: model_dim, num_heads, num_layers, text_dim, time_embed_dim, latent (h, w)
    "tiny": dict(model_dim=64, num_heads=4, num_layers=2, text_dim=32, time_embed_dim=32,
                 latent_height=4, latent_width=6),
    "debug": dict(model_dim=512, num_heads=8, num_layers=6, text_dim=512, time_embed_dim=512,
                  latent_height=60, latent_width=90),
    "5b": dict(model_dim=3072, num_heads=48, num_layers=42, text_dim=4096, time_embed_dim=512,
               latent_height=60, latent_width=90),
}

# Per TTT kind, as upstream's training configs (spec 1.4). The attention-only variants keep the
# TTT-MLP values so every variant sees the same sequence (text length) for a comparison.
TTT = {
    "ttt_mlp": dict(mini_batch_size=64, base_lr=0.1, checkpoint_group=16),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, checkpoint_group=16),
}


def get_config(arg=None):
  """Returns the config for `arg` = 'preset=...,seconds=...,variant=...'."""
  arg = config_lib.parse_arg(arg, preset="tiny", seconds=3, variant="ttt_mlp")
  if arg.preset not in PRESETS:
    raise config_lib.ConfigError(f"preset={arg.preset!r}: use one of {sorted(PRESETS)}.")
  if arg.variant not in config_lib.VARIANTS:
    raise config_lib.ConfigError(f"variant={arg.variant!r}: use one of {config_lib.VARIANTS}.")
  if arg.seconds not in config_lib.DURATIONS:
    raise config_lib.ConfigError(f"seconds={arg.seconds}: use one of {config_lib.DURATIONS}.")

  config = ml_collections.ConfigDict()
  config.preset = arg.preset
  config.seconds = arg.seconds

  config.model = m = ml_collections.ConfigDict(PRESETS[arg.preset])
  # Latent channels: CogVideoX's VAE gives 16; the tiny presets use the deterministic
  # space-to-depth codec of ttt_jax.data (8x12 RGB frames, 2x2 pixels per latent pixel: 3*2*2).
  # A 2x2 patch then holds 48 values, fewer than model_dim: a wider patch than the model
  # (e.g. 4x4 pixels, 192 values into 64) cannot represent the noise, and samples stay noisy.
  m.in_channels = 16 if arg.preset != "tiny" else 12
  m.patch_size = 2
  m.layer_norm_eps = 1e-6
  m.attn_length = 12  # latent frames per 3 s segment
  m.prefix_temporal_length = 1
  m.rope_theta = 10000.0
  m.variant = arg.variant
  m.attention_backend = "xla"  # "cudnn" on GPU, "pallas_tpu" (splash attention) on TPU
  m.remat_policy = "none" if arg.preset == "tiny" else "full"  # see config.REMAT_POLICIES
  m.scan_layers = True  # lax.scan over stacked layers; False unrolls them (debugging)
  m.dtype = "float32"  # compute dtype; "bfloat16" as upstream trains. Parameters stay float32.

  m.ttt = t = ml_collections.ConfigDict(TTT.get(arg.variant, TTT["ttt_mlp"]))
  t.inner_eps = 1e-6  # the kernels' value, what the released model was trained with
  t.rope_theta = 10000.0
  t.eta_layout = "kernel"  # "kernel": upstream's step-size quirk (spec 3.5); "aligned"
  t.gating_alpha_init = 0.1
  t.impl = "xla"  # TTT scan: "xla", "pallas" (pallas_kernels) or "auto" (Pallas where built)
  if arg.preset == "tiny":
    t.mini_batch_size = 16

  # Device mesh (data, fsdp, tensor); one -1 takes the remaining devices. Logical axis names
  # used by the model -> mesh axes (ttt_jax.sharding).
  config.sharding = ml_collections.ConfigDict()
  config.sharding.mesh_shape = (-1, 1, 1)
  config.sharding.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                           ("mlp", "tensor"), ("length", "tensor"), ("layers", None))

  # Training data (ttt_jax.data): a dataset folder per duration, `<root>/<seconds>s`, holding
  # tensorstore latents + text embeddings and an index.jsonl. The tiny presets generate theirs
  # (multi-scene sprite storyboards) when it is missing; real data is precomputed (spec 6.7).
  config.data = d = ml_collections.ConfigDict()
  d.root = "data/storyboard"
  d.generate = arg.preset == "tiny"  # build the generated dataset if the folder is missing
  d.num_clips = 256  # clips the generator writes per duration
  d.seed = 0  # generator seed
  d.shuffle_seed = 0  # one fixed permutation per epoch, derived from this seed
  d.num_threads = 2  # grain read threads
  d.prefetch = 4  # batches prefetched
  d.text_dropout = 0.1  # per-sample probability of zeroing all text (CFG training, spec 5)

  # Training (ttt_jax.train), upstream's stage recipe (spec 6.1-6.4).
  config.train = tr = ml_collections.ConfigDict()
  stage = {3: dict(adapter="sft", steps=5000, warmup=100, lr_ttt=1e-4, ckpt=500),
           9: dict(adapter="qkvo", steps=5000, warmup=100, lr_ttt=1e-5, ckpt=500),
           18: dict(adapter="qkvo", steps=1000, warmup=50, lr_ttt=1e-5, ckpt=500),
           30: dict(adapter="qkvo", steps=1000, warmup=50, lr_ttt=1e-5, ckpt=25),
           63: dict(adapter="qkvo", steps=250, warmup=25, lr_ttt=1e-5, ckpt=25)}[arg.seconds]
  tr.adapter = stage["adapter"]  # trainable parameters: "sft" (all), "qkvo", "none" (spec 6.2)
  tr.steps = stage["steps"]
  tr.warmup_steps = stage["warmup"]
  tr.batch_size = 64  # global batch, split over the mesh's batch axes and the hosts
  tr.grad_accum = 1  # micro-batches per optimizer step (a scan inside the jitted step)
  tr.lr = 1e-5  # peak, non-TTT parameters; "linear" decay to lr_end
  tr.lr_end = 1e-5
  tr.lr_schedule = "linear"
  tr.lr_ttt = stage["lr_ttt"]  # peak, TTT parameters (names with ttt/ssm); "cosine" to lr_end
  tr.lr_ttt_schedule = "cosine"
  tr.weight_decay = 1e-4  # not on biases and norms (spec 6.3)
  tr.b1, tr.b2, tr.eps = 0.9, 0.95, 1e-8
  tr.grad_clip = 0.1  # global L2 norm over the trainable parameters
  tr.timesteps = "stratified"  # "stratified" over the global batch (spec 6.4) or "uniform"
  tr.seed = 0
  tr.init_from = ""  # checkpoint to start from: a previous stage's workdir or an import
  tr.checkpoint_every = stage["ckpt"]
  tr.keep_checkpoints = 2
  tr.log_every = 10
  tr.profile_steps = ""  # e.g. "5:8": a jax.profiler trace of steps 5..7 into the workdir
  if arg.preset == "tiny":  # from scratch on the generated data, minutes on a CPU
    tr.update(adapter="sft", steps=300, warmup_steps=20, batch_size=8, lr=1e-3, lr_end=1e-4,
              lr_ttt=1e-3, checkpoint_every=100, log_every=10)

  config.sequence = s = ml_collections.ConfigDict()
  s.num_frames = config_lib.latent_frames(arg.seconds)
  s.num_chunks = s.num_frames // m.attn_length
  if m.latent_height == 60 and m.latent_width == 90:
    s.text_length = config_lib.UPSTREAM_TEXT_LENGTH[arg.seconds]
  else:
    video_tokens = s.num_frames * (m.latent_height // m.patch_size) * (
        m.latent_width // m.patch_size)
    s.text_length = config_lib.text_length_for(s.num_chunks, video_tokens, t.mini_batch_size,
                                               min_length=8)
  return config
