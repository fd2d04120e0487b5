-- 015: people. Faces of the 'faces' step are clustered into persons as they are stored (library/people.py).
-- Numbered 015 to leave 013-014 to other image-side migrations.
--
-- person.centroid is the SUM of its faces' unit-length embeddings: the same direction as their mean, so a
-- cosine distance to it is the distance to the mean, and it is kept exactly by adding and subtracting one
-- vector per face (the triggers below), whatever changes a face's person: the pipeline, a merge, an item
-- deleted with its faces.
CREATE TABLE IF NOT EXISTS person (
  id         bigserial PRIMARY KEY,
  name       text CHECK (name IS NULL OR length(name) BETWEEN 1 AND 200),
  model      text NOT NULL,                  -- face model of its faces: vectors of two models never meet
  centroid   vector NOT NULL,                -- sum of unit embeddings (see above); zero while it has no face
  face_count integer NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE face ADD COLUMN IF NOT EXISTS id bigint GENERATED ALWAYS AS IDENTITY UNIQUE;
ALTER TABLE face ADD COLUMN IF NOT EXISTS person_id bigint REFERENCES person (id) ON DELETE SET NULL;
-- 'auto': the clusterer may (re)assign the face; 'user': a person's decision (a merge, a face moved or
-- taken out of a person), which clustering never changes.
ALTER TABLE face ADD COLUMN IF NOT EXISTS assigned_by text NOT NULL DEFAULT 'auto'
  CHECK (assigned_by IN ('auto', 'user'));
CREATE INDEX IF NOT EXISTS face_person_idx ON face (person_id);

CREATE OR REPLACE FUNCTION person_face_removed() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
  UPDATE person SET face_count = face_count - 1, centroid = centroid - l2_normalize(OLD.embedding),
                    updated_at = now()
   WHERE id = OLD.person_id;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION person_face_added() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
  UPDATE person SET face_count = face_count + 1, centroid = centroid + l2_normalize(NEW.embedding),
                    updated_at = now()
   WHERE id = NEW.person_id;
  RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS face_person_removed ON face;
CREATE TRIGGER face_person_removed AFTER DELETE OR UPDATE OF person_id ON face FOR EACH ROW
  WHEN (OLD.person_id IS NOT NULL) EXECUTE FUNCTION person_face_removed();
DROP TRIGGER IF EXISTS face_person_added ON face;
CREATE TRIGGER face_person_added AFTER INSERT OR UPDATE OF person_id ON face FOR EACH ROW
  WHEN (NEW.person_id IS NOT NULL) EXECUTE FUNCTION person_face_added();
