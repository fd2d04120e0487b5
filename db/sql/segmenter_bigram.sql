-- Switch the active segmenter to the built-in bigram fallback (plain PostgreSQL, no extension).
-- Run by db/migrate.py with search_path = <our schema>, <Immich's schema>, public, pg_temp; the runner then
-- rebuilds every document whose segmenter column differs from segmenter_name().
CREATE OR REPLACE FUNCTION segment(p_text text, p_for_query boolean)
RETURNS TABLE (lexeme text, pos integer, is_cjk boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT s.lexeme, s.pos, s.is_cjk FROM seg_bigram(p_text, p_for_query) AS s
$$;

CREATE OR REPLACE FUNCTION segmenter_name() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN 'bigram-1';
