"""Loading an `experiments/` script as a module in a test process.

Such scripts define absl flags on the global `FLAGS` at import time, and two of them
may define the same name (e.g. `--config`). Tests import them only for their pure
helpers, so the flags a script defines are removed again right after loading it:
loading scripts in any order, in one pytest worker, never raises DuplicateFlagError.
"""

import importlib.util
import os

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
  """The module of `experiments/<name>.py`, its absl flags undefined again."""
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  before = set(flags.FLAGS)
  try:
    spec.loader.exec_module(module)
  finally:
    for flag_name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag_name)
  return module
