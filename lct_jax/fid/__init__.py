"""FID and precision/recall for lct_jax: the Flax FID InceptionV3, feature statistics, metrics.

  inception          the network and loading its converted weights
  preprocess         pytorch-fid's input pipeline (x/255, torch-exact bilinear resize, 2x-1)
  stats              streaming float64 feature statistics, their files, the Fréchet distance
  precision_recall   improved precision and recall (Kynkäänniemi et al. 2019), chunked
  npz_io             atomic .npz/JSON writing with metadata

Nothing here imports torch; `python -m lct_jax.tools.convert_inception` (which does) produces the
weights file once.
"""
