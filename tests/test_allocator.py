"""recjax.allocator: choosing, finding and preloading the CPU malloc by re-executing."""

import os
import subprocess
import sys
import textwrap

import pytest

from recjax import allocator


def test_resolve_choices_and_errors(tmp_path):
  empty = (str(tmp_path / "none"),)
  assert allocator.resolve("system") is None
  assert allocator.resolve("auto", empty) is None          # silently the system malloc
  with pytest.raises(ValueError, match="libtcmalloc-minimal4"):
    allocator.resolve("tcmalloc", empty)
  with pytest.raises(ValueError, match="libjemalloc2"):
    allocator.resolve("jemalloc", empty)
  with pytest.raises(ValueError, match="not a file"):
    allocator.resolve(str(tmp_path / "libnothing.so"))
  with pytest.raises(ValueError, match="not in"):
    allocator.resolve("ptmalloc")
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  lib.write_bytes(b"")
  assert allocator.find_library("tcmalloc", (str(tmp_path),)) == str(lib)
  assert allocator.resolve("auto", (str(tmp_path),)) == str(lib)
  assert allocator.resolve("tcmalloc", (str(tmp_path),)) == str(lib)
  assert allocator.resolve(str(lib)) == str(lib)


def test_flag_value():
  assert allocator.flag_value(["--config", "x", "--allocator=system"]) == "system"
  assert allocator.flag_value(["--allocator", "jemalloc", "--workdir=w"]) == "jemalloc"
  assert allocator.flag_value(["--workdir=w"]) == "auto"
  assert allocator.flag_value(["--allocator_x=1"], default="system") == "system"


@pytest.fixture(scope="module")
def nop_library(tmp_path_factory) -> str:
  """A shared library of our own (one no-op function): nothing maps it unless preloaded."""
  import shutil
  cc = shutil.which("cc") or shutil.which("gcc")
  if cc is None:
    pytest.skip("no C compiler to build a library to preload")
  d = tmp_path_factory.mktemp("nop")
  (d / "nop.c").write_text("int recjax_nop(void) { return 0; }\n")
  subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libnop.so"), str(d / "nop.c")],
                 check=True)
  return str(d / "libnop.so")


_CHILD = textwrap.dedent("""
    import os, sys
    from recjax import allocator
    print("start", os.getpid(), flush=True)
    allocator.reexec_with(sys.argv[1])
    print("loaded", allocator.loaded(), os.environ.get("LD_PRELOAD", "-"), flush=True)
""")


def _run_child(tmp_path, choice: str, **env_vars) -> list[str]:
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  env = {k: v for k, v in os.environ.items() if k not in (allocator.MARKER, "LD_PRELOAD")}
  env.update(env_vars)
  out = subprocess.run([sys.executable, str(script), choice], env=env, check=True,
                       capture_output=True, text=True, timeout=60).stdout
  return out.splitlines()


def _starts(lines):
  return [l for l in lines if l.startswith("start")]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_reexec_preloads_once_and_reports_it(tmp_path, nop_library):
  lib = nop_library
  lines = _run_child(tmp_path, lib)
  starts = _starts(lines)
  # Ran twice in the same process (execve keeps the pid), the second time preloaded.
  assert len(starts) == 2 and starts[0] == starts[1], lines
  assert lines[-1].split() == ["loaded", lib, lib], lines
  # The system malloc: no re-execution.
  lines = _run_child(tmp_path, "system")
  assert len(_starts(lines)) == 1 and lines[-1].split()[1:] == ["system", "-"], lines
  # A child of a preloaded process asking for the system malloc drops the inherited library.
  lines = _run_child(tmp_path, "system", **{allocator.MARKER: lib, "LD_PRELOAD": lib})
  assert len(_starts(lines)) == 2 and lines[-1].split()[1:] == ["system", "-"], lines
  # A user's own LD_PRELOAD of the chosen library: recorded, no restart.
  lines = _run_child(tmp_path, lib, LD_PRELOAD=lib)
  assert len(_starts(lines)) == 1 and lines[-1].split() == ["loaded", lib, lib], lines


def test_loaded_needs_the_library_mapped(monkeypatch, nop_library):
  monkeypatch.setenv(allocator.MARKER, nop_library)       # claimed, never loaded here
  assert allocator.loaded() != nop_library
def test_auto_uses_tcmalloc_when_installed(tmp_path):
  path = allocator.find_library("tcmalloc")
  lines = _run_child(tmp_path, "auto")
  assert lines[-1].split()[1] == (path or "system"), lines
