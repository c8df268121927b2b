"""The paper's ablation (docs/method.md section 9 item 12) as presets, selected by a config string.

--config=configs/ablation.py:ROW          on CelebA-HQ (the paper's setting)
--config=configs/ablation.py:BASE,ROW     on another base config: demo (the MNIST demo digits),
                                          fashion_mnist, celebahq

Rows, the cumulative chain from iLCT to the full recipe, then two loss swaps:
  ilct          iCT in latent space (pseudo-Huber, constant c, no diffusion loss, no OT, GroupNorm)
  cauchy        + Cauchy loss
  diff          + diffusion loss at early timesteps
  ot            + exact OT coupling
  adaptive_c    + adaptive scaling-c schedule
  nsln          + NsLN final norm (= the full recipe, the base config itself)
  pseudo_huber | geman_mcclure    the full recipe with another robust loss

Every row keeps the rest of its base config (steps, batch, network, optimizer, seed), so rows of
one base differ only in the five components. `python -m benchmarks.ablation` trains and scores
them all.
"""

import ml_collections

from configs import celebahq, demo, fashion_mnist

CHAIN = ("ilct", "cauchy", "diff", "ot", "adaptive_c", "nsln")
LOSS_SWAPS = ("pseudo_huber", "geman_mcclure")
ROWS = CHAIN + LOSS_SWAPS
BASES = {"celebahq": celebahq, "demo": demo, "fashion_mnist": fashion_mnist}


def apply_row(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the five components of `config` as ablation row `name` has them."""
  if name not in ROWS:
    raise ValueError(f"unknown ablation row {name!r}; expected one of {', '.join(ROWS)}")
  if name in LOSS_SWAPS:
    upto, loss = len(CHAIN) - 1, name
  else:
    upto = CHAIN.index(name)
    loss = "cauchy" if upto >= 1 else "pseudo_huber"
  config.lct.loss = loss
  config.lct.diffusion_weight = 5.0 if upto >= 2 else 0.0
  config.ot.method = "exact" if upto >= 3 else "none"
  config.lct.c_schedule = "adaptive" if upto >= 4 else "constant"
  config.lct.c_constant = 0.03456
  config.model.final_norm = "nsln" if upto >= 5 else "group"
  return config


def get_config(arg: str = "nsln") -> ml_collections.ConfigDict:
  """`ROW` (on CelebA-HQ) or `BASE,ROW`."""
  base, _, name = arg.rpartition(",")
  base = base or "celebahq"
  if base not in BASES:
    raise ValueError(f"unknown ablation base {base!r}; expected one of {', '.join(BASES)}")
  return apply_row(BASES[base].get_config(), name)
