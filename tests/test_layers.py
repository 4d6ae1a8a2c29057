"""Import rules between the layers of src/commitfs, checked on the AST.

Every ``import`` and ``from ... import`` counts, including ones inside
functions (a lazy import is still a dependency).  The rules:

* errors.py imports nothing from commitfs;
* model/ imports only errors and model;
* storage/ imports only errors and storage;
* repo/ imports only errors, model, storage and repo;
* ops/ imports neither cli, fuse, vfs, web nor the api front end;
* vfs/ imports neither ops, cli, fuse, web nor the api front end;
* web/ (the UI, a front end) imports neither storage, cli, fuse nor vfs: it
  calls ops and the repository's read API;
* only storage/s3.py imports boto3 or botocore;
* only fuse/ imports pyfuse3;
* only web/ imports starlette, uvicorn or jinja2; only ops/thumbnail.py PIL;
* nothing imports commitfs.cli except cli/ itself and the __main__ modules;
* nothing imports commitfs.web except web/ itself and cli/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import commitfs

SRC = Path(commitfs.__file__).parent


@dataclass(frozen=True)
class Import:
    module: str    # importing module, dotted ("commitfs.repo.index")
    path: str      # its file, relative to the package root ("repo/index.py")
    target: str    # imported module, dotted and absolute
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def _module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([root.name, *parts])


def iter_imports(root: Path):
    """Every import of every module under ``root`` (a package directory)."""
    for file in sorted(root.rglob("*.py")):
        module = _module_name(root, file)
        is_pkg = file.name == "__init__.py"
        rel = file.relative_to(root).as_posix()
        tree = ast.parse(file.read_text(), str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, rel, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # "from commitfs import errors" imports commitfs.errors: name the
                # target prefix.name (for a class, one level too deep: harmless).
                for alias in node.names:
                    yield Import(module, rel, prefix if alias.name == "*" else f"{prefix}.{alias.name}",
                                 node.lineno)


def _area(dotted: str, pkg: str) -> str | None:
    """The layer a commitfs module belongs to ('repo', 'errors', '' for the package itself)."""
    parts = dotted.split(".")
    if parts[0] != pkg:
        return None
    return parts[1] if len(parts) > 1 else ""


ALLOWED = {
    "errors": {"errors"},
    "model": {"errors", "model"},
    "storage": {"errors", "storage"},
    "repo": {"errors", "model", "storage", "repo"},
}
FORBIDDEN = {
    "ops": {"cli", "fuse", "vfs", "api", "web", ""},
    # The file-system core does no real work: the workspace commit is composed in fuse/control.
    "vfs": {"ops", "cli", "fuse", "api", "web", ""},
    "web": {"storage", "cli", "fuse", "vfs"},
}
# Third-party modules only one place may import: top-level name -> (where, may this path import it?)
EXCLUSIVE = {
    "boto3": ("storage/s3.py", lambda path: path == "storage/s3.py"),
    "botocore": ("storage/s3.py", lambda path: path == "storage/s3.py"),
    "pyfuse3": ("fuse/", lambda path: path.startswith("fuse/")),
    "starlette": ("web/", lambda path: path.startswith("web/")),
    "uvicorn": ("web/", lambda path: path.startswith("web/")),
    "jinja2": ("web/", lambda path: path.startswith("web/")),
    "PIL": ("ops/thumbnail.py", lambda path: path == "ops/thumbnail.py"),
}


def violations(root: Path) -> list[str]:
    pkg = root.name
    found = []
    for imp in iter_imports(root):
        src = _area(imp.module, pkg)
        dst = _area(imp.target, pkg)
        if dst is None:
            top = imp.target.split(".")[0]
            rule = EXCLUSIVE.get(top)
            if rule is not None and not rule[1](imp.path):
                found.append(f"{imp}: only {rule[0]} may import {top}")
            continue
        if src in ALLOWED and dst not in ALLOWED[src]:
            found.append(f"{imp}: {src or pkg} may import only {sorted(ALLOWED[src])}")
        if src in FORBIDDEN and dst in FORBIDDEN[src]:
            found.append(f"{imp}: {src} must not import {dst or pkg}")
        if dst == "cli" and src != "cli" and src != "__main__":
            found.append(f"{imp}: only cli/ and __main__ may import the cli")
        if dst == "web" and src not in ("web", "cli"):
            found.append(f"{imp}: only web/ and cli/ may import the web UI")
    return found


# --- the rules hold for commitfs --------------------------------------------------------
def test_import_rules_hold():
    assert violations(SRC) == []


def test_the_walk_sees_the_package():
    imports = list(iter_imports(SRC))
    modules = {i.module for i in imports}
    # Sanity: the walk really parses the layers it checks, lazy imports included.
    assert {"commitfs.repo.repository", "commitfs.ops.snapshot", "commitfs.storage.s3"} <= modules
    targets = {(i.module, i.target) for i in imports}
    assert ("commitfs.storage.s3", "boto3") in targets
    # imported inside a function:
    assert ("commitfs.storage.url", "commitfs.storage.s3.S3Store") in targets
    assert ("commitfs.repo.repository", "commitfs.repo.index.Index") in targets


def test_front_ends_load_neither_pyfuse3_nor_boto3():
    """Every command but mount works without pyfuse3; local repositories without boto3;
    and the CLI without the ui extra (commitfs ui imports it when it runs)."""
    code = (
        "import sys, commitfs, commitfs.api, commitfs.cli\n"
        "commitfs.cli.build_parser()\n"
        "print(sorted(m for m in ('pyfuse3', 'boto3', 'botocore', 'starlette', 'uvicorn', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the checker itself catches violations --------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "commitfs"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [p for p in root.rglob("*") if p.is_dir()] + [root]:
        (d / "__init__.py").touch()
    return root


def test_checker_catches_each_kind_of_violation(tmp_path):
    root = _package(tmp_path, {
        "errors.py": "",
        "model/ok.py": "from commitfs.errors import CommitfsError\nfrom . import ok\n",
        "model/bad.py": "def f():\n    from ..storage import base\n",
        "storage/base.py": "from commitfs import errors\n",
        "storage/bad.py": "import commitfs.repo.pack\nimport boto3\n",
        "storage/s3.py": "import boto3\nfrom botocore import exceptions\n",
        "repo/bad.py": "from commitfs.ops import fsck\n",
        "ops/bad.py": "from commitfs.vfs.core import x\nfrom commitfs.cli import main\nimport commitfs\n",
        "vfs/bad.py": "import pyfuse3\n",
        "vfs/worse.py": "from commitfs.ops.changeset import commit_draft\n",
        "fuse/ok.py": "import pyfuse3\nimport trio\n",
        "cli/__init__.py": "from .core import x\n",
        "cli/__main__.py": "from commitfs.cli import main\n",
        "__main__.py": "from commitfs.cli import main\n",
        "api.py": "from commitfs.cli.output import warn\n",
        "web/bad.py": "from commitfs.storage import base\nimport PIL.Image\n",
        "web/ok.py": "import starlette.routing\nfrom commitfs.ops import browse\nfrom commitfs.api import x\n",
        "cli/ui.py": "from commitfs.web.app import create_app\n",
        "ops/web.py": "from commitfs.web import app\nimport jinja2\n",
    })
    found = violations(root)
    by_file = sorted({v.split(":")[0] for v in found})
    assert by_file == ["api.py", "model/bad.py", "ops/bad.py", "ops/web.py", "repo/bad.py", "storage/bad.py",
                       "vfs/bad.py", "vfs/worse.py", "web/bad.py"]
    assert any("web/bad.py" in v and "web must not import storage" in v for v in found)
    assert any("web/bad.py" in v and "only ops/thumbnail.py may import PIL" in v for v in found)
    assert sum("ops/web.py" in v for v in found) == 3  # web (layer and web rule), jinja2
    assert any("storage/bad.py" in v and "boto3" in v for v in found)
    assert any("storage/bad.py" in v and "commitfs.repo.pack" in v for v in found)
    assert sum("ops/bad.py" in v for v in found) == 4  # vfs, cli (twice: layer and cli rule), the package
    assert any("vfs/bad.py" in v and "pyfuse3" in v for v in found)


@pytest.mark.parametrize("rel,text,target", [
    ("repo/x.py", "from . import pack", "commitfs.repo.pack"),
    ("repo/x.py", "from .pack import A", "commitfs.repo.pack"),
    ("repo/x.py", "from ..model.ids import A", "commitfs.model.ids"),
    ("repo/__init__.py", "from .pack import A", "commitfs.repo.pack"),
    ("api.py", "from .ops import browse", "commitfs.ops"),
])
def test_relative_imports_resolve(tmp_path, rel, text, target):
    root = _package(tmp_path, {rel: text})
    targets = {i.target for i in iter_imports(root) if i.path == rel}
    assert any(t == target or t.startswith(target + ".") for t in targets), targets
