"""Nothing in the package can unpickle, whatever name the unpickler is reached by.

An AST checker that resolves what each name refers to (``import pickle as p``,
``from pickle import loads as l``, ``import torch as t``, ``L = torch.load``,
``importlib.import_module("pickle")``, ``getattr(torch, "load")`` ...) and flags:

- any import of, or reference to, a pickling module (pickle, dill, joblib, shelve, marshal ...);
- ``torch.load`` except called with ``weights_only=True`` (a literal);
- ``numpy.load`` called with ``allow_pickle`` other than a literal False (or passed on through
  ``*args`` / ``**kwargs``), or referred to without being called;
- any other unpickler by its resolved name (``pandas.read_pickle``, ``numpy.lib.format.read_array``
  with ``allow_pickle`` ...);
- a string literal that is exactly a pickling module's name (a module named in a registry and
  imported later).

The checker is proved on small sources with aliases before it is trusted on the package.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

import edgecap

PACKAGE = Path(edgecap.__file__).parent
UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "pickletools",
    "copyreg",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "jsonpickle",
}
UNSAFE_FUNCTIONS = {
    "pandas.read_pickle",
    "pandas.io.pickle.read_pickle",
    "numpy.loads",
    "torch.serialization._load",
    "torch._weights_only_unpickler",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {
    "numpy.load",
    "numpy.lib.npyio.load",
    "numpy.lib.format.read_array",
    "numpy.lib.format.read_array_header_1_0",
}
IMPORTERS = {"importlib.import_module", "__import__", "importlib.__import__"}


def _const_str(node: ast.AST) -> str | None:
    """A string literal, or literals joined with + ("pick" + "le")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _const_str(node.left), _const_str(node.right)
        if left is not None and right is not None:
            return left + right
    return None


class _Resolver:
    """Maps names to the dotted objects they stand for, over a whole module (scopes merged:
    a name bound to an unpickler anywhere counts everywhere, which errs on the safe side)."""

    def __init__(self, tree: ast.AST):
        self.aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.aliases[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        self.aliases[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        # Assignments of resolvable values (x = pickle.loads; y = x; ...), to a fixed point.
        assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.NamedExpr))]
        # Bounded: a name bound to two values in turn (``f = a`` here, ``f = b`` there) would
        # flip forever; each binding still gets its turn to propagate.
        changed, rounds = True, 0
        while changed and rounds <= len(assigns) + 1:
            changed, rounds = False, rounds + 1
            for node in assigns:
                if node.value is None:
                    continue
                value = self.resolve(node.value)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if value and isinstance(target, ast.Name) and self.aliases.get(target.id) != value:
                        self.aliases[target.id] = value
                        changed = True

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            return node.id if hasattr(builtins, node.id) else None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            func = self.resolve(node.func)
            if func in IMPORTERS and node.args:
                return _const_str(node.args[0])
            if func == "getattr" and len(node.args) >= 2:
                base, attr = self.resolve(node.args[0]), _const_str(node.args[1])
                return f"{base}.{attr}" if base and attr else None
        return None


def _keyword(call: ast.Call, name: str):
    """(present, literal value or the node) for keyword ``name``."""
    for kw in call.keywords:
        if kw.arg == name:
            return True, (kw.value.value if isinstance(kw.value, ast.Constant) else kw.value)
    return False, None


def _splat(call: ast.Call) -> bool:
    return any(isinstance(a, ast.Starred) for a in call.args) or any(kw.arg is None for kw in call.keywords)


def unpickling_problems(source: str, filename: str = "<source>") -> list[str]:
    tree = ast.parse(source, filename)
    names = _Resolver(tree)
    problems: list[str] = []
    checked_calls: set[int] = set()  # ids of func nodes of calls judged below

    def unsafe_module(dotted: str | None) -> bool:
        return bool(dotted) and (dotted.split(".")[0] in UNSAFE_MODULES or dotted in UNSAFE_FUNCTIONS)

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if unsafe_module(a.name):
                    problems.append(f"{where} imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if unsafe_module(node.module) or any(
                unsafe_module(f"{node.module}.{a.name}") for a in node.names
            ):
                problems.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = names.resolve(node.func)
            if func in TORCH_LOADS:
                checked_calls.add(id(node.func))
                present, value = _keyword(node, "weights_only")
                if not (present and value is True) or _splat(node):
                    problems.append(f"{where} {func} without weights_only=True")
            elif func in NUMPY_LOADS:
                checked_calls.add(id(node.func))
                present, value = _keyword(node, "allow_pickle")
                positional = len(node.args) >= 3  # np.load(file, mmap_mode, allow_pickle)
                if (present and value is not False) or positional or _splat(node):
                    problems.append(f"{where} {func} that may allow pickles")
            elif func in IMPORTERS and node.args and unsafe_module(_const_str(node.args[0])):
                problems.append(f"{where} imports {_const_str(node.args[0])} dynamically")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in UNSAFE_MODULES:
                problems.append(f"{where} names the module {node.value!r}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
            dotted = names.resolve(node)
            where = f"{filename}:{node.lineno}"
            if unsafe_module(dotted):
                problems.append(f"{where} uses {dotted}")
            elif dotted in TORCH_LOADS | NUMPY_LOADS and id(node) not in checked_calls:
                problems.append(f"{where} refers to {dotted} outside a checked call")
    return sorted(set(problems))


# -- the checker, proved on small sources --------------------------------------------------------
FLAGGED = {
    "import pickle": "import pickle\n",
    "pickle alias": "import pickle as p\nobj = p.loads(data)\n",
    "from-import alias": "from pickle import loads as l\nobj = l(data)\n",
    "cPickle-style": "import _pickle as fast\nfast.load(f)\n",
    "dill": "import dill\ndill.load(f)\n",
    "joblib from-import": "from joblib import load as restore\nrestore(path)\n",
    "torch alias, no weights_only": "import torch as T\nstate = T.load(path)\n",
    "from torch import load": "from torch import load\nstate = load(path, map_location='cpu')\n",
    "torch.load weights_only=False": "import torch\ntorch.load(path, weights_only=False)\n",
    "torch.load weights_only variable": "import torch\ntorch.load(path, weights_only=safe)\n",
    "torch.load **kwargs": "import torch\ntorch.load(path, weights_only=True, **kw)\n",
    "torch.load assigned": "import torch\nloader = torch.load\nloader(path, weights_only=True)\n",
    "torch.load via getattr": "import torch\ngetattr(torch, 'load')(path)\n",
    "torch.serialization.load": "import torch.serialization as ts\nts.load(path)\n",
    "numpy alias allow_pickle": "import numpy as n\nn.load(f, allow_pickle=True)\n",
    "from numpy import load": "from numpy import load as npl\nnpl(f, allow_pickle=True)\n",
    "numpy positional allow_pickle": "import numpy as np\nnp.load(f, None, True)\n",
    "numpy allow_pickle variable": "import numpy as np\nnp.load(f, allow_pickle=flag)\n",
    "numpy.load passed around": "import numpy as np\nrun(np.load, f)\n",
    "importlib": "import importlib\nm = importlib.import_module('pickle')\nm.loads(b)\n",
    "importlib concatenated": "import importlib\nimportlib.import_module('pick' + 'le').loads(b)\n",
    "__import__": "__import__('pickle').loads(b)\n",
    "alias of alias": "import pickle\nx = pickle\ny = x.loads\ny(b)\n",
    "function-local import": "def f(b):\n    import pickle as q\n    return q.loads(b)\n",
    "pandas": "import pandas as pd\npd.read_pickle(path)\n",
    "registry string": "MODULES = {'fast': ('pickle', 'loads')}\n",
}
CLEAN = {
    "torch weights_only": "import torch\ntorch.load(path, map_location='cpu', weights_only=True)\n",
    "torch alias weights_only": "import torch as t\nt.load(path, weights_only=True)\n",
    "numpy defaults": "import numpy as np\nnp.load(f)\nnp.load(f, mmap_mode='r')\n",
    "numpy allow_pickle False": "import numpy as np\nnp.load(f, allow_pickle=False)\n",
    "json and onnx loads": "import json, onnx\njson.loads(s)\nonnx.load(p)\n",
    "local names": "pickle_path = 'x.pkl'\nself.load(pickle_path)\nnotes = 'no pickle here'\n",
    "other dynamic import": "import importlib\nimportlib.import_module('edgecap.backends.torch')\n",
}


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_checker_flags_every_route_to_an_unpickler(name):
    assert unpickling_problems(FLAGGED[name]), name


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_checker_passes_safe_loads(name):
    assert unpickling_problems(CLEAN[name]) == []


def test_nothing_in_the_package_can_unpickle():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, not an empty glob
    problems = [
        p
        for path in files
        for p in unpickling_problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    ]
    assert problems == []


# -- imports and loads, by name (the first line of defence) ------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST, module: str, function: str):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == function
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == module
        ):
            yield node


def _keyword_value(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_nothing_in_the_package_unpickles():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                problems.append(f"{where}:{node.lineno} imports {names}")
            if isinstance(node, ast.Name) and node.id in UNSAFE_MODULES:
                problems.append(f"{where}:{node.lineno} uses {node.id}")
        for call in _calls(tree, "torch", "load"):
            if _keyword_value(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
        for call in _calls(tree, "np", "load"):
            if _keyword_value(call, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{call.lineno} np.load with allow_pickle")
        text = path.read_text()
        if "torch.load(" in text and "weights_only=True" not in text:
            problems.append(f"{where}: torch.load( without weights_only=True")
    assert problems == []
