"""absl logging set-up shared by the binaries: INFO for lct_jax, warnings only from orbax/grain."""

from absl import logging


class _QuietLibraries:
  """Drops INFO lines of orbax and grain (tens per checkpoint); their warnings still show."""

  def filter(self, record) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= 30 or not noisy


def set_up() -> None:
  """INFO verbosity, with orbax's and grain's INFO lines filtered out."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
