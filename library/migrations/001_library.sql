-- 001: items (content-addressed), per-item pipeline steps, PDQ hashes, CLIP vectors, OCR text, blocklist.
-- Runs in one transaction with search_path = <library schema>, public, pg_temp (library/db.py), so every
-- CREATE lands in the library schema and pgvector's types resolve from wherever the extension lives.

CREATE TABLE item (
  id         bigserial PRIMARY KEY,
  sha256     bytea NOT NULL UNIQUE,          -- content address: the same bytes twice are one item
  md5        text NOT NULL,                  -- imgsmlr-server clients identify images by md5
  byte_size  bigint NOT NULL,
  width      integer NOT NULL,               -- upright (EXIF orientation applied)
  height     integer NOT NULL,
  format     text NOT NULL,                  -- Pillow's format name, sniffed from the bytes
  source     text NOT NULL CHECK (source IN ('path', 'url', 'upload')),
  location   text NOT NULL,                  -- the file path or URL it came from; 'upload' for uploads
  blob       text,                           -- stored copy under LIBRARY_DATA_DIR (URL and upload items)
  data_id    text,
  remark     text,
  meta       jsonb,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per item and pipeline step. A worker claims a row (state 'running' with a lease); a worker that
-- dies leaves an expired lease, and the row is claimed again. Errors are stored with the row.
CREATE TABLE step (
  item_id         bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  name            text NOT NULL,
  state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed')),
  attempts        integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  lease_until     timestamptz,
  claimed_by      text,                      -- 'host:pid:start-time' of the worker holding the lease
  reason          text,
  updated_at      timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (item_id, name)
);
CREATE INDEX step_todo_idx ON step (next_attempt_at) WHERE state IN ('pending', 'running');

-- PDQ: per item the hash of the image as stored (upright; 'plain', ThreatExchange's value) and, when the
-- image has a uniform frame, the hash without it ('trimmed'). The query side tries its 8 dihedral variants,
-- so a mirrored or rotated copy matches without indexing 8x the rows; the item's own 8 variants are kept
-- in pdq_variant (unindexed, for item-to-item queries), out of this table so that its rows stay narrow:
-- a lookup reads thousands of candidate rows at a million items.
--
-- Index: multi-index hashing. The 256 bits are cut into 16 chunks of 16 bits (c0..c15, btree each). Two
-- hashes within 31 bits differ in at most 1 bit in at least one chunk (16 chunks x 2 bits > 31), so the
-- candidates are the rows whose chunk i equals the query's chunk i or one of its 16 one-bit neighbours,
-- for some i: 16 x 17 index probes, then the exact Hamming distance (pgvector's <~>) on the candidates.
-- Exact (no approximate-search misses), cheap to build and to insert into (see bench/bench_library.py).
CREATE TABLE pdq (
  item_id  bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  kind     text NOT NULL CHECK (kind IN ('plain', 'trimmed')),
  hash     bit(256) NOT NULL,
  quality  integer NOT NULL,
  c0  integer GENERATED ALWAYS AS (substring(hash FROM 1 FOR 16)::bit(16)::integer) STORED,
  c1  integer GENERATED ALWAYS AS (substring(hash FROM 17 FOR 16)::bit(16)::integer) STORED,
  c2  integer GENERATED ALWAYS AS (substring(hash FROM 33 FOR 16)::bit(16)::integer) STORED,
  c3  integer GENERATED ALWAYS AS (substring(hash FROM 49 FOR 16)::bit(16)::integer) STORED,
  c4  integer GENERATED ALWAYS AS (substring(hash FROM 65 FOR 16)::bit(16)::integer) STORED,
  c5  integer GENERATED ALWAYS AS (substring(hash FROM 81 FOR 16)::bit(16)::integer) STORED,
  c6  integer GENERATED ALWAYS AS (substring(hash FROM 97 FOR 16)::bit(16)::integer) STORED,
  c7  integer GENERATED ALWAYS AS (substring(hash FROM 113 FOR 16)::bit(16)::integer) STORED,
  c8  integer GENERATED ALWAYS AS (substring(hash FROM 129 FOR 16)::bit(16)::integer) STORED,
  c9  integer GENERATED ALWAYS AS (substring(hash FROM 145 FOR 16)::bit(16)::integer) STORED,
  c10 integer GENERATED ALWAYS AS (substring(hash FROM 161 FOR 16)::bit(16)::integer) STORED,
  c11 integer GENERATED ALWAYS AS (substring(hash FROM 177 FOR 16)::bit(16)::integer) STORED,
  c12 integer GENERATED ALWAYS AS (substring(hash FROM 193 FOR 16)::bit(16)::integer) STORED,
  c13 integer GENERATED ALWAYS AS (substring(hash FROM 209 FOR 16)::bit(16)::integer) STORED,
  c14 integer GENERATED ALWAYS AS (substring(hash FROM 225 FOR 16)::bit(16)::integer) STORED,
  c15 integer GENERATED ALWAYS AS (substring(hash FROM 241 FOR 16)::bit(16)::integer) STORED,
  PRIMARY KEY (item_id, kind)
);
CREATE INDEX pdq_c0_idx ON pdq (c0);
CREATE INDEX pdq_c1_idx ON pdq (c1);
CREATE INDEX pdq_c2_idx ON pdq (c2);
CREATE INDEX pdq_c3_idx ON pdq (c3);
CREATE INDEX pdq_c4_idx ON pdq (c4);
CREATE INDEX pdq_c5_idx ON pdq (c5);
CREATE INDEX pdq_c6_idx ON pdq (c6);
CREATE INDEX pdq_c7_idx ON pdq (c7);
CREATE INDEX pdq_c8_idx ON pdq (c8);
CREATE INDEX pdq_c9_idx ON pdq (c9);
CREATE INDEX pdq_c10_idx ON pdq (c10);
CREATE INDEX pdq_c11_idx ON pdq (c11);
CREATE INDEX pdq_c12_idx ON pdq (c12);
CREATE INDEX pdq_c13_idx ON pdq (c13);
CREATE INDEX pdq_c14_idx ON pdq (c14);
CREATE INDEX pdq_c15_idx ON pdq (c15);

CREATE TABLE pdq_variant (
  item_id  bigint NOT NULL,
  kind     text NOT NULL,
  dihedral bit(256)[] NOT NULL,  -- the 8 rotations / mirrors, [1] = pdq.hash
  PRIMARY KEY (item_id, kind),
  FOREIGN KEY (item_id, kind) REFERENCES pdq (item_id, kind) ON DELETE CASCADE
);

-- Near-duplicate pairs, found when an item is hashed (its matches within LIBRARY_PDQ_THRESHOLD), so
-- duplicate groups are a walk over this table rather than a search per item.
CREATE TABLE pdq_pair (
  a        bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  b        bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  distance integer NOT NULL,
  PRIMARY KEY (a, b),
  CHECK (a < b)
);
CREATE INDEX pdq_pair_b_idx ON pdq_pair (b);

CREATE TABLE clip (
  item_id   bigint PRIMARY KEY REFERENCES item (id) ON DELETE CASCADE,
  model     text NOT NULL,
  embedding vector NOT NULL
);

CREATE TABLE ocr (
  item_id bigint PRIMARY KEY REFERENCES item (id) ON DELETE CASCADE,
  content text NOT NULL,
  doc     tsvector NOT NULL
);
CREATE INDEX ocr_doc_idx ON ocr USING gin (doc);

-- Known-image blocklist: reference PDQ hashes (ThreatExchange text format or hashed images).
CREATE TABLE blocklist_entry (
  id         bigserial PRIMARY KEY,
  hash       bit(256) NOT NULL UNIQUE,
  label      text,
  source     text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  c0  integer GENERATED ALWAYS AS (substring(hash FROM 1 FOR 16)::bit(16)::integer) STORED,
  c1  integer GENERATED ALWAYS AS (substring(hash FROM 17 FOR 16)::bit(16)::integer) STORED,
  c2  integer GENERATED ALWAYS AS (substring(hash FROM 33 FOR 16)::bit(16)::integer) STORED,
  c3  integer GENERATED ALWAYS AS (substring(hash FROM 49 FOR 16)::bit(16)::integer) STORED,
  c4  integer GENERATED ALWAYS AS (substring(hash FROM 65 FOR 16)::bit(16)::integer) STORED,
  c5  integer GENERATED ALWAYS AS (substring(hash FROM 81 FOR 16)::bit(16)::integer) STORED,
  c6  integer GENERATED ALWAYS AS (substring(hash FROM 97 FOR 16)::bit(16)::integer) STORED,
  c7  integer GENERATED ALWAYS AS (substring(hash FROM 113 FOR 16)::bit(16)::integer) STORED,
  c8  integer GENERATED ALWAYS AS (substring(hash FROM 129 FOR 16)::bit(16)::integer) STORED,
  c9  integer GENERATED ALWAYS AS (substring(hash FROM 145 FOR 16)::bit(16)::integer) STORED,
  c10 integer GENERATED ALWAYS AS (substring(hash FROM 161 FOR 16)::bit(16)::integer) STORED,
  c11 integer GENERATED ALWAYS AS (substring(hash FROM 177 FOR 16)::bit(16)::integer) STORED,
  c12 integer GENERATED ALWAYS AS (substring(hash FROM 193 FOR 16)::bit(16)::integer) STORED,
  c13 integer GENERATED ALWAYS AS (substring(hash FROM 209 FOR 16)::bit(16)::integer) STORED,
  c14 integer GENERATED ALWAYS AS (substring(hash FROM 225 FOR 16)::bit(16)::integer) STORED,
  c15 integer GENERATED ALWAYS AS (substring(hash FROM 241 FOR 16)::bit(16)::integer) STORED
);
CREATE INDEX blocklist_c0_idx ON blocklist_entry (c0);
CREATE INDEX blocklist_c1_idx ON blocklist_entry (c1);
CREATE INDEX blocklist_c2_idx ON blocklist_entry (c2);
CREATE INDEX blocklist_c3_idx ON blocklist_entry (c3);
CREATE INDEX blocklist_c4_idx ON blocklist_entry (c4);
CREATE INDEX blocklist_c5_idx ON blocklist_entry (c5);
CREATE INDEX blocklist_c6_idx ON blocklist_entry (c6);
CREATE INDEX blocklist_c7_idx ON blocklist_entry (c7);
CREATE INDEX blocklist_c8_idx ON blocklist_entry (c8);
CREATE INDEX blocklist_c9_idx ON blocklist_entry (c9);
CREATE INDEX blocklist_c10_idx ON blocklist_entry (c10);
CREATE INDEX blocklist_c11_idx ON blocklist_entry (c11);
CREATE INDEX blocklist_c12_idx ON blocklist_entry (c12);
CREATE INDEX blocklist_c13_idx ON blocklist_entry (c13);
CREATE INDEX blocklist_c14_idx ON blocklist_entry (c14);
CREATE INDEX blocklist_c15_idx ON blocklist_entry (c15);

-- Items that matched a blocklist entry: excluded from every search, listed through the API.
CREATE TABLE block_hit (
  item_id  bigint PRIMARY KEY REFERENCES item (id) ON DELETE CASCADE,
  entry_id bigint NOT NULL REFERENCES blocklist_entry (id) ON DELETE CASCADE,
  distance integer NOT NULL,
  found_at timestamptz NOT NULL DEFAULT now()
);
