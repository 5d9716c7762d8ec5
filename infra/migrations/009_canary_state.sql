-- The canary controller's state (`sqis model canary`, sqis/canary.py), so that a canary survives a restart
-- of its controller. One row per canary; at most one open per model. The counters are rebuilt by re-reading
-- `inspections` / `inspections.shadow` from started_at on resume; `evidence` is the latest snapshot of them
-- (what a "controller lost" rollback reports). Numbered 008 on branch loop (the merger renumbers).
CREATE TABLE canary_runs (
    canary_id           text             PRIMARY KEY,
    model_name          text             NOT NULL,
    version             text             NOT NULL,
    production_version  text,
    lines               text[]           NOT NULL DEFAULT '{}',
    share               double precision NOT NULL DEFAULT 0,
    policy              jsonb            NOT NULL DEFAULT '{}',
    lease_s             double precision NOT NULL DEFAULT 0,
    started_at          timestamptz      NOT NULL,
    renewed_at          timestamptz      NOT NULL,
    expires_at          timestamptz,                 -- the route's lease; NULL: no lease
    evidence            jsonb            NOT NULL DEFAULT '{}',
    status              text             NOT NULL DEFAULT 'open',  -- open | rollback | promote
    closed_at           timestamptz,
    reason              text
);

CREATE UNIQUE INDEX canary_runs_open_idx ON canary_runs (model_name) WHERE status = 'open';
