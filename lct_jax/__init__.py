"""lct_jax: latent consistency training (arXiv 2502.01441 on top of iCT) in JAX/Flax.

Layers (a lower layer never imports a higher one):
  lct_jax.core   jax/flax/optax/ott-jax/numpy only: formulas, network, train step, samplers.
  lct_jax.io     tfds/grain/orbax/diffusers/clu: datasets, VAE, checkpoints, logging.
  jobs           lct_jax.main / lct_jax.encode / lct_jax.evaluate and lct_jax.tools.*.
"""
