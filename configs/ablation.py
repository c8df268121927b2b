"""Ablation presets on CelebA-HQ (method.md section 9 item 12), selected by a config string.

--config=configs/ablation.py:ilct        iCT in latent space (pseudo-Huber, constant c)
--config=configs/ablation.py:cauchy      + Cauchy loss
--config=configs/ablation.py:diff        + diffusion loss at early timesteps
--config=configs/ablation.py:ot          + exact OT coupling
--config=configs/ablation.py:adaptive_c  + adaptive scaling-c schedule
--config=configs/ablation.py:nsln        + NsLN final norm (= the full recipe)
--config=configs/ablation.py:pseudo_huber | geman_mcclure   full recipe with another robust loss
"""

from configs import celebahq

CHAIN = ("ilct", "cauchy", "diff", "ot", "adaptive_c", "nsln")
LOSS_SWAPS = ("pseudo_huber", "geman_mcclure")


def get_config(name: str = "nsln"):
  config = celebahq.get_config()
  if name in LOSS_SWAPS:
    config.lct.loss = name
    return config
  if name not in CHAIN:
    raise ValueError(f"unknown ablation {name!r}; expected one of {CHAIN + LOSS_SWAPS}")
  upto = CHAIN.index(name)
  config.lct.loss = "cauchy" if upto >= 1 else "pseudo_huber"
  config.lct.diffusion_weight = 5.0 if upto >= 2 else 0.0
  config.ot.method = "exact" if upto >= 3 else "none"
  config.lct.c_schedule = "adaptive" if upto >= 4 else "constant"
  config.model.final_norm = "nsln" if upto >= 5 else "group"
  return config
