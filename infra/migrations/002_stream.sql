-- Tables written by the stream processors (#9) and read by the dashboard (#10).
-- Every writer is idempotent: upserts keyed on the natural key, so a redelivery rewrites a row
-- with the same content instead of adding one. '' (not NULL) means "all" in a key column.

-- Defect rates per tumbling window in event time (captured_at). scope: 'line' | 'camera' | 'class'.
CREATE TABLE defect_rates (
    window_start  timestamptz NOT NULL,
    window_s      integer     NOT NULL CHECK (window_s > 0),      -- 60 for the 1-minute windows
    line_id       text        NOT NULL,
    camera_id     text        NOT NULL DEFAULT '',               -- '' = whole line
    class_name    text        NOT NULL DEFAULT '',               -- '' = any class
    frames        integer     NOT NULL CHECK (frames >= 0),       -- inspections in the window
    fails         integer     NOT NULL CHECK (fails >= 0),        -- FAIL inspections (with class_name: frames with that class)
    defects       integer     NOT NULL DEFAULT 0 CHECK (defects >= 0),
    late          integer     NOT NULL DEFAULT 0 CHECK (late >= 0), -- frames that arrived after the grace period
    p95_latency_ms real,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (line_id, camera_id, class_name, window_s, window_start)
);
CREATE INDEX defect_rates_time_idx ON defect_rates (window_start);

-- p-chart baselines per line (and optionally class), computed by `sqis spc baseline`.
CREATE TABLE spc_baselines (
    line_id       text        NOT NULL,
    class_name    text        NOT NULL DEFAULT '',
    p_bar         double precision NOT NULL CHECK (p_bar >= 0 AND p_bar <= 1),
    frames        bigint      NOT NULL,
    fails         bigint      NOT NULL,
    sigma_z       double precision NOT NULL DEFAULT 1.0,       -- Laney p' overdispersion factor (1 = plain p-chart)
    points        integer     NOT NULL DEFAULT 0,               -- windows the baseline was computed from
    window_s      integer     NOT NULL DEFAULT 60,
    since         timestamptz NOT NULL,
    until         timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (line_id, class_name)
);

-- Alerts (SPC rules, thresholds, drift) and their lifecycle: open -> acknowledged -> resolved.
CREATE TABLE alerts (
    alert_id      text        PRIMARY KEY,
    kind          text        NOT NULL,                          -- 'spc' | 'threshold' | 'drift'
    rule          text        NOT NULL,                          -- e.g. 'we1_beyond_3sigma'
    severity      text        NOT NULL DEFAULT 'warning',
    state         text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'acknowledged', 'resolved')),
    line_id       text        NOT NULL,
    camera_id     text        NOT NULL DEFAULT '',
    class_name    text        NOT NULL DEFAULT '',
    window_start  timestamptz,
    window_end    timestamptz,
    value         double precision,                              -- the statistic that fired (rate, drift stat)
    center        double precision,
    lcl           double precision,
    ucl           double precision,
    message       text        NOT NULL DEFAULT '',
    details       jsonb       NOT NULL DEFAULT '{}'::jsonb,       -- points that made it fire, settings
    example_frame_ids text[]  NOT NULL DEFAULT '{}',
    opened_at     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_comment   text,
    resolved_at   timestamptz,
    fired         integer     NOT NULL DEFAULT 1                 -- rule firings merged into this alert (dedup)
);
CREATE INDEX alerts_state_idx ON alerts (state, opened_at DESC);
CREATE INDEX alerts_line_idx  ON alerts (line_id, opened_at DESC);

-- One verdict per part over all its camera views. verdict: 'OK' | 'NG' | 'INCOMPLETE'.
CREATE TABLE part_verdicts (
    part_id         text        PRIMARY KEY,
    line_id         text        NOT NULL,
    verdict         text        NOT NULL CHECK (verdict IN ('OK', 'NG', 'INCOMPLETE')),
    expected_views  integer     NOT NULL,
    views           jsonb       NOT NULL DEFAULT '[]'::jsonb,    -- [{camera_id, frame_id, verdict, worst}]
    missing_cameras text[]      NOT NULL DEFAULT '{}',
    worst_class     text,
    worst_score     real,
    worst_camera    text,
    reason          text        NOT NULL DEFAULT '',
    first_seen_at   timestamptz NOT NULL,
    decided_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX part_verdicts_line_idx ON part_verdicts (line_id, decided_at DESC);
CREATE INDEX part_verdicts_verdict_idx ON part_verdicts (verdict, decided_at DESC);
