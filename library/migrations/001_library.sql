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
-- (unindexed) for item-to-item queries (duplicate groups, search by item id).
CREATE TABLE pdq (
  item_id  bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  kind     text NOT NULL CHECK (kind IN ('plain', 'trimmed')),
  hash     bit(256) NOT NULL,
  quality  integer NOT NULL,
  dihedral bit(256)[] NOT NULL,
  PRIMARY KEY (item_id, kind)
);
CREATE INDEX pdq_hash_idx ON pdq USING hnsw (hash bit_hamming_ops);

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
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blocklist_hash_idx ON blocklist_entry USING hnsw (hash bit_hamming_ops);

-- Items that matched a blocklist entry: excluded from every search, listed through the API.
CREATE TABLE block_hit (
  item_id  bigint PRIMARY KEY REFERENCES item (id) ON DELETE CASCADE,
  entry_id bigint NOT NULL REFERENCES blocklist_entry (id) ON DELETE CASCADE,
  distance integer NOT NULL,
  found_at timestamptz NOT NULL DEFAULT now()
);
