"""Filters on items, shared by every search (PDQ, CLIP, OCR text, video frames): where an item came from,
when it was added, its dataId, the folder it lives in, its NSFW score, its tags and
the people it shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg import sql


@dataclass(frozen=True)
class ItemFilters:
    source: Literal["path", "url", "upload"] | None = None
    added_after: datetime | None = None
    added_before: datetime | None = None
    data_id: str | None = None
    location_prefix: str | None = None  # a folder (path items) or URL prefix
    nsfw_max: float | None = None  # leave out items scored above; items without a score (no nsfw step) stay
    tag: str | None = None  # only items with this tag (its English key)
    person_id: int | None = None  # only items showing this person (library.people)

    def clause(self, item_id: sql.Composable) -> tuple[sql.Composable, list[Any]]:
        """``TRUE`` or ``EXISTS (…item… )`` for the item whose id is ``item_id``; parameters in order."""
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if self.source is not None:
            conditions.append(sql.SQL("i.source = %s"))
            params.append(self.source)
        if self.added_after is not None:
            conditions.append(sql.SQL("i.created_at >= %s"))
            params.append(self.added_after)
        if self.added_before is not None:
            conditions.append(sql.SQL("i.created_at < %s"))
            params.append(self.added_before)
        if self.data_id is not None:
            conditions.append(sql.SQL("i.data_id = %s"))
            params.append(self.data_id)
        if self.location_prefix:
            # starts_with, not LIKE: a '%' or '_' in a folder name is literal.
            conditions.append(sql.SQL("starts_with(i.location, %s)"))
            params.append(self.location_prefix)
        if self.nsfw_max is not None:
            conditions.append(sql.SQL("NOT EXISTS (SELECT 1 FROM nsfw AS n WHERE n.item_id = i.id AND n.score > %s)"))
            params.append(self.nsfw_max)
        if self.tag is not None:
            conditions.append(sql.SQL("EXISTS (SELECT 1 FROM item_tag AS t WHERE t.item_id = i.id AND t.tag = %s)"))
            params.append(self.tag)
        if self.person_id is not None:
            conditions.append(sql.SQL("EXISTS (SELECT 1 FROM face AS f WHERE f.item_id = i.id AND f.person_id = %s)"))
            params.append(self.person_id)
        if not conditions:
            return sql.SQL("TRUE"), []
        where = sql.SQL(" AND ").join(conditions)
        return sql.SQL("EXISTS (SELECT 1 FROM item AS i WHERE i.id = {} AND {})").format(item_id, where), params


NO_FILTERS = ItemFilters()
