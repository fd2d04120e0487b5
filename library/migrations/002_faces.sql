-- 002: faces found by the 'faces' step (LIBRARY_FACE_MODEL): one row per face, box in pixels of the
-- upright full-size image, the recognition model's embedding for later clustering / search.
CREATE TABLE face (
  item_id   bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  n         integer NOT NULL,
  model     text NOT NULL,
  x1        real NOT NULL,
  y1        real NOT NULL,
  x2        real NOT NULL,
  y2        real NOT NULL,
  score     real NOT NULL,
  embedding vector NOT NULL,
  PRIMARY KEY (item_id, n)
);
