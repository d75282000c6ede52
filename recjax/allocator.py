"""CPU memory allocator for training processes: re-executes the process with tcmalloc preloaded.

Applies on every platform (host-side buffers of GPU/TPU runs too); `--allocator=system`
opts out. Why: XLA:CPU allocates each executable's temporary buffers (hundreds of MB for a T5 step)
on every call. glibc's malloc serves blocks that large with fresh `mmap`s, so every step
page-faults its whole working set in again: ~185,000 minor faults per flan-t5-small train step
on a 2-core VM (1.66 vs 1.90 s per step with tcmalloc, which keeps and reuses freed memory, and
0 faults; README "CPU memory allocator"). PyTorch's CPU tuning guide gives the
same advice for the same reason. The allocator can only be chosen before the process starts,
so entry points (launch/main.py, the benchmarks) call `reexec_with(...)` first thing; it
re-runs the same command line with `LD_PRELOAD` set, once.

Choices: "auto" (tcmalloc if installed, else the system malloc, silently), "tcmalloc" or
"jemalloc" (an error naming the package to install when missing), "system" (leave malloc
alone), or a path to a shared library. Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`.
"""

from __future__ import annotations

import glob
import os
import sys

# Environment variable set in the re-executed process (so it never re-executes twice) and
# naming what it preloaded.
MARKER = "RECJAX_ALLOCATOR"

_CANDIDATES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                 "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools",
             "jemalloc": "libjemalloc2 (Debian/Ubuntu)"}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
            "/usr/lib", "/usr/local/lib", "/opt/homebrew/lib")
CHOICES = ("auto", "tcmalloc", "jemalloc", "system")


def find_library(name: str, lib_dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
  """Path of the allocator `name` ("tcmalloc" | "jemalloc") in `lib_dirs`, or None."""
  for soname in _CANDIDATES[name]:
    for d in lib_dirs:
      for path in sorted(glob.glob(os.path.join(d, soname))):
        if os.path.isfile(path):
          return path
  return None


def resolve(choice: str, lib_dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
  """The library to preload for `choice`, or None for the system malloc.

  Raises:
    ValueError: unknown choice, a named allocator that is not installed, or a path that
      is not a file.
  """
  if choice == "system":
    return None
  if choice == "auto":
    return find_library("tcmalloc", lib_dirs)
  if choice in _CANDIDATES:
    path = find_library(choice, lib_dirs)
    if path is None:
      raise ValueError(f"allocator {choice!r}: none of {_CANDIDATES[choice]} in "
                       f"{list(lib_dirs)}; install {_PACKAGES[choice]}, or use "
                       "--allocator=auto|system")
    return path
  if os.sep in choice:
    if not os.path.isfile(choice):
      raise ValueError(f"allocator: {choice!r} is not a file")
    return choice
  raise ValueError(f"allocator {choice!r} not in {CHOICES} and not a path to a library")


def _mapped_files() -> set[str] | None:
  """Paths of the files mapped into this process (None without /proc)."""
  try:
    with open("/proc/self/maps") as f:
      return {line.split()[5] for line in f if len(line.split()) >= 6}
  except OSError:
    return None


def loaded() -> str:
  """What serves malloc in this process: the preloaded library's path (as chosen), another
  mapped tcmalloc/jemalloc/mimalloc (preloaded by the user), or "system"."""
  preloaded = os.environ.get(MARKER)
  mapped = _mapped_files()
  if mapped is None:                        # no /proc (macOS): trust the marker
    return preloaded or "system"
  if preloaded and preloaded != "system" and os.path.realpath(preloaded) in mapped:
    return preloaded
  for path in sorted(mapped):
    if any(name in os.path.basename(path) for name in ("tcmalloc", "jemalloc", "mimalloc")):
      return path
  return "system"


def reexec_with(choice: str, lib_dirs: tuple[str, ...] = LIB_DIRS) -> None:
  """Re-executes this process's command line with `choice`'s allocator preloaded.

  Returns without doing anything when this process was already (re-)executed for the same
  choice (the `MARKER` variable names it, so there is never a second re-execution), or when
  the choice is the system malloc and no allocator of ours is preloaded. A process started
  by one with another allocator (it inherits `MARKER` and `LD_PRELOAD`) re-executes with
  its own choice, dropping the inherited library. Call it before any work (it replaces
  the process).
  """
  path = resolve(choice, lib_dirs)
  want = path or "system"
  previous = os.environ.get(MARKER)
  if previous == want:
    return
  inherited = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
  kept = [p for p in inherited if p not in (previous, path)]
  if (path is None and kept == inherited) or (path in inherited and previous is None):
    os.environ[MARKER] = want    # nothing to drop, or the user preloaded it: no restart
    return
  env = dict(os.environ)
  env[MARKER] = want
  env["LD_PRELOAD"] = ":".join(([path] if path else []) + kept)
  if not env["LD_PRELOAD"]:
    del env["LD_PRELOAD"]
  # tcmalloc reports every allocation over 1 GiB on stderr; XLA's temporaries of a large
  # model's step are that big on every call.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 50))
  sys.stdout.flush()
  sys.stderr.flush()
  argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
  argv[0] = sys.executable
  os.execve(sys.executable, argv, env)


HELP = ("CPU malloc: auto (tcmalloc when installed, else the system's), tcmalloc, jemalloc, "
        "system, or a library path; the process re-runs itself once with it preloaded "
        "(recjax/allocator.py)")


def reexec_from_argv(default: str = "auto") -> None:
  """`reexec_with` the `--allocator` value of this process's command line (entry points)."""
  reexec_with(flag_value(sys.argv[1:], default))


def define_absl_flag():
  """The `--allocator` absl flag (the value was already acted on by `reexec_from_argv`)."""
  from absl import flags
  return flags.DEFINE_string("allocator", "auto", HELP)


def flag_value(argv: list[str], default: str = "auto", name: str = "allocator") -> str:
  """`--allocator=X` / `--allocator X` from a command line, before absl parses it."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default
