-- 010: videos. An item is an image or a video (MP4/MOV, Matroska/WebM, AVI, animated GIF/WebP/PNG); a
-- video's pipeline step 'video' stores its keyframes (scene changes plus one every
-- LIBRARY_VIDEO_KEYFRAME_INTERVAL_S) with their time, PDQ ('plain' and, with a uniform frame, 'trimmed')
-- and, when a CLIP model is configured, CLIP. Numbered 010 to leave room for image-side migrations.
ALTER TABLE item ADD COLUMN IF NOT EXISTS media text NOT NULL DEFAULT 'image' CHECK (media IN ('image', 'video'));
ALTER TABLE item ADD COLUMN IF NOT EXISTS duration_s double precision;

-- Indexed like pdq (multi-index hashing over 16 chunks of 16 bits; see 001_library.sql).
CREATE TABLE IF NOT EXISTS video_frame (
  item_id bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  n       integer NOT NULL,
  t       double precision NOT NULL,          -- seconds from the start
  kind    text NOT NULL CHECK (kind IN ('plain', 'trimmed')),
  hash    bit(256) NOT NULL,
  quality integer NOT NULL,
  c0 integer GENERATED ALWAYS AS (substring(hash FROM 1 FOR 16)::bit(16)::integer) STORED,
  c1 integer GENERATED ALWAYS AS (substring(hash FROM 17 FOR 16)::bit(16)::integer) STORED,
  c2 integer GENERATED ALWAYS AS (substring(hash FROM 33 FOR 16)::bit(16)::integer) STORED,
  c3 integer GENERATED ALWAYS AS (substring(hash FROM 49 FOR 16)::bit(16)::integer) STORED,
  c4 integer GENERATED ALWAYS AS (substring(hash FROM 65 FOR 16)::bit(16)::integer) STORED,
  c5 integer GENERATED ALWAYS AS (substring(hash FROM 81 FOR 16)::bit(16)::integer) STORED,
  c6 integer GENERATED ALWAYS AS (substring(hash FROM 97 FOR 16)::bit(16)::integer) STORED,
  c7 integer GENERATED ALWAYS AS (substring(hash FROM 113 FOR 16)::bit(16)::integer) STORED,
  c8 integer GENERATED ALWAYS AS (substring(hash FROM 129 FOR 16)::bit(16)::integer) STORED,
  c9 integer GENERATED ALWAYS AS (substring(hash FROM 145 FOR 16)::bit(16)::integer) STORED,
  c10 integer GENERATED ALWAYS AS (substring(hash FROM 161 FOR 16)::bit(16)::integer) STORED,
  c11 integer GENERATED ALWAYS AS (substring(hash FROM 177 FOR 16)::bit(16)::integer) STORED,
  c12 integer GENERATED ALWAYS AS (substring(hash FROM 193 FOR 16)::bit(16)::integer) STORED,
  c13 integer GENERATED ALWAYS AS (substring(hash FROM 209 FOR 16)::bit(16)::integer) STORED,
  c14 integer GENERATED ALWAYS AS (substring(hash FROM 225 FOR 16)::bit(16)::integer) STORED,
  c15 integer GENERATED ALWAYS AS (substring(hash FROM 241 FOR 16)::bit(16)::integer) STORED,
  PRIMARY KEY (item_id, n, kind)
);
CREATE INDEX IF NOT EXISTS video_frame_c0_idx ON video_frame (c0);
CREATE INDEX IF NOT EXISTS video_frame_c1_idx ON video_frame (c1);
CREATE INDEX IF NOT EXISTS video_frame_c2_idx ON video_frame (c2);
CREATE INDEX IF NOT EXISTS video_frame_c3_idx ON video_frame (c3);
CREATE INDEX IF NOT EXISTS video_frame_c4_idx ON video_frame (c4);
CREATE INDEX IF NOT EXISTS video_frame_c5_idx ON video_frame (c5);
CREATE INDEX IF NOT EXISTS video_frame_c6_idx ON video_frame (c6);
CREATE INDEX IF NOT EXISTS video_frame_c7_idx ON video_frame (c7);
CREATE INDEX IF NOT EXISTS video_frame_c8_idx ON video_frame (c8);
CREATE INDEX IF NOT EXISTS video_frame_c9_idx ON video_frame (c9);
CREATE INDEX IF NOT EXISTS video_frame_c10_idx ON video_frame (c10);
CREATE INDEX IF NOT EXISTS video_frame_c11_idx ON video_frame (c11);
CREATE INDEX IF NOT EXISTS video_frame_c12_idx ON video_frame (c12);
CREATE INDEX IF NOT EXISTS video_frame_c13_idx ON video_frame (c13);
CREATE INDEX IF NOT EXISTS video_frame_c14_idx ON video_frame (c14);
CREATE INDEX IF NOT EXISTS video_frame_c15_idx ON video_frame (c15);

CREATE TABLE IF NOT EXISTS video_frame_clip (
  item_id   bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  n         integer NOT NULL,
  t         double precision NOT NULL,
  model     text NOT NULL,
  embedding vector NOT NULL,
  PRIMARY KEY (item_id, n)
);
