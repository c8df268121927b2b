"""Config validation (one-line errors naming the key), presets, and the two tools."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from test_unet import count_dhariwal_params

from configs import ablation, celebahq, default, ffhq, ilct, lsun_church
from configs import test as test_config
from lct_jax import config_lib, schema
from lct_jax.core import ot


@pytest.mark.parametrize(
  "key,value,num_devices",
  [
    ("lct.loss", "huber", None),
    ("ot.method", "emd", None),
    ("ot.scope", "world", None),
    ("lct.c_schedule", "cosine", None),
    ("model.final_norm", "batch", None),
    ("model.attention", "flash", None),
    ("model.name", "vit", None),
    ("data.latent", "draw", None),
    ("lct.s1", 5, None),  # s1 < s0
    ("lct.c_constant", -0.01, None),
    ("train.global_batch_size", 100, 8),
    ("optim.ema_decay", 1.0, None),
    ("data.latent_shape", (30, 30, 4), None),
    ("data.sigma_data", 0.0, None),
    ("optim.b1", 1.0, None),
    ("optim.b2", 1.0, None),
    ("optim.eps", 0.0, None),
    ("optim.warmup_steps", -1, None),
    ("optim.grad_clip", -1.0, None),
    ("optim.weight_decay", -1e-4, None),
    ("train.log_every_steps", 0, None),
    ("train.max_consecutive_nonfinite", 0, None),  # would stop a healthy run at once
    ("ckpt.every_steps", 0, None),
    ("ckpt.keep", 0, None),
    ("train.num_grid_samples", 0, None),
    ("train.num_grid_samples", 64, 128),  # split over the devices
    ("model.attn_resolutions", (16, 6), None),  # 6: no level of a 32x32 network (no attention)
  ],
)
def test_bad_values_name_their_key(key, value, num_devices):
  config = default.get_config()
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(schema.ConfigError) as err:
    schema.check_train(config, num_devices)
  first = str(err.value).splitlines()[0]  # a value can break a derived check too (more lines)
  assert first.startswith(f"config.{key}="), err.value


def test_every_problem_of_a_config_is_reported_at_once():
  config = default.get_config()
  config.lct.s0 = 0
  config.optim.learning_rate = -1.0
  config.ckpt.keep = 0
  with pytest.raises(schema.ConfigError) as err:
    schema.check_train(config, 1)
  lines = str(err.value).splitlines()
  assert [line.split(":")[0] for line in lines] == [
    "config.lct.s0=0", "config.optim.learning_rate=-1.0", "config.ckpt.keep=0"
  ], lines


def test_presets_validate_and_match_the_paper():
  for mod in (default, ffhq, celebahq, lsun_church, ilct, test_config):
    schema.check_train(mod.get_config(), 8)
  assert schema.total_steps(ffhq.get_config()) == 546 * 1400
  assert schema.total_steps(celebahq.get_config()) == 210 * 1400
  assert schema.total_steps(lsun_church.get_config()) == 937 * 1800
  base = ilct.get_config()
  assert (
    base.lct.loss,
    base.lct.c_schedule,
    base.lct.diffusion_weight,
    base.ot.method,
    base.model.final_norm,
  ) == ("pseudo_huber", "constant", 0.0, "none", "group")


@pytest.mark.parametrize(
  "preset,images", [(ffhq, 70_000), (celebahq, 27_000), (lsun_church, 120_000)]
)
def test_dataset_presets_train_on_what_their_encode_configs_write(preset, images):
  """docs/method.md 5.2 / 9.7: FFHQ all 70,000, CelebA-HQ 27,000, LSUN Church 120,000 + flips."""
  config = preset.get_config()
  name = preset.__name__.rsplit(".", 1)[1]
  encode = importlib.import_module(f"configs.encode.{name}").get_config()
  assert config.data.dir == encode.output_dir
  assert config.data.use_flipped == encode.flip == (preset is lsun_church)
  assert encode.max_examples in (images, -1)  # -1: the whole source
  assert config.data.num_examples == images * (2 if encode.flip else 1)


def test_ablation_chain_adds_one_component_at_a_time():
  def keys(c):
    return (
      c.lct.loss,
      c.lct.diffusion_weight > 0,
      c.ot.method,
      c.lct.c_schedule,
      c.model.final_norm,
    )

  chain = [keys(ablation.get_config(n)) for n in ablation.CHAIN]
  for a, b in zip(chain, chain[1:]):
    assert sum(x != y for x, y in zip(a, b)) == 1
  assert chain[0] == keys(ilct.get_config())
  assert chain[-1] == keys(celebahq.get_config())
  assert ablation.get_config("geman_mcclure").lct.loss == "geman_mcclure"


def test_ot_settings_round_trip():
  config = default.get_config()
  assert config_lib.ot_config(config) == ot.OTConfig("exact", "local", 0.01, 200)


def run_tool(*args):
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_schedule_tool_json():
  result = json.loads(run_tool("lct_jax.tools.schedule", "--config=configs/ffhq.py", "--json"))
  assert result["total_steps"] == 764_400
  assert [s["N"] for s in result["stages"]] == [11, 21, 41, 81, 161, 321, 641]
  assert [s["start_step"] for s in result["stages"]] == [109_200 * j for j in range(7)]
  assert set(result["stages"][0]) == {
    "start_step",
    "end_step",
    "N",
    "c",
    "diff_sigma_max",
    "diff_fraction",
  }


def test_schedule_tool_reports_bad_config():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "lct_jax.tools.schedule",
      "--config=configs/ffhq.py",
      "--config.lct.loss=huber",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and "config.lct.loss='huber'" in out.stderr


def test_model_summary_tool_counts_the_paper_network():
  out = run_tool("lct_jax.tools.model_summary", "--config=configs/ffhq.py")
  # The closed-form count of EDM's DhariwalUNet, written independently in test_unet.py.
  want = count_dhariwal_params(32, 4, 4, 128, (1, 2, 3, 4), 4, (16, 8), final_norm="nsln")
  assert f"Total parameters: {want:,}" in out


def test_mesh_num_devices_zero_is_refused_not_all_devices():
  from lct_jax.core import mesh as mesh_lib

  for bad in (0, -2):
    with pytest.raises(ValueError, match=f"config.mesh.num_devices={bad}"):
      mesh_lib.make_mesh(bad)
  assert mesh_lib.make_mesh(-1).size == mesh_lib.make_mesh(8).size == 8


def test_url_workdirs_and_data_dirs_are_refused_before_anything_is_written(tmp_path, monkeypatch):
  # os / open on "gs://b/run" write a local folder "gs:" (checkpoints lost with the host's disk).
  from lct_jax import evaluation, jobs, training
  from lct_jax.io import encode_config

  monkeypatch.chdir(tmp_path)
  config = test_config.get_config()
  for fn in (training.train_and_evaluate, evaluation.evaluate):
    with pytest.raises(ValueError, match="--workdir=gs://b/run: URLs are not supported"):
      fn(config, "gs://b/run")
  config.data.dir = "gs://b/latents"
  with pytest.raises(ValueError, match="config.data.dir=gs://b/latents: URLs"):
    training.train_and_evaluate(config, str(tmp_path / "run"))
  enc = encode_config.get_base_config()
  enc.output_dir = "s3://b/latents"
  with pytest.raises(ValueError, match="config.output_dir=s3://b/latents: URLs"):
    jobs.setup_job(enc, "", "encode")
  assert os.listdir(tmp_path) == []


def test_latent_demo_trains_on_what_its_encode_config_writes():
  from configs import demo_latent
  from configs.encode import demo_latent as encode_demo_latent

  config, encode = demo_latent.get_config(), encode_demo_latent.get_config()
  schema.check_train(config, 8)
  schema.check_eval(config, 8)
  schema.check_encode(encode)
  assert config.data.dir == encode.output_dir and config.data.autoencoder == encode.autoencoder
  assert tuple(config.data.latent_shape) == (encode.resolution // 8,) * 2 + (32,)
  # Scored against the same digits at the resolution the samples decode to.
  assert config.eval.reference_images == config.data.encode_config
