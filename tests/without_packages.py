"""Run Python where some installed packages cannot be imported, as on a machine that lacks them.

The GPU machines of issue 20 have PyTorch and the model libraries but not Ray, vLLM, TRL or `datasets`. Their
files stay on disk here, so a test takes them away with an import finder that is blind to them: `import ray` fails
and `importlib.util.find_spec("ray")` says None, as where the package is not installed.

    python -m tests.without_packages ray,vllm -c CODE [ARGS...]
    python -m tests.without_packages ray,vllm SCRIPT [ARGS...]

Only the standard library is imported before the finder is in place.
"""

from __future__ import annotations

import runpy
import sys
from importlib.machinery import PathFinder
from pathlib import Path


def hide(packages: list[str]) -> None:
    """Make sys.path's finder blind to `packages` (top-level names) in this process."""
    hidden = frozenset(packages)

    class Blind(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] in hidden else super().find_spec(name, path, target)

    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in hidden)
    if loaded:
        raise RuntimeError(f"already imported, cannot be hidden: {loaded}")
    sys.meta_path[:] = [Blind if finder is PathFinder else finder for finder in sys.meta_path]


def command(packages: list[str], *args: str) -> list[str]:
    """The command line that runs `args` (`-c CODE`, or a script and its arguments) without `packages`."""
    return [sys.executable, "-m", "tests.without_packages", ",".join(packages), *args]


def main(argv: list[str]) -> None:
    packages, args = argv[0].split(","), argv[1:]
    hide(packages)
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]  # as `python -c CODE ARGS...` sets it
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        return
    script = Path(args[0])
    sys.argv = args
    sys.path.insert(0, str(script.resolve().parent))  # what `python SCRIPT` puts first on sys.path
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
