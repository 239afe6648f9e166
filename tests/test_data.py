"""ttt_jax.data: the storyboard generator, codec, text embedder, dataset format and pipeline."""

import json
import shutil

import numpy as np
import pytest
import tensorstore as ts

from configs.default import get_config
from ttt_jax.data import dataset as dataset_lib
from ttt_jax.data import pipeline as pipeline_lib
from ttt_jax.data import storyboard as sb


def _config(seconds=9, **data):
  config = get_config(f"preset=tiny,seconds={seconds}")
  config.data.update(data)
  return config


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A 12-clip 9 s dataset (path, config), shared by the read-only tests."""
  config = _config(9)
  path = tmp_path_factory.mktemp("data") / "9s"
  sb.generate_dataset(path, config, num_clips=12)
  return path, config


def _arrays(path):
  out = {}
  for name in ("latents", "text"):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    out[name] = ts.open(spec).result().read().result()
  return out


# ----------------------------------------------------------------------------- generator


def test_generation_deterministic(made, tmp_path):
  path, config = made
  sb.generate_dataset(tmp_path / "same", config, num_clips=12)
  sb.generate_dataset(tmp_path / "fewer", config, num_clips=5)
  sb.generate_dataset(tmp_path / "other", config, num_clips=5, seed=1)
  ref, same = _arrays(path), _arrays(tmp_path / "same")
  for name in ref:
    np.testing.assert_array_equal(ref[name], same[name])
  assert (path / "index.jsonl").read_text() == (tmp_path / "same" / "index.jsonl").read_text()
  # Clip i does not depend on how many clips are generated.
  fewer = _arrays(tmp_path / "fewer")
  np.testing.assert_array_equal(ref["latents"][:5], fewer["latents"])
  np.testing.assert_array_equal(ref["text"][:5], fewer["text"])
  other = _arrays(tmp_path / "other")
  assert not np.array_equal(ref["latents"][:5], other["latents"])
  # No temporary folders left behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fewer", "other", "same"]


def test_existing_dataset_not_overwritten(made):
  path, config = made
  with pytest.raises(dataset_lib.DatasetError, match="already exists"):
    sb.generate_dataset(path, config, num_clips=12)


def test_codec_round_trip():
  codec = sb.SpaceToDepthCodec(2, in_channels=12)
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, (49, 8, 12, 3)).astype(np.float32)  # [F, H*f, W*f, 3]
  latents = codec.encode(frames)
  assert latents.shape == (13, 12, 4, 6) and latents.dtype == np.float32
  # Channel order rgb*4 + dy*2 + dx.
  assert latents[1, 1 * 4 + 1 * 2 + 1, 1, 2] == frames[4, 1 * 2 + 1, 2 * 2 + 1, 1]
  decoded = codec.decode(latents)
  assert decoded.shape == frames.shape
  np.testing.assert_array_equal(decoded[::4], frames[::4])
  np.testing.assert_array_equal(decoded[1:5], np.repeat(frames[4:5], 4, axis=0))
  with pytest.raises(ValueError, match="in_channels=16"):
    sb.SpaceToDepthCodec(2, in_channels=16)


def test_storyboard_texts_and_scene_tokens():
  colours, shapes = set(sb.COLOURS), set(sb.SHAPES)
  transitions = 0
  for i in range(30):
    story = sb.make_storyboard(np.random.default_rng([0, i]), 6)
    words = [set(sb.tokenize(s["text"])) for s in story]
    assert words[0] & colours == {story[0]["colour"]}
    assert words[0] & shapes == {story[0]["shape"]}
    for w in words[1:]:
      assert not w & (colours | shapes)
    assert not story[0]["scene_start"] and not story[0]["requires_scene_transition"]
    for k, seg in enumerate(story):
      assert seg["text"].startswith(sb.START_SCENE) == seg["scene_start"]
      assert seg["requires_scene_transition"] == seg["scene_start"]
      nxt = k + 1 < len(story) and story[k + 1]["scene_start"]
      assert seg["scene_end"] == nxt and seg["text"].endswith(sb.END_SCENE) == nxt
      transitions += seg["scene_start"]
      # A new scene changes the background; the text says so.
      if seg["scene_start"]:
        assert seg["background"] != story[k - 1]["background"]
        assert seg["background"] in words[k]
  assert transitions > 10  # scenes of various lengths occur


def test_rendered_sprite_colour_constant(made):
  path, _ = made
  ds = dataset_lib.open_dataset(path)
  codec = sb.SpaceToDepthCodec(2)
  backgrounds = np.array(list(sb.BACKGROUNDS.values()), np.float32)
  for i in range(4):
    entry = ds.entries[i]
    frames = codec.decode(ds[i]["latents"])  # [F, 8, 12, 3]
    pixels = frames.reshape(-1, 3)
    is_bg = (np.abs(pixels[:, None] - backgrounds[None]).max(-1) < 1e-6).any(-1)
    sprite = pixels[~is_bg]
    colour = np.array(sb.COLOURS[entry["sprite"]["colour"]], np.float32)
    np.testing.assert_array_equal(sprite, np.broadcast_to(colour, sprite.shape))
    # The sprite is in view in every frame, always the same number of pixels (same shape).
    counts = (~is_bg).reshape(frames.shape[0], -1).sum(-1)
    assert counts.min() > 0 and counts.min() == counts.max()


def test_text_embedder():
  emb = sb.TextEmbedder(32, seed=0)
  a = emb.embed("A red square moves left.", 10)
  assert a.shape == (10, 32) and a.dtype == np.float32
  np.testing.assert_array_equal(a, sb.TextEmbedder(32, seed=0).embed("a red square moves left", 10))
  assert np.all(a[6:] == 0) and np.all(np.abs(a[:6]).sum(-1) > 0)  # 5 words + </s>, then pads
  b = emb.embed("a square red moves left", 10)
  assert not np.allclose(a, b)  # order matters
  assert sb.tokenize("<start_scene>it bounces<end_scene>") == [
      "<start_scene>", "it", "bounces", "<end_scene>"]
  assert not np.allclose(a, sb.TextEmbedder(32, seed=1).embed("a red square moves left", 10))
  with pytest.raises(ValueError, match="text length L=5"):
    emb.embed("a red square moves left", 5)


def test_generated_texts_fit_every_tiny_duration():
  for seconds in (3, 9, 18, 30, 63):
    config = _config(seconds)
    n, length = config.sequence.num_chunks, config.sequence.text_length
    emb = sb.TextEmbedder(config.model.text_dim)
    for i in range(20):
      for seg in sb.make_storyboard(np.random.default_rng([0, i]), n):
        emb.embed(seg["text"], length)


# ------------------------------------------------------------------------------- dataset


def test_dataset_reads(made):
  path, config = made
  ds = dataset_lib.open_dataset(path, config)
  assert len(ds) == 12
  item = ds[5]
  assert item["latents"].shape == (37, 12, 4, 6) and item["latents"].dtype == np.float32
  assert item["text"].shape == (3, 22, 32) and item["text"].dtype == np.float32
  assert item["row"] == 5
  texts = [s["text"] for s in ds.entries[5]["segments"]]
  expect = np.stack([sb.TextEmbedder(32).embed(t, 22) for t in texts])
  np.testing.assert_array_equal(item["text"], expect)


def test_mean_logvar_sampling(tmp_path):
  config = _config(3)
  meta = dataset_lib.make_meta(seconds=3, num_clips=2, T=13, C=24, H=4, W=6, n=1, L=18,
                               text_dim=32, latent_kind="mean_logvar", latent_dtype="bfloat16")
  moments = np.zeros((2, 13, 24, 4, 6), np.float32)
  moments[:, :, :12] = 1.0  # mean 1
  moments[:, :, 12:] = -100.0  # logvar clipped to -30: std ~3e-7
  moments[1, :, 12:] = 0.0  # std 1
  entries = [dict(clip=f"c{r}", row=r, seconds=3,
                  segments=[dict(text="x", scene_start=False, scene_end=False)]) for r in (0, 1)]
  with dataset_lib.DatasetWriter(tmp_path / "d", meta) as w:
    w.write(0, entries, moments, np.zeros((2, 1, 18, 32)))
  ds = dataset_lib.open_dataset(tmp_path / "d", config)
  np.testing.assert_allclose(ds[0]["latents"], 1.0, atol=1e-5)
  z = ds.read(1, seed=0, epoch=0)["latents"]
  assert z.shape == (13, 12, 4, 6) and 0.8 < z.std() < 1.2
  np.testing.assert_array_equal(z, ds.read(1, seed=0, epoch=0)["latents"])
  assert not np.array_equal(z, ds.read(1, seed=0, epoch=1)["latents"])


def _broken_copy(made, tmp_path):
  path, config = made
  copy = tmp_path / "9s"
  shutil.copytree(path, copy)
  return copy, config


def _rewrite_index(path, edit):
  lines = (path / "index.jsonl").read_text().splitlines()
  entries = [json.loads(line) for line in lines]
  edit(entries, lines)
  (path / "index.jsonl").write_text("\n".join(
      line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


@pytest.mark.parametrize("case,expect", [
    ("empty_text", ["clip_00003", "segments[1].text is empty"]),
    ("row_out_of_range", ["clip_00003", "`row` 40", "refers to nothing"]),
    ("segment_count", ["clip_00003", "`segments` has 2 entries", "n=3"]),
    ("bad_json", ["index.jsonl line 4", "not a valid JSON"]),
    ("missing_field", ["clip_00003", "`row` is missing"]),
    ("duplicate_row", ["clip_00003", "`row` 2 is also used by clip clip_00002"]),
    ("missing_chunk", ["clip_00003", "latents of row 3 is missing"]),
    ("missing_array", ["array `latents` is missing", "latents"]),
    ("wrong_shape", ["array `latents` has shape [12, 37, 12, 4, 5]"]),
    ("config_mismatch", ["model.latent_height", "H=4 but the config needs 8"]),
])
def test_bad_entries(made, tmp_path, case, expect):
  path, config = _broken_copy(made, tmp_path)

  def edit(entries, lines):
    e = entries[3]
    if case == "empty_text":
      e["segments"][1]["text"] = "  "
    elif case == "row_out_of_range":
      e["row"] = 40
    elif case == "segment_count":
      e["segments"] = e["segments"][:2]
    elif case == "bad_json":
      lines[3] = lines[3][:-5]
      return
    elif case == "missing_field":
      del e["row"]
    elif case == "duplicate_row":
      e["row"] = 2
    lines[3] = e

  if case == "missing_chunk":
    (path / "latents" / "c" / "3" / "0" / "0" / "0" / "0").unlink()
  elif case == "missing_array":
    shutil.rmtree(path / "latents")
  elif case == "wrong_shape":
    shutil.rmtree(path / "latents")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "latents")}}
    ts.open(spec, create=True, dtype=ts.float32, shape=[12, 37, 12, 4, 5]).result()
  elif case == "config_mismatch":
    config = _config(9)
    config.model.latent_height = 8
  else:
    _rewrite_index(path, edit)
  with pytest.raises(dataset_lib.DatasetError) as info:
    dataset_lib.open_dataset(path, config)
  for text in expect:
    assert text in str(info.value), str(info.value)
  assert str(path) in str(info.value)


def test_missing_dataset_message(tmp_path):
  with pytest.raises(dataset_lib.DatasetError, match="make_dataset.py"):
    dataset_lib.open_dataset(tmp_path / "nothing", _config(9))


# ------------------------------------------------------------------------------ pipeline


def _take(pipe, k):
  return [next(pipe) for _ in range(k)]


def test_pipeline_batches_and_epochs(made):
  path, config = made
  ds = dataset_lib.open_dataset(path, config)
  pipe = pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=0, process_index=0,
                                    process_count=1, num_threads=2, prefetch=2)
  batches = _take(pipe, 6)  # two epochs of 12 clips
  b = batches[0]
  assert b["latents"].shape == (4, 37, 12, 4, 6) and b["latents"].dtype == np.float32
  assert b["text"].shape == (4, 3, 22, 32) and b["text"].dtype == np.float32
  assert b["row"].shape == (4,) and b["row"].dtype == np.int32
  np.testing.assert_array_equal(b["latents"][1], ds[int(b["row"][1])]["latents"])
  rows = np.concatenate([x["row"] for x in batches])
  epoch0, epoch1 = rows[:12], rows[12:]
  assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
  assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(12))
  # Deterministic: a new pipeline gives the same order; another seed a different one.
  again = pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=0, process_index=0,
                                     process_count=1)
  np.testing.assert_array_equal(np.concatenate([x["row"] for x in _take(again, 6)]), rows)
  other = pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=1, process_index=0,
                                     process_count=1)
  assert not np.array_equal(np.concatenate([x["row"] for x in _take(other, 3)]), epoch0)


def test_pipeline_process_slices(made):
  path, config = made
  ds = dataset_lib.open_dataset(path, config)
  whole = _take(pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=0, process_index=0,
                                           process_count=1), 4)
  parts = [_take(pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=0, process_index=i,
                                            process_count=2), 4) for i in range(2)]
  for step in range(4):
    for key in ("latents", "text", "row"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])
    assert parts[0][step]["row"].shape == (2,)


def test_pipeline_resume(made):
  path, config = made
  ds = dataset_lib.open_dataset(path, config)
  make = lambda: pipeline_lib.make_pipeline(ds, global_batch_size=4, seed=3, process_index=1,
                                            process_count=2)
  pipe = make()
  _take(pipe, 5)
  state = json.loads(json.dumps(pipe.get_state()))  # survives a JSON round trip
  expected = _take(pipe, 4)
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 4), expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_pipeline_errors(made):
  path, config = made
  ds = dataset_lib.open_dataset(path, config)
  with pytest.raises(ValueError, match="train.batch_size=6 is not divisible"):
    pipeline_lib.make_pipeline(ds, global_batch_size=6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline_lib.make_pipeline(ds, global_batch_size=16, seed=0, process_index=0,
                               process_count=1)


def test_from_config_generates(tmp_path):
  config = _config(3, root=str(tmp_path / "root"), num_clips=8)
  config.train.batch_size = 4
  pipe = pipeline_lib.from_config(config, process_index=0, process_count=1)
  assert next(pipe)["latents"].shape == (4, 13, 12, 4, 6)
  assert (tmp_path / "root" / "3s" / "meta.json").exists()
