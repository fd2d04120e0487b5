-- Runs once, as POSTGRES_USER in POSTGRES_DB, when the entrypoint initialises an EMPTY data volume.
-- An existing Immich volume never runs this: there the immich-zh-ai migrations (db/migrate.py) create
-- the same objects at service start-up (CREATE EXTENSION needs a superuser; Immich's default DB user is).
--
-- Everything goes into the zh_search schema (the default DB_SEARCH_SCHEMA_NAME), never into Immich's
-- public schema: Immich's start-up drift check reports foreign functions there, and zhparser's parser
-- functions are functions. The extension is relocatable, so SCHEMA puts them all in zh_search.
CREATE SCHEMA IF NOT EXISTS zh_search;
CREATE EXTENSION IF NOT EXISTS zhparser SCHEMA zh_search;

-- The text-search configuration the OCR documents use. Kept token types (SCWS part-of-speech initials):
-- a b d e f g h i j k l m n o q r s t v x z. Dropped: c conjunctions, p prepositions, u auxiliaries
-- (的 了 着), y modal particles and w punctuation: near-stop-words that only add noise; queries go
-- through the same configuration, so dropping them is symmetric. The simple dictionary only lower-cases.
-- Keep this list identical to ZHPARSER_TOKEN_TYPES in db/migrate.py.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_ts_config AS c JOIN pg_namespace AS n ON n.oid = c.cfgnamespace
                 WHERE n.nspname = 'zh_search' AND c.cfgname = 'zh_cn_ocr') THEN
    CREATE TEXT SEARCH CONFIGURATION zh_search.zh_cn_ocr (PARSER = zh_search.zhparser);
    ALTER TEXT SEARCH CONFIGURATION zh_search.zh_cn_ocr
      ADD MAPPING FOR a, b, d, e, f, g, h, i, j, k, l, m, n, o, q, r, s, t, v, x, z WITH simple;
  END IF;
END
$$;
