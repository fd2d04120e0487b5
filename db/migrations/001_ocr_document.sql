-- 001: per-asset OCR documents derived from Immich's asset_ocr rows, and the SQL they are built with.
--
-- Runs inside one transaction with search_path = <our schema>, <Immich's schema>, public, pg_temp (set by
-- db/migrate.py), so every CREATE below lands in OUR schema and every unqualified reference to asset_ocr,
-- asset, ... resolves to Immich's tables. Nothing here alters an Immich table; the triggers that attach to
-- asset_ocr are created by install_triggers() (called by the runner on every start, because Immich may
-- recreate its tables).

DO $$
BEGIN
  -- normalize() and the \u escapes in the regular expressions below only work on UTF-8 databases.
  IF current_setting('server_encoding') <> 'UTF8' THEN
    RAISE EXCEPTION 'zh_search needs a UTF8 database (server_encoding is %)', current_setting('server_encoding');
  END IF;
END
$$;

-- Key/value settings that must be shared by every writer of documents (Immich's sessions fire our
-- triggers, so these cannot come from the Python process). Written by the runner from DbSearchSettings.
CREATE TABLE config (
  key   text PRIMARY KEY,
  value text NOT NULL
);

CREATE TABLE ocr_document (
  asset_id   uuid PRIMARY KEY,              -- Immich asset."id"; no FK on purpose: an FK from us to Immich's
                                            -- table would make Immich's own DROP/ALTER migrations fail
  doc        tsvector NOT NULL,             -- segmented, positioned lexemes of the visible OCR lines
  content    text NOT NULL,                 -- the visible lines in reading order, newline separated
  line_count integer NOT NULL,
  segmenter  text NOT NULL,                 -- segmenter_name() that built doc (rebuild when it changes)
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ocr_document_doc_idx ON ocr_document USING gin (doc);

-- Assets whose document could not be refreshed inside an Immich transaction (the trigger never lets an
-- error reach Immich); db.sync rebuilds them.
CREATE TABLE stale_document (
  asset_id uuid PRIMARY KEY,
  noted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION cfg_int(p_key text, p_default integer) RETURNS integer
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN coalesce((SELECT value::integer FROM config WHERE key = p_key), p_default);

-- Text normal form shared by documents and queries: compatibility forms folded (full-width ＡＢ１２ -> AB12,
-- ideographic space -> space, ligatures split), Latin diacritics dropped (café -> cafe; done by stripping
-- U+0300..U+036F between NFKD and NFKC so Hangul and kana voicing marks recompose intact), lower case.
CREATE FUNCTION norm_text(p_text text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN lower(normalize(regexp_replace(normalize(p_text, NFKD), '[\u0300-\u036f]', '', 'g'), NFKC));

-- Quote one lexeme for tsvector/tsquery input: inside single quotes only ' and \ are special.
CREATE FUNCTION tsv_quote(p_lexeme text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '''' || replace(replace(p_lexeme, E'\\', E'\\\\'), '''', '''''') || '''';

-- The fallback segmenter (plain PostgreSQL): Immich's tokenizeForSearch idea with positions.
--  * a run of CJK characters (Han incl. Ext A and the supplementary planes, kana, Hangul syllables, 々 〇)
--    gives its overlapping bigrams at consecutive positions, or the character itself for a run of one;
--  * every other run of letters/digits is one lower-cased word (punctuation, symbols, emoji separate words;
--    the class is spelled out in code points so it does not depend on the database's locale);
--  * documents (p_for_query = false) also get the LAST character of each multi-character CJK run as a
--    unigram at the position of the last bigram, so that every character of the text is the first
--    character of some lexeme: a one-character query then matches as a prefix query ('京':*), and a query
--    phrase still lines up position by position.
-- A query phrase of consecutive bigrams ('北京' <-> '京天') is therefore an exact substring test.
CREATE FUNCTION seg_bigram(p_text text, p_for_query boolean)
RETURNS TABLE (lexeme text, pos integer, is_cjk boolean)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  WITH m AS (
    SELECT r.ord,
           r.m[1] AS cjk,
           left(r.m[2], 100) AS word,   -- lexemes are capped at 100 chars (tsvector allows < 2 KB)
           CASE WHEN r.m[1] IS NULL THEN 1 ELSE greatest(length(r.m[1]) - 1, 1) END AS width
    FROM regexp_matches(
           norm_text(coalesce(p_text, '')),
           '([\u3005\u3007\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f]+)'
           '|([^\u3005\u3007\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f'
           '\u0001-\u002f\u003a-\u0040\u005b-\u0060\u007b-\u00bf\u00d7\u00f7\u2000-\u2bff\u3000-\u3004\u3006\u3008-\u303f'
           '\ue000-\uf8ff\ufe00-\ufe6f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\ufff0-\uffff'
           '\U0001f000-\U0001faff\U000e0000-\U000e007f]+)',
           'g') WITH ORDINALITY AS r(m, ord)
  ), p AS (
    SELECT cjk, word, (sum(width) OVER (ORDER BY ord) - width + 1)::integer AS start FROM m
  )
  SELECT word, start, false FROM p WHERE word IS NOT NULL
  UNION ALL
  SELECT substr(cjk, i, 2), start + i - 1, true
    FROM p CROSS JOIN LATERAL generate_series(1, length(cjk) - 1) AS i
   WHERE length(cjk) > 1
  UNION ALL
  SELECT cjk, start, true FROM p WHERE length(cjk) = 1
  UNION ALL
  SELECT right(cjk, 1), start + length(cjk) - 2, true FROM p WHERE NOT p_for_query AND length(cjk) > 1
$$;

-- The active segmenter. db/sql/segmenter_*.sql replace these two functions when the mode changes (the
-- runner then rebuilds every document). Kept as plain SQL functions without SET clauses so the planner can
-- inline them into the set-based document builder.
CREATE FUNCTION segment(p_text text, p_for_query boolean)
RETURNS TABLE (lexeme text, pos integer, is_cjk boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT s.lexeme, s.pos, s.is_cjk FROM seg_bigram(p_text, p_for_query) AS s
$$;

-- STABLE, not IMMUTABLE: an immutable call would be folded into cached plans as a constant, and this
-- function's value changes when the segmenter is switched.
CREATE FUNCTION segmenter_name() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN 'bigram-1';

-- Any text -> valid tsqueries, or NULLs when it holds nothing searchable. Never raises on user input: every
-- lexeme is quoted by tsv_quote, and the operators between them are ours.
--  * the query is split at white space into terms; terms are AND-ed;
--  * inside a term the lexemes are joined with <-> by the bigram segmenter (the term must occur as written,
--    like a substring search) and with & by zhparser (its segmentation of a short query can differ from
--    that of the same words in a longer text, so adjacency would lose matches);
--  * Latin/number lexemes of at least p_prefix_min characters, and lone CJK characters of the bigram
--    segmenter, match as prefixes;
--  * at most p_max_tokens lexemes are used (in reading order).
-- strict_query is that; match_query additionally accepts, for a term of p_fuzzy_min..p_fuzzy_max lexemes,
-- a text holding all but one of them anywhere (增值税发票 finds 增值税专用发票: only 税发 is missing).
-- Searches match with match_query (one GIN scan) and rank strict matches first.
CREATE FUNCTION build_queries(p_query text, p_max_tokens integer, p_prefix_min integer,
                              p_fuzzy_min integer, p_fuzzy_max integer)
RETURNS TABLE (strict_query tsquery, match_query tsquery)
LANGUAGE sql STABLE PARALLEL SAFE SET search_path FROM CURRENT AS $$
  WITH terms AS (
    SELECT t.term, t.ord
    FROM regexp_split_to_table(norm_text(coalesce(p_query, '')), '\s+') WITH ORDINALITY AS t(term, ord)
    WHERE t.term <> ''
  ), toks AS (
    SELECT t.ord, s.lexeme, s.pos, s.is_cjk
    FROM terms AS t CROSS JOIN LATERAL segment(t.term, true) AS s
    WHERE s.lexeme <> ''
  ), numbered AS (
    SELECT toks.*, row_number() OVER (ORDER BY ord, pos, lexeme) AS n FROM toks
  ), per_term AS (
    SELECT ord,
           array_agg(
             tsv_quote(lexeme)
               || CASE WHEN (is_cjk AND length(lexeme) = 1 AND segmenter_name() LIKE 'bigram%')
                         OR (NOT is_cjk AND length(lexeme) >= p_prefix_min)
                       THEN ':*' ELSE '' END
             ORDER BY pos, lexeme) AS items
    FROM numbered
    WHERE n <= greatest(p_max_tokens, 1)
    GROUP BY ord
  ), exprs AS (
    SELECT ord,
           '(' || array_to_string(items, CASE WHEN segmenter_name() LIKE 'bigram%' THEN ' <-> ' ELSE ' & ' END)
               || ')' AS strict_expr,
           CASE WHEN p_fuzzy_min > 0 AND cardinality(items) BETWEEN greatest(p_fuzzy_min, 2) AND p_fuzzy_max THEN
             (SELECT string_agg('(' || array_to_string(items[:j - 1] || items[j + 1:], ' & ') || ')', ' | ')
                FROM generate_series(1, cardinality(items)) AS j)
           END AS fuzzy_expr
    FROM per_term
  )
  SELECT string_agg(strict_expr, ' & ' ORDER BY ord)::tsquery,
         string_agg(CASE WHEN fuzzy_expr IS NULL THEN strict_expr
                         ELSE '(' || strict_expr || ' | ' || fuzzy_expr || ')' END, ' & ' ORDER BY ord)::tsquery
  FROM exprs
$$;

-- Rebuild (or drop) the documents of the given assets from their visible asset_ocr rows, set-based.
-- Lines are read in reading order (top to bottom, then left to right); positions continue across lines
-- with a gap of one, so a phrase never spans two OCR lines (Immich's bigrams never cross lines either).
-- Serialised per asset with transaction-scoped advisory locks so that a backfill batch and Immich's own
-- write of the same asset cannot interleave and leave an outdated document behind.
CREATE FUNCTION refresh_documents(p_ids uuid[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
  v_max_chars integer := cfg_int('max_document_chars', 20000);
  v_lock_class integer := hashtext(current_schema() || '.ocr_document');
  v_count integer;
BEGIN
  IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
    RETURN 0;
  END IF;

  -- A fixed order (by key) so that two transactions locking overlapping sets cannot deadlock.
  PERFORM pg_advisory_xact_lock(v_lock_class, s.k)
  FROM (SELECT DISTINCT hashtext(x::text) AS k FROM unnest(p_ids) AS x ORDER BY 1) AS s;

  WITH lines AS (
    SELECT o."assetId" AS asset_id,
           o."text" AS line,
           row_number() OVER (PARTITION BY o."assetId" ORDER BY o.y1, o.x1, o.id) AS ord
    FROM asset_ocr AS o
    WHERE o."assetId" = ANY (p_ids) AND o."isVisible"
  ), budget AS (
    SELECT lines.*,
           sum(length(line)) OVER (PARTITION BY asset_id ORDER BY ord) - length(line) AS before
    FROM lines
  ), kept AS (
    SELECT asset_id, ord, left(line, (v_max_chars - before)::integer) AS line
    FROM budget
    WHERE before < v_max_chars
  ), tok AS (
    SELECT k.asset_id, k.ord, s.lexeme, s.pos
    FROM kept AS k CROSS JOIN LATERAL segment(k.line, false) AS s
    WHERE s.lexeme <> ''
  ), width AS (
    SELECT asset_id, ord, max(pos) AS w FROM tok GROUP BY asset_id, ord
  ), offsets AS (
    SELECT asset_id, ord,
           coalesce(sum(w + 1) OVER (PARTITION BY asset_id ORDER BY ord
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS off
    FROM width
  ), lex AS (
    SELECT t.asset_id, t.lexeme,
           string_agg(least(t.pos + f.off, 16383)::text, ',') AS positions
    FROM tok AS t JOIN offsets AS f USING (asset_id, ord)
    GROUP BY t.asset_id, t.lexeme
  ), docs AS (
    SELECT asset_id, string_agg(tsv_quote(lexeme) || ':' || positions, ' ')::tsvector AS doc
    FROM lex GROUP BY asset_id
  ), contents AS (
    SELECT asset_id, string_agg(line, E'\n' ORDER BY ord) AS content, count(*)::integer AS n
    FROM kept GROUP BY asset_id
  ), upserted AS (
    INSERT INTO ocr_document AS d (asset_id, doc, content, line_count, segmenter, updated_at)
    SELECT c.asset_id, coalesce(x.doc, ''::tsvector), c.content, c.n, segmenter_name(), clock_timestamp()
    FROM contents AS c LEFT JOIN docs AS x USING (asset_id)
    ON CONFLICT (asset_id) DO UPDATE
      SET doc = excluded.doc, content = excluded.content, line_count = excluded.line_count,
          segmenter = excluded.segmenter, updated_at = excluded.updated_at
    RETURNING 1
  )
  SELECT count(*) INTO v_count FROM upserted;

  DELETE FROM ocr_document AS d
  WHERE d.asset_id = ANY (p_ids)
    AND NOT EXISTS (SELECT 1 FROM asset_ocr AS o WHERE o."assetId" = d.asset_id AND o."isVisible");

  DELETE FROM stale_document WHERE asset_id = ANY (p_ids);
  RETURN v_count;
END
$$;

-- Statement-level trigger on Immich's asset_ocr (INSERT / UPDATE / DELETE, incl. FK cascades from asset).
-- SECURITY DEFINER so Immich's role needs no rights on our schema; fixed search_path (pg_temp last) as
-- every security definer function must have. An error here must never fail Immich's OCR job: it is
-- downgraded to a WARNING and the assets are queued in stale_document for db.sync.
CREATE FUNCTION on_asset_ocr_rows() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
  v_ids uuid[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT array_agg(DISTINCT n."assetId") INTO v_ids FROM zh_new AS n;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(DISTINCT o."assetId") INTO v_ids FROM zh_old AS o;
  ELSE
    SELECT array_agg(DISTINCT u.id) INTO v_ids
    FROM (SELECT n."assetId" AS id FROM zh_new AS n UNION SELECT o."assetId" FROM zh_old AS o) AS u;
  END IF;

  IF v_ids IS NOT NULL THEN
    BEGIN
      PERFORM refresh_documents(v_ids);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'zh_search: OCR document refresh failed (%: %); % asset(s) queued for db.sync',
        SQLSTATE, SQLERRM, cardinality(v_ids);
      BEGIN
        INSERT INTO stale_document (asset_id) SELECT unnest(v_ids) ON CONFLICT (asset_id) DO NOTHING;
      EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'zh_search: could not queue stale documents (%: %)', SQLSTATE, SQLERRM;
      END;
    END;
  END IF;
  RETURN NULL;
END
$$;

-- Immich's "OCR queue all (force)" truncates asset_ocr: drop every document with it. DELETE rather than
-- TRUNCATE so concurrent searches are never blocked behind an ACCESS EXCLUSIVE lock.
CREATE FUNCTION on_asset_ocr_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
  BEGIN
    DELETE FROM ocr_document;
    DELETE FROM stale_document;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'zh_search: could not clear OCR documents after TRUNCATE (%: %)', SQLSTATE, SQLERRM;
  END;
  RETURN NULL;
END
$$;

-- Trigger names carry our schema name so two installations in different schemas cannot collide.
CREATE FUNCTION trigger_names() RETURNS TABLE (name text, event text)
LANGUAGE sql IMMUTABLE SET search_path FROM CURRENT AS $$
  VALUES (current_schema() || '_ocr_insert', 'INSERT'),
         (current_schema() || '_ocr_update', 'UPDATE'),
         (current_schema() || '_ocr_delete', 'DELETE'),
         (current_schema() || '_ocr_truncate', 'TRUNCATE')
$$;

-- Attach the triggers to <p_immich_schema>.asset_ocr when missing; returns how many were created.
-- Idempotent, and only touches the catalogue (and takes asset_ocr's SHARE ROW EXCLUSIVE lock) when a
-- trigger is actually missing, so a normal start-up never waits on Immich's writers.
CREATE FUNCTION install_triggers(p_immich_schema text) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
  v_table regclass := to_regclass(format('%I.asset_ocr', p_immich_schema));
  v_created integer := 0;
  v_name text;
  v_event text;
BEGIN
  IF v_table IS NULL THEN
    RAISE EXCEPTION 'table %.asset_ocr not found: is this an Immich (>= 2.x) database?', p_immich_schema;
  END IF;
  FOR v_name, v_event IN SELECT t.name, t.event FROM trigger_names() AS t LOOP
    CONTINUE WHEN EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = v_table AND tgname = v_name);
    IF v_event = 'TRUNCATE' THEN
      EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %I.on_asset_ocr_truncate()',
                     v_name, v_table, current_schema());
    ELSE
      EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT '
                     'EXECUTE FUNCTION %I.on_asset_ocr_rows()',
                     v_name, v_event, v_table,
                     CASE v_event WHEN 'INSERT' THEN 'NEW TABLE AS zh_new'
                                  WHEN 'DELETE' THEN 'OLD TABLE AS zh_old'
                                  ELSE 'OLD TABLE AS zh_old NEW TABLE AS zh_new' END,
                     current_schema());
    END IF;
    v_created := v_created + 1;
  END LOOP;
  RETURN v_created;
END
$$;

CREATE FUNCTION uninstall_triggers(p_immich_schema text) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
  v_table regclass := to_regclass(format('%I.asset_ocr', p_immich_schema));
  v_dropped integer := 0;
  v_name text;
BEGIN
  IF v_table IS NULL THEN
    RETURN 0;
  END IF;
  FOR v_name IN SELECT t.name FROM trigger_names() AS t LOOP
    CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = v_table AND tgname = v_name);
    EXECUTE format('DROP TRIGGER %I ON %s', v_name, v_table);
    v_dropped := v_dropped + 1;
  END LOOP;
  RETURN v_dropped;
END
$$;
