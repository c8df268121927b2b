"""The core layer: everything the training step needs, importing only jax, flax, optax, ott-jax,
numpy and scipy (never TensorFlow, tfds, diffusers or clu), so it runs on a bare accelerator box."""
