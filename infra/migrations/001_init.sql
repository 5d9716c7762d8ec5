-- Inspections and their defects, written by sinks/postgres.py (idempotent upsert keyed by frame_id)
-- and read by the dashboard. Times are timestamptz (UTC); the Avro records carry microseconds.

CREATE TABLE inspections (
    frame_id          uuid PRIMARY KEY,
    line_id           text        NOT NULL,
    camera_id         text        NOT NULL,
    seq               bigint      NOT NULL,
    part_id           text,
    captured_at       timestamptz NOT NULL,
    inspected_at      timestamptz NOT NULL,
    image_uri         text        NOT NULL,
    width             integer     NOT NULL,
    height            integer     NOT NULL,
    model_name        text        NOT NULL,
    model_version     text        NOT NULL,
    verdict           text        NOT NULL CHECK (verdict IN ('PASS', 'FAIL')),
    n_defects         integer     NOT NULL DEFAULT 0 CHECK (n_defects >= 0),
    thresholds        jsonb       NOT NULL DEFAULT '{}'::jsonb,   -- {default_score, iou, per_class}
    timings           jsonb       NOT NULL DEFAULT '{}'::jsonb,   -- every stage in ms (queue_ms, ...)
    total_ms          real,
    batch_size        integer,
    worker_id         text,
    source_partition  integer,
    source_offset     bigint,
    written_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX inspections_line_time_idx    ON inspections (line_id, captured_at);
CREATE INDEX inspections_camera_time_idx  ON inspections (camera_id, captured_at);
CREATE INDEX inspections_verdict_time_idx ON inspections (verdict, captured_at);
CREATE INDEX inspections_time_idx         ON inspections (captured_at);
CREATE INDEX inspections_model_idx        ON inspections (model_name, model_version);

CREATE TABLE defects (
    frame_id    uuid     NOT NULL REFERENCES inspections (frame_id) ON DELETE CASCADE,
    idx         smallint NOT NULL CHECK (idx >= 0),   -- position in the Inspection's detections
    class_id    integer  NOT NULL,
    class_name  text     NOT NULL,
    score       real     NOT NULL,
    x1          real     NOT NULL,
    y1          real     NOT NULL,
    x2          real     NOT NULL,
    y2          real     NOT NULL,
    mask_rle    jsonb,                                -- {height, width, counts} COCO uncompressed RLE
    mask_area   bigint,
    PRIMARY KEY (frame_id, idx)
);

CREATE INDEX defects_class_idx ON defects (class_name);
