-- 016: per-tag calibration of zero-shot tags and names of tags from other taggers.
-- tag_calibration holds, per CLIP model, prompt and tag, the robust statistics of the tag's scores over a
-- random sample of the library's own photos (median and 1.4826 x MAD); a tag's threshold is
-- median + LIBRARY_TAGS_CALIBRATION_K x spread, so k can change without recomputing.
CREATE TABLE IF NOT EXISTS tag_calibration (
  model      text NOT NULL,
  prompt     text NOT NULL,
  tag        text NOT NULL,
  median     real NOT NULL,
  spread     real NOT NULL,
  sample     integer NOT NULL,               -- photos the statistics come from
  PRIMARY KEY (model, prompt, tag)
);

-- Tags of a tagging model (LIBRARY_TAG_MODEL) are its own list: their Chinese name is stored with them.
ALTER TABLE item_tag ADD COLUMN IF NOT EXISTS zh text;
