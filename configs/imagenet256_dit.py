"""Class-conditional ImageNet 256x256 (latents 32x32x4, sd-vae-ft-ema) on DiT-B/2.

The recipe is the paper's (Cauchy loss, diffusion loss, exact OT, adaptive c, NsLN is the DiT's
own non-affine LayerNorm) on DiT-B/2 (130.3M parameters with the 1,001-row label table), as the
authors' follow-up trains it (sLCT: DiT backbones, class-conditional ImageNet-256 with
classifier-free guidance). Where their settings are not published these are our choices:

- global batch 256 and learning rate 1e-4 (DiT's), bfloat16 compute, EMA 0.9999;
- 400,000 steps (K = train.total_steps); the iCT curriculum s0 = 10, s1 = 640 over them;
- label dropout 0.1 (DiT's); sampling without guidance (eval.cfg_scale = 1), so 1 step is 1 NFE;
  with --config.eval.cfg_scale=S > 1 each step counts 2 NFE.

  python -m lct_jax.encode --config=configs/encode/imagenet256.py
  python -m lct_jax.main --config=configs/imagenet256_dit.py --workdir=runs/imagenet256_dit
"""

from configs import default
from configs.encode import imagenet256 as encode


def get_config():
  config = default.get_config()
  config.data.dir = encode.get_config().output_dir
  config.data.num_examples = 1_281_167
  config.data.num_classes = 1000
  config.model.name = "dit"
  config.model.dit_size = "B/2"
  config.model.label_dropout = 0.1
  config.model.dtype = "bfloat16"
  config.train.global_batch_size = 256
  config.train.total_steps = 400_000
  config.optim.learning_rate = 1e-4
  config.ckpt.every_steps = 10_000
  return config
