-- Switch the active segmenter to zhparser (SCWS word segmentation). This is the ONLY zhparser-specific SQL
-- of the project besides the text-search configuration created by db/migrate.py. {config} is the
-- schema-qualified configuration name as a string literal, filled in by the runner with psycopg.sql.
-- Lexemes are what the configuration's mapping keeps (lower-cased by the simple dictionary); positions
-- are zhparser's, so the generic builders in 001 (documents, tsqueries) work unchanged.
CREATE OR REPLACE FUNCTION segment(p_text text, p_for_query boolean)
RETURNS TABLE (lexeme text, pos integer, is_cjk boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT left(t.lexeme, 100),
         p::integer,
         t.lexeme ~ '[\u3005\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]'
  FROM unnest(to_tsvector({config}::regconfig, norm_text(coalesce(p_text, '')))) AS t
  CROSS JOIN LATERAL unnest(t.positions) AS p
$$;

CREATE OR REPLACE FUNCTION segmenter_name() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN 'zhparser-1';
