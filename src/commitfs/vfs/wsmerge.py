"""The merge in progress of a workspace (vfs/workspace.py): shown as pending edits.

A merge's result tree is shown over the base commit and its state (JSON from
the control channel) is kept in the overlay, in the same transaction as the
tree, so it survives a remount.
"""

from __future__ import annotations


class MergeState:
    """The merge in progress of WorkspaceFS (a mixin: the state lives there)."""

    @property
    def merge_state(self) -> str | None:
        """The merge in progress (JSON from the control channel), or None."""
        return self.overlay.merge

    async def show_merge(self, tree_id: bytes, state: str) -> list[int]:
        """Show tree ``tree_id`` (a merge's result) as pending edits over the base and
        record ``state`` with it, in one transaction (call inside ``paused``, on a
        workspace without edits); inodes to invalidate."""
        return await self._rebase_onto(self.base, clear=True, tree=tree_id, merge=state)

