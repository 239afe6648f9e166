"""configs/default.py: presets x durations, derived sizes, command-line overrides, validation."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from configs.default import PRESETS, get_config
from ttt_jax import config as config_lib

CONFIG_FILE = str(pathlib.Path(__file__).parents[1] / "configs" / "default.py")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("seconds", config_lib.DURATIONS)
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_every_preset_validates(preset, seconds, variant):
  config = get_config(f"preset={preset},seconds={seconds},variant={variant}")
  config_lib.validate(config)
  lay = config_lib.sequence_layout(config)
  assert lay.num_frames == 4 * seconds + 1
  assert lay.num_chunks == max(1, seconds // 3)


@pytest.mark.parametrize("seconds, tokens, mini_batches", [
    (3, 18_048, 282), (9, 51_456, 804), (18, 101_376, 1_584), (30, 168_320, 2_630),
    (63, 351_168, 5_487),
])
def test_5b_sequence_sizes_match_spec_table(seconds, tokens, mini_batches):
  lay = config_lib.sequence_layout(get_config(f"preset=5b,seconds={seconds}"))
  assert lay.tokens_per_frame == 1350
  assert lay.total_tokens == tokens
  assert lay.num_mini_batches(64) == mini_batches


def test_ttt_kind_defaults_follow_upstream():
  mlp = get_config("preset=5b").model.ttt
  linear = get_config("preset=5b,variant=ttt_linear").model.ttt
  assert (mlp.mini_batch_size, mlp.base_lr, mlp.inner_eps) == (64, 0.1, 1e-6)
  assert (linear.mini_batch_size, linear.base_lr) == (16, 1.0)


def _parse(*argv):
  argv = ["prog", *argv]
  values = flags.FlagValues()
  # sys_argv: overrides are read from this list, not from the test runner's own sys.argv.
  config_flags.DEFINE_config_file("config", CONFIG_FILE, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides():
  config = _parse(f"--config={CONFIG_FILE}:seconds=9,variant=ttt_linear",
                  "--config.model.ttt.mini_batch_size=32", "--config.model.ttt.eta_layout=aligned")
  assert config.seconds == 9 and config.model.variant == "ttt_linear"
  assert config.model.ttt.mini_batch_size == 32 and config.model.ttt.eta_layout == "aligned"
  config_lib.validate(config)


@pytest.mark.parametrize("override, field", [
    ("--config.model.ttt.mini_batch_size=7", "mini_batch_size"),
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.model.variant=mamba", "model.variant"),
    ("--config.model.attention_backend=flash", "model.attention_backend"),
    ("--config.model.remat_policy=some", "model.remat_policy"),
    ("--config.model.dtype=float16", "model.dtype"),
    ("--config.model.ttt.eta_layout=rows", "model.ttt.eta_layout"),
    ("--config.model.ttt.checkpoint_group=-1", "model.ttt.checkpoint_group"),
    ("--config.seconds=9", "sequence.num_frames"),
    ("--config.sequence.text_length=5", "text_length"),
    ("--config.model.latent_width=7", "model.latent_width"),
])
def test_invalid_values_name_the_field(override, field):
  config = _parse(f"--config={CONFIG_FILE}", override)
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(config)


@pytest.mark.parametrize("arg, message", [
    ("preset=huge", "preset='huge'"),
    ("seconds=10", "seconds=10"),
    ("variant=mamba", "variant='mamba'"),
    ("colour=red", "colour=red"),
    ("seconds=three", "seconds='three'"),
])
def test_bad_config_arguments(arg, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    get_config(arg)
