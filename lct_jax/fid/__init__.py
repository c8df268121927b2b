"""FID and precision/recall for lct_jax: the Flax FID InceptionV3, feature statistics, metrics.

  inception          the network and loading its converted weights
  preprocess         pytorch-fid's input pipeline (x/255, torch-exact bilinear resize, 2x-1)
  vgg                VGG16 fc2 features for precision/recall (the paper's), its two resizes
  stats              streaming float64 feature statistics, feature files, the Fréchet distance
  precision_recall   improved precision and recall (Kynkäänniemi et al. 2019), chunked
  npz_io             atomic .npz/JSON writing with metadata
  torch_files        reading PyTorch weight files (TorchScript, torch.save) into numpy arrays
  inception_weights  converting the PyTorch FID Inception weights; `ensure_weights` on first use

Nothing here imports torch: `python -m lct_jax.tools.convert_inception` and `convert_vgg16` read
the PyTorch weight files with `torch_files` and produce the .npz files once.
"""
