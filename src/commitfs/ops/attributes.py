"""The attributes file: per-glob defaults committed with the data, at ``.commitfs/attributes``.

Format (UTF-8 text, one rule per line)::

    # comment lines and blank lines are ignored
    labels/*.csv     merge=rows   key=image_id
    meta/**.jsonl    key=split,image_id
    weights/*.bin    merge=ours

A line is a glob, then ``NAME=VALUE`` attributes separated by white space:

* ``merge``: how a conflict at a matching path is resolved: ``ours``,
  ``theirs`` or ``rows`` (a row-level merge of a table);
* ``key``: the key columns of a table, comma-separated (its rows are matched
  by key in a merge, and by the row diff).

Globs match whole paths: ``*`` and ``?`` stay within one path segment,
``**`` crosses segments, ``[...]`` is a character class; a glob without
``/`` matches the last segment (``*.csv`` matches every CSV file).  For each
attribute the first matching line that sets it wins, as ``--rule`` and
``--key`` on the command line do (which come before the file's lines).
Anything else (an unknown attribute or value, a line without attributes, a
file that is not UTF-8) is an AttributesError naming the line; a merge then
stops before moving anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from commitfs.errors import AttributesError

PATH = ".commitfs/attributes"
MERGE_VALUES = ("ours", "theirs", "rows")
#: Bound on the file (it is read whole, by every merge).
MAX_SIZE = 1 << 20


@lru_cache(maxsize=1024)
def _regex(glob: str) -> re.Pattern:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            if i < len(glob) and glob[i] == "/":
                out[-1] = "(?:.*/)?"
                i += 1
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(glob: str, path: str) -> bool:
    """Does ``glob`` match ``path`` ('a/b/c.csv'), with the rules of the module doc?"""
    target = path if "/" in glob.strip("/") else path.rsplit("/", 1)[-1]
    try:
        return _regex(glob.strip("/")).match(target) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class Rule:
    glob: str
    merge: str | None = None
    key: tuple[str, ...] = ()
    line: int = 0


@dataclass
class Attributes:
    rules: list[Rule] = field(default_factory=list)

    def merge_for(self, path: str) -> str | None:
        for r in self.rules:
            if r.merge is not None and glob_match(r.glob, path):
                return r.merge
        return None

    def key_for(self, path: str) -> tuple[str, ...]:
        for r in self.rules:
            if r.key and glob_match(r.glob, path):
                return r.key
        return ()


def parse(data: bytes, where: str = PATH) -> Attributes:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AttributesError(f"{where}: not UTF-8 text") from None
    rules = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        glob, *attrs = line.split()
        if not attrs:
            raise AttributesError(f"{where}, line {n}: {glob!r} has no attributes (expected NAME=VALUE after it)")
        merge, key = None, ()
        for a in attrs:
            name, sep, value = a.partition("=")
            if not sep or not value:
                raise AttributesError(f"{where}, line {n}: expected NAME=VALUE, got {a!r}")
            if name == "merge":
                if value not in MERGE_VALUES:
                    raise AttributesError(f"{where}, line {n}: merge={value!r}: expected one of "
                                          f"{', '.join(MERGE_VALUES)}")
                merge = value
            elif name == "key":
                cols = tuple(c for c in value.split(","))
                if any(not c for c in cols):
                    raise AttributesError(f"{where}, line {n}: key={value!r}: an empty column name")
                key = cols
            else:
                raise AttributesError(f"{where}, line {n}: unknown attribute {name!r} (known: merge, key)")
        rules.append(Rule(glob, merge, key, n))
    return Attributes(rules)


def load(repo, tree_id: bytes | None) -> Attributes:
    """The attributes file of tree ``tree_id`` (empty when it has none)."""
    if tree_id is None:
        return Attributes()
    d = repo.load_tree(tree_id).get(".commitfs")
    if d is None or not d.is_dir:
        return Attributes()
    e = repo.load_tree(d.id).get("attributes")
    if e is None or not e.kind.is_file:
        return Attributes()
    if e.size > MAX_SIZE:
        raise AttributesError(f"{PATH}: {e.size} bytes, more than the {MAX_SIZE} an attributes file may hold")
    return parse(bytes(repo.load_file(e.id)))
