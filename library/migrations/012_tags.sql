-- 012: zero-shot tags from the CLIP embedding (LIBRARY_TAGS_ENABLED). tag_text caches each vocabulary
-- entry's text embedding per CLIP model and prompt, computed once; item_tag holds an item's tags.
CREATE TABLE IF NOT EXISTS tag_text (
  model     text NOT NULL,
  prompt    text NOT NULL,                  -- the prompt template, so a changed template re-embeds
  tag       text NOT NULL,                  -- the vocabulary key (its English name)
  embedding vector NOT NULL,
  PRIMARY KEY (model, prompt, tag)
);

CREATE TABLE IF NOT EXISTS item_tag (
  item_id bigint NOT NULL REFERENCES item (id) ON DELETE CASCADE,
  tag     text NOT NULL,
  model   text NOT NULL,
  score   real NOT NULL,                    -- cosine similarity of the image and the tag's prompt
  PRIMARY KEY (item_id, tag)
);
CREATE INDEX IF NOT EXISTS item_tag_tag_idx ON item_tag (tag);
