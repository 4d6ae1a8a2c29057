"""The lineage page's graph: upstream inputs to the left, the commit in the
middle, downstream commits to the right, drawn as SVG with a link on every
node.  Layout is one column per level (a layered drawing), enough for the
handful to hundreds of nodes lineage has."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from commitfs.ops.lineage import RepositoryOpener
from commitfs.ops.lineage_index import LineageReport, query_lineage
from commitfs.web.app import url_for

COL_W, ROW_H, BOX_W, BOX_H = 230, 64, 200, 46


def lineage_report(repo, rev: str, search) -> LineageReport:
    cid = repo.resolve(rev)
    with RepositoryOpener(known=[repo] + list(search or [])) as opener:
        return query_lineage(repo, cid, opener, search)


@dataclass
class Node:
    key: str
    label: str
    sub: str
    href: str | None
    level: int
    kind: str                  # "self", "up", "down", "missing"
    row: int = 0
    title: str = ""
    edges: list[str] = field(default_factory=list)


def _href(here: str, url: str | None, cid: str) -> str | None:
    return url_for("commit", cid) if url == here else None


def layout(report: LineageReport, here: str) -> list[Node]:
    nodes: dict[str, Node] = {}
    me = report.commit.hex()
    nodes[me] = Node(me, me[:12], report.summary or "", url_for("commit", me), 0, "self",
                     title=f"{report.repo}@{me}")

    def up(items, level: int, child: str):
        for n in items:
            cid = n.input.commit.hex()
            if cid not in nodes:
                label = (n.input.name + ": " if n.input.name else "") + cid[:12] + (f" ({n.input.rev})" if n.input.rev else "")
                nodes[cid] = Node(cid, label, n.summary or (n.error or "")[:40],
                                  _href(here, n.repo, cid), level, "missing" if n.error else "up",
                                  title=f"{n.repo or n.input.url}@{cid}" + (f" ({n.error})" if n.error else ""))
            nodes[cid].edges.append(child)
            up(n.inputs, level - 1, cid)

    def down(items, level: int, parent: str):
        for n in items:
            cid = n.commit.hex()
            if cid not in nodes:
                nodes[cid] = Node(cid, (n.name + " → " if n.name else "") + cid[:12], n.summary or "",
                                  _href(here, n.repo, cid), level, "down", title=f"{n.repo}@{cid}")
            nodes[parent].edges.append(cid)
            down(n.downstream, level + 1, cid)

    up(report.upstream, -1, me)
    down(report.downstream, 1, me)
    rows: dict[int, int] = {}
    for n in nodes.values():
        n.row = rows.get(n.level, 0)
        rows[n.level] = n.row + 1
    return list(nodes.values())


def draw(report: LineageReport, here: str) -> str:
    nodes = layout(report, here)
    lo = min(n.level for n in nodes)
    hi = max(n.level for n in nodes)
    tallest = max(sum(1 for n in nodes if n.level == lv) for lv in range(lo, hi + 1))
    width = (hi - lo + 1) * COL_W + 20
    height = tallest * ROW_H + 20
    pos = {n.key: (10 + (n.level - lo) * COL_W, 10 + n.row * ROW_H) for n in nodes}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#667"/></marker></defs>']
    for n in nodes:
        x, y = pos[n.key]
        for target in n.edges:
            tx, ty = pos[target]
            x1, y1, x2, y2 = x + BOX_W, y + BOX_H / 2, tx, ty + BOX_H / 2
            mid = (x1 + x2) / 2
            out.append(f'<path class="edge" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}" fill="none" '
                       f'stroke="#667" stroke-width="1.5" marker-end="url(#arrow)"/>')
    fill = {"self": "#ffe9a8", "up": "#dcebff", "down": "#dff5e1", "missing": "#f6d6d6"}
    for n in nodes:
        x, y = pos[n.key]
        box = (f'<g class="node {n.kind}" data-commit="{n.key}"><title>{escape(n.title)}</title>'
               f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill[n.kind]}" stroke="#556"/>'
               f'<text x="{x + 8}" y="{y + 19}" font-family="monospace" font-size="13">{escape(n.label[:26])}</text>'
               f'<text x="{x + 8}" y="{y + 37}" font-size="11" fill="#444">{escape(n.sub[:32])}</text></g>')
        out.append(f'<a href="{escape(n.href)}">{box}</a>' if n.href else box)
    out.append("</svg>")
    return "\n".join(out)
