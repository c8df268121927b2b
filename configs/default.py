"""Every configuration key of lct_jax, with the paper's values (docs/method.md section 10).

Dataset files (ffhq.py, celebahq.py, ...) import `get_config` from here and override. Override on
the command line with `--config.group.key=value`. The config is validated and converted into frozen
dataclasses (lct_jax/config_lib.py) before anything is compiled.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (paper, FFHQ-like) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # -- data -------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dir = ""  # folder holding the encoding job's TFDS shards and latent_stats.json
  data.num_examples = 70_000  # training latents; with train.num_epochs gives the total steps K
  data.latent_shape = (32, 32, 4)  # H, W, C (NHWC everywhere in lct_jax)
  data.autoencoder = "stabilityai/sd-vae-ft-ema"  # or "pixel" (exact space-to-depth, no weights)
  data.sigma_data = 0.5  # latents are standardized per element, then multiplied by this
  data.use_flipped = False  # also train on the stored moments of h-flipped images
  data.encode_config = ""  # encode config to run when data.dir holds no finished dataset (demo)
  data.worker_count = 0  # grain worker processes (0: read in the training process)
  # What a training row is: "sample", the frozen posterior draw the encode job stored
  # (docs/method.md §9.16, the paper's choice) | "mean", the posterior mean | "fresh",
  # mean + std * eps each step.
  data.latent = "sample"
  # Standardize each "element" of the (H, W, C) latent (docs/method.md §3.0, the paper's) or each
  # "channel" as a whole (for pixel-space data; see lct_jax.io.latents.NORMALIZATIONS).
  data.normalization = "element"
  # Class-conditional training: the number of classes of the encode job's labels (0:
  # unconditional). Label K = num_classes is the null class of classifier-free guidance.
  data.num_classes = 0

  # -- model (EDM's DhariwalUNet, docs/method.md section 4.1; or DiT, section 4.3) -----------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "dhariwal_unet"  # dhariwal_unet | dit
  model.dit_size = "B/2"  # model.name=dit: S | B | L | XL, then / patch 2 | 4 | 8
  # Conditional models: the share of rows whose label becomes the null class in a step (the same
  # for student and teacher), so that one network also learns the unconditional F.
  model.label_dropout = 0.1
  model.model_channels = 128
  model.channel_mult = (1, 2, 3, 4)
  model.num_blocks = 4
  model.attn_resolutions = (16, 8)
  model.dropout = 0.0
  model.final_norm = "nsln"  # group | layer | nsln   (docs/method.md section 3.6)
  model.nsln_everywhere = False  # ablation: every GroupNorm becomes NsLN
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # Attention: auto (cuDNN flash attention on a GPU in bf16/fp16, else xla) | xla | cudnn. On one
  # H100 (paper network, bf16, batch 128) cuDNN takes the attention core from 9.7 to 4.9 ms per
  # step and the peak memory from 9.0 to 7.0 GiB (benchmarks/NOTES.md, "Profile first").
  model.attention = "auto"

  # -- consistency training (docs/method.md sections 2 and 3) --------------------------------------
  config.lct = lct = ml_collections.ConfigDict()
  lct.sigma_min = 0.002
  lct.sigma_max = 80.0
  lct.rho = 7.0
  lct.p_mean = -1.1
  lct.p_std = 2.0
  lct.s0 = 10
  lct.s1 = 640
  lct.loss = "cauchy"  # cauchy | pseudo_huber | geman_mcclure | l2
  lct.c_schedule = "adaptive"  # adaptive | constant
  lct.c_constant = 0.03456  # the constant c; also c of the first stage under "adaptive"
  lct.c_log_slope = -1.15  # adaptive: c(N) = exp(slope * ln(N - 1) + intercept) for N > s0 + 1
  lct.c_log_intercept = -0.85
  lct.diffusion_weight = 5.0  # 0 disables the early-timestep diffusion loss
  lct.diffusion_threshold = 0.75  # mask i >= floor(threshold * N)

  # -- optimal-transport coupling of data and noise (docs/method.md section 3.5) -------------------
  config.ot = ot = ml_collections.ConfigDict()
  ot.method = "exact"  # none | exact (scipy on host) | hungarian (optax, jittable) | sinkhorn
  ot.scope = "local"  # local: each device's batch (the paper) | global: the whole batch
  ot.sinkhorn_epsilon = 0.01  # relative to the standard deviation of the cost matrix
  ot.sinkhorn_iterations = 200

  # -- optimizer and EMA (docs/method.md section 5.1) ----------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4
  optim.warmup_steps = 0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 1e-4  # coupled (added to the gradient before RAdam), as torch RAdam
  optim.grad_clip = 0.0  # 0: no clipping (the paper)
  optim.ema_decay = 0.9999

  # -- training loop ------------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.global_batch_size = 128
  train.num_epochs = 1400
  train.total_steps = -1  # -1: floor(data.num_examples / global_batch_size) * num_epochs
  train.microbatches = (
    1  # gradient accumulation; OT and the diffusion mean still see the whole batch
  )
  train.log_every_steps = 100
  train.sample_every_steps = 10_000
  # NonFiniteLossError when, at a logging step, this many steps in a row were non-finite:
  train.max_consecutive_nonfinite = 20
  train.stop_after_steps = 0  # > 0: save and exit cleanly after this many steps of this invocation
  train.num_grid_samples = 64  # 1-step samples in each logged image grid

  # -- checkpoints --------------------------------------------------------------------------------
  config.ckpt = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 5_000
  ckpt.keep = 3
  ckpt.keep_every = 50_000

  # -- evaluation ---------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 50_000
  ev.batch_size = 256
  ev.seed = 42
  ev.sigma_mid = (0.821,)  # intermediate sigmas for 2-step sampling (docs/method.md section 6.2)
  # Classifier-free guidance (docs/method.md section 6.3): F_null + s (F_cond - F_null); 1: off.
  # A guided evaluation counts as 2 NFE.
  ev.cfg_scale = 1.0
  ev.class_label = -1  # -1: sample i is of class i mod data.num_classes; else this class
  # Reference statistics for FID: the .npz of `python -m lct_jax.tools.fid_stats` (required;
  # statistics made with other Inception weights or preprocessing are refused).
  ev.reference_stats = ""
  # Or made the first time they are needed, from real images: an encode config whose source
  # images (at its resolution, as the encode job reads them, no flips) are the reference;
  # eval.reference_stats and eval.reference_features then name where it is kept.
  ev.reference_images = ""
  # Improved precision/recall (Kynkaenniemi et al., k = pr_k) against real features: an .npz from
  # `fid_stats --features_out=...` (required when precision_recall is True), made by the same
  # extractor and weights as pr_features (other features are refused).
  ev.precision_recall = True
  ev.reference_features = ""
  ev.pr_k = 3
  # "inception": FID Inception pool3 (2048-d); "vgg16": VGG16 fc2 (4096-d), the paper's
  # (StyleGAN2-ADA pr50k3), from eval.vgg16_weights; reference features from
  # `fid_stats --features_out=... --pr_features=vgg16 --vgg16_weights=...`.
  ev.pr_features = "inception"
  # Converted VGG16 .npz (`python -m lct_jax.tools.convert_vgg16 --input=vgg16.pt
  # --output=vgg16.npz`: NVIDIA's vgg16.pt, the paper's, or torchvision's vgg16-397923af.pth);
  # required when pr_features is "vgg16".
  ev.vgg16_weights = ""
  ev.jpeg = True  # also score after a JPEG quality-75 round trip (the paper's protocol, 9.9)
  ev.best_of_last = 5  # summary.json: the best FID among the last N scored checkpoints (9.10)
  ev.export = ""  # "" | "png" | "npz" (arr_0 uint8 NHWC + indices): also write the samples
  ev.after_training = False  # the training job scores its final checkpoint when it ends
  ev.checkpoint_step = -1  # -1: the newest checkpoint (--follow evaluates every checkpoint)
  ev.inception_weights = ""  # converted FID Inception .npz; "": $LCT_JAX_FID_WEIGHTS or cache
  ev.grid_samples = 64  # samples in the PNG grid of each result (0: no grid)
  ev.follow_poll_s = 30.0  # --follow: seconds between looks at the checkpoint folder
  ev.follow_timeout_s = 6 * 3600.0  # --follow: give up after this long without a new checkpoint

  # -- device mesh --------------------------------------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.num_devices = -1  # -1: all devices
  # Devices the train state (params, EMA, optimizer state) is split over; the batch is split over
  # all devices (docs/design.md, "Sharding"). 1: the state is replicated.
  mesh.fsdp = 1
  mesh.distributed = False  # call jax.distributed.initialize() in main (multi-host)
  mesh.coordinator_address = ""  # "" = auto-detect (TPU pods, SLURM); else "host:port"
  mesh.num_processes = -1  # -1 = auto-detect
  mesh.process_id = -1  # -1 = auto-detect
  mesh.cpu_collectives = ""  # "gloo" for several CPU processes on one machine
  return config
