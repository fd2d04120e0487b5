-- 002: the library bridge's own records (python -m library immich ...). Nothing here touches Immich's tables;
-- no FK to them either (Immich's own migrations must stay free to drop and recreate its tables).

-- Every duplicate group the bridge wrote (asset."duplicateId" set through Immich's API): one row per asset and
-- group id. Two assets once proposed together whose duplicateId Immich now shows as unset (the user kept or
-- trashed them in "Review duplicates") are a decision the bridge never undoes.
CREATE TABLE bridge_duplicate (
  user_id      uuid NOT NULL,
  duplicate_id uuid NOT NULL,
  asset_id     uuid NOT NULL,
  proposed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (user_id, duplicate_id, asset_id)
);
CREATE INDEX bridge_duplicate_asset_idx ON bridge_duplicate (user_id, asset_id);

-- PDQ of each asset's preview, so a re-run fetches and hashes only new or replaced photos. Keyed by Immich's
-- checksum of the original (the preview the bridge reads is the unedited one, made from that file).
CREATE TABLE bridge_pdq (
  asset_id  uuid PRIMARY KEY,
  checksum  text NOT NULL,
  hashes    text[] NOT NULL,               -- 64 hex digits each: the preview as given, then without a uniform frame
  qualities integer[] NOT NULL,
  hashed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The parent tag the bridge created for a user, by id: the user may rename it, it is found again.
CREATE TABLE bridge_tag_parent (
  user_id    uuid PRIMARY KEY,
  tag_id     uuid NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Assets the bridge has tagged (so a re-run skips them, and a tag the user removed in Immich stays removed).
CREATE TABLE bridge_tagged (
  user_id   uuid NOT NULL,
  asset_id  uuid NOT NULL,
  model     text NOT NULL,
  tags      text[] NOT NULL,            -- vocabulary keys given to the asset
  tagged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (user_id, asset_id)
);

-- The vocabulary's text embeddings per CLIP model and prompt (library/tags.py's cache, same columns), so the
-- bridge computes them once per model for this Immich database.
CREATE TABLE tag_text (
  model     text NOT NULL,
  prompt    text NOT NULL,
  tag       text NOT NULL,
  embedding vector NOT NULL,
  PRIMARY KEY (model, prompt, tag)
);
