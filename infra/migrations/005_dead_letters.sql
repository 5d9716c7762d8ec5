-- Dead letters (frames.dlq) as rows, for the dashboard's DLQ count and a searchable history; written
-- by `sqis sink stream-tables` (idempotent: the source topic/partition/offset is the key). The
-- original bytes stay in Kafka (and `sqis dlq replay` re-publishes them); only what a person reads
-- is kept here. line_id/camera_id come from the original FrameRef when it could be decoded.

CREATE TABLE dead_letters (
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    frame_id          text,
    line_id           text,
    camera_id         text,
    error_type        text        NOT NULL,
    error_message     text        NOT NULL,
    failed_at         timestamptz NOT NULL,
    worker_id         text        NOT NULL,
    original_size     bigint,
    written_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

CREATE INDEX dead_letters_time_idx ON dead_letters (failed_at);
CREATE INDEX dead_letters_line_time_idx ON dead_letters (line_id, failed_at);
