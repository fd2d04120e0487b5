-- 003: CLIP near-duplicate pairs, found when an item's CLIP vector is stored (cosine distance within
-- LIBRARY_CLIP_DUPLICATE_THRESHOLD), for duplicate groups by meaning (crops, edits PDQ does not survive).
CREATE TABLE clip_pair (
  a        bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  b        bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  distance real NOT NULL,
  PRIMARY KEY (a, b),
  CHECK (a < b)
);
CREATE INDEX clip_pair_b_idx ON clip_pair (b);
