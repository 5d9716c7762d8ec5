-- The dashboard's own tables (#10): reviews of inspected frames by a person, and the indexes its
-- pages need to stay fast on millions of inspections (they read the stream processors' rate
-- tables for counts; inspections only for "latest N" lists, by index).

-- A person's decision on a FAIL frame: the model was right ('confirmed') or not ('false_reject').
-- One row per frame (the latest decision wins); exported by `sqis data export-reviewed`.
CREATE TABLE inspection_reviews (
    frame_id     uuid        PRIMARY KEY REFERENCES inspections (frame_id) ON DELETE CASCADE,
    decision     text        NOT NULL CHECK (decision IN ('confirmed', 'false_reject')),
    reviewer     text        NOT NULL,
    comment      text        NOT NULL DEFAULT '',
    reviewed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inspection_reviews_time_idx ON inspection_reviews (reviewed_at DESC);

-- The gallery: the latest FAIL frames, overall and per line / camera, read backwards by index.
CREATE INDEX inspections_fail_time_idx        ON inspections (captured_at DESC) WHERE verdict = 'FAIL';
CREATE INDEX inspections_fail_line_time_idx   ON inspections (line_id, captured_at DESC) WHERE verdict = 'FAIL';
CREATE INDEX inspections_fail_camera_time_idx ON inspections (camera_id, captured_at DESC) WHERE verdict = 'FAIL';
-- Class filter on the gallery: frames that have a defect of that class.
CREATE INDEX defects_class_frame_idx ON defects (class_name, frame_id);
-- Parts of one line in time order, and alerts by line and state.
CREATE INDEX alerts_line_state_idx ON alerts (line_id, state, opened_at DESC);
