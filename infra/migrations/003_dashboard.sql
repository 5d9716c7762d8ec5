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
CREATE INDEX part_verdicts_time_idx ON part_verdicts (decided_at DESC);

-- Hourly roll-up of the 1-minute defect_rates, kept by a trigger, so a 7-day view reads ~170 rows per
-- series instead of ~10,000. Hours are UTC-aligned (date_bin, independent of the session time zone).
-- Only the 60 s windows are rolled up; an update adds its difference, a delete subtracts.
CREATE TABLE defect_rates_hourly (
    hour_start  timestamptz NOT NULL,
    line_id     text        NOT NULL,
    camera_id   text        NOT NULL DEFAULT '',
    class_name  text        NOT NULL DEFAULT '',
    frames      bigint      NOT NULL DEFAULT 0,
    fails       bigint      NOT NULL DEFAULT 0,
    defects     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (line_id, camera_id, class_name, hour_start)
);
CREATE INDEX defect_rates_hourly_time_idx ON defect_rates_hourly (hour_start);

CREATE FUNCTION defect_rates_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.window_s = 60 THEN
        UPDATE defect_rates_hourly
           SET frames = frames - OLD.frames, fails = fails - OLD.fails, defects = defects - OLD.defects
         WHERE line_id = OLD.line_id AND camera_id = OLD.camera_id AND class_name = OLD.class_name
           AND hour_start = date_bin('1 hour', OLD.window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00');
        IF TG_OP = 'DELETE' THEN  -- an hour whose windows are all gone disappears too
            DELETE FROM defect_rates_hourly
             WHERE line_id = OLD.line_id AND camera_id = OLD.camera_id AND class_name = OLD.class_name
               AND hour_start = date_bin('1 hour', OLD.window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00')
               AND frames = 0 AND fails = 0 AND defects = 0;
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.window_s = 60 THEN
        INSERT INTO defect_rates_hourly AS h (hour_start, line_id, camera_id, class_name, frames, fails, defects)
        VALUES (date_bin('1 hour', NEW.window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00'), NEW.line_id,
                NEW.camera_id, NEW.class_name, NEW.frames, NEW.fails, NEW.defects)
        ON CONFLICT (line_id, camera_id, class_name, hour_start) DO UPDATE
           SET frames = h.frames + EXCLUDED.frames, fails = h.fails + EXCLUDED.fails,
               defects = h.defects + EXCLUDED.defects;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER defect_rates_rollup AFTER INSERT OR UPDATE OR DELETE ON defect_rates
    FOR EACH ROW EXECUTE FUNCTION defect_rates_rollup();

-- rows written before this migration
INSERT INTO defect_rates_hourly (hour_start, line_id, camera_id, class_name, frames, fails, defects)
SELECT date_bin('1 hour', window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00'), line_id, camera_id, class_name,
       sum(frames), sum(fails), sum(defects)
  FROM defect_rates WHERE window_s = 60
 GROUP BY 1, 2, 3, 4;
