"""A stand-in for a transformers release without what mmpretrain 1.2.0's BLIP imports (tests only)."""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "5.0.0"
REMOVED = {"apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"}


def _anything(name):
    if name.startswith("__") or name in REMOVED:
        raise AttributeError(name)
    return type(name, (), {"__init__": lambda self, *a, **k: None})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _anything
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__getattr__ = _anything
