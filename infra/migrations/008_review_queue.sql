-- Active learning (issue #21 section 2): frames queued for a person's review, beside the operators' own
-- picks. Written by the PostgreSQL sink (frames the worker marked: uncertain, seg_disagree), by the shadow
-- agreement processor (challenger_disagree) and by the dashboard (source 'operator'). One row per frame
-- (idempotent on frame_id: a redone inspection or a rebuilt shadow join queues nothing twice). No foreign
-- key to inspections: a shadow disagreement may be queued before the sink has written the frame; the
-- dashboard joins the two.
CREATE TABLE review_queue (
    frame_id      uuid        PRIMARY KEY,
    line_id       text        NOT NULL,
    camera_id     text,
    reasons       text[]      NOT NULL,
    score         real,                              -- the frame's top detection / candidate score
    margin        real,                              -- top score minus its operating threshold
    candidates    jsonb       NOT NULL DEFAULT '[]', -- boxes for the reviewer and the export (missed defects)
    source        text        NOT NULL CHECK (source IN ('auto', 'operator')),
    queued_by     text        NOT NULL DEFAULT '',
    model_version text,
    queued_at     timestamptz NOT NULL DEFAULT now()
);
-- The per-line per-hour cap counts this line's automatic rows of the current hour.
CREATE INDEX review_queue_line_time_idx ON review_queue (line_id, queued_at) WHERE source = 'auto';
CREATE INDEX review_queue_time_idx ON review_queue (queued_at);

-- A third decision for frames the model passed: the reviewer saw a defect (labels from the candidates).
ALTER TABLE inspection_reviews DROP CONSTRAINT inspection_reviews_decision_check;
ALTER TABLE inspection_reviews ADD CONSTRAINT inspection_reviews_decision_check
    CHECK (decision IN ('confirmed', 'false_reject', 'missed_defect'));
