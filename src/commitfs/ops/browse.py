"""Paths inside commits: resolve REV:PATH, list, walk, open files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from commitfs.errors import IsADirectoryError_, NotADirectoryError_, PathNotFoundError
from commitfs.model.objects import Kind, Tree, TreeEntry
from commitfs.model.splittree import SplitTree
from commitfs.repo.reader import FileObject, FileReader
from commitfs.repo.repository import Repository
from commitfs.repo.treewalk import check_expansion


def split_rev_path(spec: str) -> tuple[str, str]:
    """'REV:PATH' -> (REV, PATH); 'REV' -> (REV, '')."""
    rev, sep, path = spec.partition(":")
    return rev, path.strip("/") if sep else ""


def root_entry(repo: Repository, commit_id: bytes) -> TreeEntry:
    commit = repo.load_commit(commit_id)
    tree = repo.load_tree(commit.tree)
    return TreeEntry("", Kind.DIR, tree.size, commit.tree)


def lookup_path(repo: Repository, commit_id: bytes, path: str) -> TreeEntry:
    """The entry at ``path`` ('' is the root); raise PathNotFoundError."""
    entry = root_entry(repo, commit_id)
    walked = []
    for part in [p for p in path.split("/") if p]:
        if not entry.is_dir:
            raise NotADirectoryError_(f"{'/'.join(walked)} is not a directory in {commit_id.hex()[:12]}")
        child = repo.load_tree(entry.id).get(part)
        walked.append(part)
        if child is None:
            raise PathNotFoundError(f"{'/'.join(walked)}: no such path in commit {commit_id.hex()[:12]}")
        entry = child
    return entry


@dataclass(frozen=True)
class WalkItem:
    path: str
    entry: TreeEntry


def walk_tree(repo: Repository, tree_id: bytes, prefix: str = "") -> Iterator[WalkItem]:
    """Every entry below a tree, depth first, in name order; ExpansionLimitError
    (before the first) if shared subtrees multiply its paths beyond the bound
    of repo.treewalk."""
    check_expansion(repo, tree_id)
    yield from _walk_tree(repo, tree_id, prefix)


def _walk_tree(repo: Repository, tree_id: bytes, prefix: str) -> Iterator[WalkItem]:
    tree: Tree = repo.load_tree(tree_id)
    for e in tree.entries:
        path = f"{prefix}/{e.name}" if prefix else e.name
        yield WalkItem(path, e)
        if e.is_dir:
            yield from _walk_tree(repo, e.id, path)


def walk(repo: Repository, commit_id: bytes, path: str = "") -> Iterator[WalkItem]:
    entry = lookup_path(repo, commit_id, path)
    if not entry.is_dir:
        yield WalkItem(path, entry)
        return
    yield from walk_tree(repo, entry.id, path)


def list_dir(repo: Repository, commit_id: bytes, path: str = "") -> list[WalkItem]:
    entry = lookup_path(repo, commit_id, path)
    if not entry.is_dir:
        return [WalkItem(path, entry)]
    return [WalkItem(f"{path}/{e.name}" if path else e.name, e) for e in repo.load_tree(entry.id).entries]


def open_file(repo: Repository, commit_id: bytes, path: str) -> FileObject:
    entry = lookup_path(repo, commit_id, path)
    if entry.is_dir:
        raise IsADirectoryError_(f"{path or '/'} is a directory")
    if entry.kind is Kind.SYMLINK:
        raise PathNotFoundError(f"{path} is a symlink to {entry.target.decode(errors='replace')}")
    return FileObject(FileReader.open(repo, entry.id), name=path)


@dataclass(frozen=True)
class DirPage:
    """One page of a directory's entries, in name order (``offset`` counts matching entries)."""

    path: str
    items: list[WalkItem]
    offset: int
    limit: int
    total: int      # entries that match (all of them without a filter)

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.items)
        return end if end < self.total else None

    @property
    def prev_offset(self) -> int | None:
        return max(0, self.offset - self.limit) if self.offset > 0 else None


def list_page(repo: Repository, commit_id: bytes, path: str = "", offset: int = 0, limit: int = 200,
              match=None) -> DirPage:
    """Entries [offset, offset+limit) of the directory at ``path`` (``match(entry)``
    keeps only some): a page of a 100k-entry directory makes ``limit`` items, not
    100k.  Raise NotADirectoryError_ for a file."""
    entry = lookup_path(repo, commit_id, path)
    if not entry.is_dir:
        raise NotADirectoryError_(f"{path} is not a directory in {commit_id.hex()[:12]}")
    tree = repo.load_tree(entry.id)
    offset = max(0, offset)
    prefix = f"{path}/" if path else ""
    if match is None and isinstance(tree, SplitTree):
        # A split directory (docs/FORMAT.md, "Split trees"): the page's leaf chunks only.
        picked: list = []
        pos, total = offset, tree.count
        while len(picked) < limit and pos < total:
            base, leaf = tree.leaf_at(pos)
            got = leaf.entries[pos - base:pos - base + limit - len(picked)]
            picked.extend(got)
            pos += len(got)
        return DirPage(path, [WalkItem(prefix + e.name, e) for e in picked], offset, limit, total)
    entries = tree.entries
    if match is not None:
        entries = [e for e in entries if match(e)]
    chosen = entries[offset:offset + limit]
    return DirPage(path, [WalkItem(prefix + e.name, e) for e in chosen], offset, limit, len(entries))
