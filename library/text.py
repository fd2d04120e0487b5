"""OCR text of items, segmented by the db layer's SQL segmenter (zhparser or the CJK-bigram fallback).

Documents are built exactly like ``db``'s OCR documents: each line segmented on its own, positions
continuing across lines with a gap, so a phrase never spans two lines. Queries go through the db layer's
``build_queries`` (quoted lexemes; never raises on user input; exact matches ranked before fuzzy ones).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from db.search import sanitize_query_text
from db.settings import DbSearchSettings
from library.filters import NO_FILTERS, ItemFilters

# The db layer's query-building limits (its defaults; they bound the tsquery's size).
_QUERY = {
    name: DbSearchSettings.model_fields[name].default
    for name in (
        "max_query_tokens",
        "prefix_min_chars",
        "fuzzy_min_tokens",
        "fuzzy_max_tokens",
        "max_query_chars",
    )
}
MAX_DOCUMENT_CHARS = 20000


def store_ocr(conn: psycopg.Connection[Any], item_id: int, lines: list[str]) -> None:
    kept: list[str] = []
    budget = MAX_DOCUMENT_CHARS
    for line in lines:
        if budget <= 0:
            break
        kept.append(line[:budget])
        budget -= len(line)
    conn.execute(
        """WITH lines AS (
             SELECT l.line, l.ord FROM unnest(%s::text[]) WITH ORDINALITY AS l(line, ord)
           ), tok AS (
             SELECT l.ord, s.lexeme, s.pos FROM lines AS l CROSS JOIN LATERAL segment(l.line, false) AS s
             WHERE s.lexeme <> ''
           ), width AS (
             SELECT ord, max(pos) AS w FROM tok GROUP BY ord
           ), offsets AS (
             SELECT ord, coalesce(sum(w + 1) OVER (ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                    AS off
             FROM width
           ), lex AS (
             SELECT t.lexeme, string_agg(least(t.pos + f.off, 16383)::text, ',') AS positions
             FROM tok AS t JOIN offsets AS f USING (ord) GROUP BY t.lexeme
           )
           INSERT INTO ocr (item_id, content, doc)
           SELECT %s, %s, coalesce((SELECT string_agg(tsv_quote(lexeme) || ':' || positions, ' ') FROM lex),
                                   '')::tsvector
           ON CONFLICT (item_id) DO UPDATE SET content = excluded.content, doc = excluded.doc""",
        [kept, item_id, "\n".join(kept)],
    )


def search_ocr(
    conn: psycopg.Connection[Any], query: str, limit: int, filters: ItemFilters = NO_FILTERS
) -> list[tuple[int, float, bool]]:
    """(item_id, relevance, exact) of items whose OCR text matches ``query``, best first; blocked items
    excluded. ``exact``: the text holds every query term as written (else one segment is missing)."""
    cleaned = sanitize_query_text(query, int(_QUERY["max_query_chars"]))
    item_filter, filter_params = filters.clause(sql.Identifier("o", "item_id"))
    rows = conn.execute(
        sql.SQL(
            """SELECT o.item_id, ts_rank(o.doc, q.match_query) AS rank, o.doc @@ q.strict_query AS exact
               FROM build_queries(%s, %s, %s, %s, %s) AS q
               JOIN ocr AS o ON o.doc @@ q.match_query
               WHERE NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = o.item_id) AND {item_filter}
               ORDER BY exact DESC, rank DESC, o.item_id
               LIMIT %s"""
        ).format(item_filter=item_filter),
        [
            cleaned,
            _QUERY["max_query_tokens"],
            _QUERY["prefix_min_chars"],
            _QUERY["fuzzy_min_tokens"],
            _QUERY["fuzzy_max_tokens"],
            *filter_params,
            limit,
        ],
    ).fetchall()
    return [(int(r[0]), float(r[1]), bool(r[2])) for r in rows]
