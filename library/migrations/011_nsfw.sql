-- 011: NSFW scores of the 'nsfw' step (LIBRARY_NSFW_MODEL), and blocklist hits that come from a rule
-- (an NSFW score at or above LIBRARY_NSFW_BLOCK_SCORE) rather than from a reference hash.
CREATE TABLE IF NOT EXISTS nsfw (
  item_id bigint PRIMARY KEY REFERENCES item (id) ON DELETE CASCADE,
  model   text NOT NULL,
  score   real NOT NULL CHECK (score >= 0 AND score <= 1)   -- P(nsfw)
);
CREATE INDEX IF NOT EXISTS nsfw_score_idx ON nsfw (score);

ALTER TABLE block_hit ALTER COLUMN entry_id DROP NOT NULL;
ALTER TABLE block_hit ADD COLUMN IF NOT EXISTS rule text NOT NULL DEFAULT 'pdq' CHECK (rule IN ('pdq', 'nsfw'));
ALTER TABLE block_hit ADD COLUMN IF NOT EXISTS nsfw_score real;
