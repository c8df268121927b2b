"""Package definition for lct_jax. Exact, tested pins live in requirements.txt."""

from setuptools import find_packages, setup

setup(
  name="lct_jax",
  version="0.1.0",
  description=(
    "Latent consistency models (arXiv 2502.01441 on top of iCT) in JAX/Flax: "
    "Cauchy loss, early-timestep diffusion loss, OT coupling, adaptive c, NsLN."
  ),
  packages=find_packages(include=["lct_jax", "lct_jax.*"]),
  # The TAEF2 tiny autoencoder's weights, licence and hashes (lct_jax/assets/taef2/README.md).
  package_data={"lct_jax": ["assets/taef2/*"]},
  python_requires=">=3.11",
  install_requires=[
    # core
    "jax>=0.10,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "chex>=0.1.90",
    "ott-jax>=0.6,<0.7",
    "numpy>=2.0",
    "scipy>=1.13",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    # io / jobs
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8",
    "diffusers==0.39.0",  # the last release that ships Flax models
    "safetensors>=0.4",
    "clu>=0.0.12",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "pillow>=10",
    "mlxtend>=0.25",
  ],
  extras_require={"test": ["pytest>=8"]},
)
