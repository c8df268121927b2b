"""A tiny FlaxAutoencoderKL configuration shared by the VAE and encode tests."""

from lct_jax.io import autoencoder as ae_lib

TINY_VAE = {
  "block_out_channels": [8, 16],
  "down_block_types": ["DownEncoderBlock2D"] * 2,
  "up_block_types": ["UpDecoderBlock2D"] * 2,
  "norm_num_groups": 4,
  "layers_per_block": 1,
  "latent_channels": 4,
  "sample_size": 16,
}


def save_tiny_vae(folder: str, seed: int):
  """Builds a random tiny VAE, saves it with diffusers' save_pretrained; returns (model, params)."""
  model = ae_lib.build_vae_model(TINY_VAE)
  params = ae_lib.init_random_vae_params(model, seed=seed)
  ae_lib.save_vae(folder, model, params)
  return model, params
