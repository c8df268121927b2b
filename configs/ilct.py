"""iLCT baseline: iCT in latent space (docs/method.md section 9 item 11), on FFHQ by default.

Pseudo-Huber with the constant mean-form c = 0.03456, no diffusion loss, no OT, GroupNorm final
norm.
Pick another dataset with --config.data.dir / data.num_examples / train.* overrides.
"""

from configs import ffhq


def get_config():
  config = ffhq.get_config()
  config.lct.loss = "pseudo_huber"
  config.lct.c_schedule = "constant"
  config.lct.c_constant = 0.03456
  config.lct.diffusion_weight = 0.0
  config.ot.method = "none"
  config.model.final_norm = "group"
  return config
