"""The io layer: datasets, autoencoders, and files (tfds, grain, orbax, diffusers, clu allowed).

Modules:
  autoencoder     the SD VAE (diffusers FlaxAutoencoderKL) and the weightless pixel autoencoder.
  taesd           the TAESD-family tiny autoencoders (the shipped TAEF2), read without torch.
  latents         latent_stats.json and the section 3.0 normalization (the only place it lives).
  latent_dataset  the TFDS-format ArrayRecord shards of posterior moments: layout and reading.
  image_sources   folder / zip / TFDS / MNIST-demo image sources and their preprocessing.
  encoding        the encode job's library call, `encode_dataset(config)`.
  input_pipeline  the training batches (grain), resumable by batch count.
  coupling        the global exact OT coupling solved on the host one step ahead.

Submodules import their heavy dependencies (diffusers, tfds) lazily, so importing this package
is cheap.
"""
