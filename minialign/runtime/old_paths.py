"""The import paths of the modules that moved out of the top of the package: ``minialign.loading``
is ``minialign.runtime.loading`` (the same module object), and so on for each name in ``MOVED``.

No file is left at an old path, so that git sees each move as a rename and carries edits made
to the old file meanwhile into the new one. Instead, ``minialign/__init__.py`` puts the finder
below on the import path: an old name imports the module at its new path and binds it under
both names. ``python -m minialign.cli`` runs ``minialign.runtime.cli`` as a script.
"""

# shim: old import path, removed once every importer uses minialign.runtime

from __future__ import annotations

import importlib
import importlib.machinery
import sys

MOVED = {  # old name -> new name
    "minialign.files": "minialign.runtime.files",
    "minialign.distributed": "minialign.runtime.distributed",
    "minialign.datafiles": "minialign.runtime.datafiles",
    "minialign.loading": "minialign.runtime.loading",
    "minialign.cli": "minialign.runtime.cli",
    "minialign.hf": "minialign.real.hf",
    "minialign.gpt2": "minialign.real.gpt2",
    "minialign.export": "minialign.real.export",
    "minialign.bench": "minialign.tools.bench",
    "minialign.exercises": "minialign.tools.exercises",
    "minialign.evaluate": "minialign.stages.evaluate",
    "minialign.rewards": "minialign.stages.rewards",
}


class _Alias:
    """Loads an old name as the module at its new path (one module object, two names)."""

    def __init__(self, new: str):
        self.new, self.spec = new, None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system gave it the old name's spec; it keeps its own

    def get_code(self, fullname: str):
        """``python -m <old name>`` runs the new module as ``__main__``."""
        return compile(f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname}: {self.new}>", "exec")


class _Finder:
    def find_spec(self, name: str, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, _Alias(MOVED[name]))


def install() -> None:
    """Put the finder on ``sys.meta_path`` just after the one that finds files on ``sys.path``, so
    that a real file at an old path still wins, but an editable install's finder (which maps any
    ``minialign.*`` name into its own checkout) comes too late to take an old name."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    files_finder = importlib.machinery.PathFinder
    at = next((i + 1 for i, f in enumerate(sys.meta_path) if f is files_finder), len(sys.meta_path))
    sys.meta_path.insert(at, _Finder())
