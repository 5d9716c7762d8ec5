-- Shadow agreement and canary switches (issue #21 section 4). Written by `sqis model canary` /
-- `sqis model shadow` (stream_processors/shadow.py, stream_processors/canary.py); read by the dashboard's
-- champion/challenger page. Numbered 007: 006 is taken by the API branch.

-- Champion (production) against challenger (shadow) per event-time window and line: sums, so rates are
-- exact over any range (verdict agreement = verdict_agree / frames; mean IoU = iou_sum / matched_boxes).
CREATE TABLE shadow_agreement (
    window_start        timestamptz      NOT NULL,
    window_end          timestamptz      NOT NULL,
    line_id             text             NOT NULL,
    model_name          text             NOT NULL,
    champion_version    text             NOT NULL,
    challenger_version  text             NOT NULL,
    frames              integer          NOT NULL,
    verdict_agree       integer          NOT NULL,
    champion_fail       integer          NOT NULL,
    challenger_fail     integer          NOT NULL,
    matched_boxes       integer          NOT NULL,
    iou_sum             double precision NOT NULL,
    champion_boxes      integer          NOT NULL,
    challenger_boxes    integer          NOT NULL,
    champion_classes    jsonb            NOT NULL DEFAULT '{}',
    challenger_classes  jsonb            NOT NULL DEFAULT '{}',
    updated_at          timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, line_id, model_name, champion_version, challenger_version)
);

CREATE INDEX shadow_agreement_model_idx ON shadow_agreement (model_name, challenger_version, window_start);

-- Every canary switch (start, rollback, promotion) with the evidence it was decided on.
CREATE TABLE model_switches (
    switch_id           text        PRIMARY KEY,
    at                  timestamptz NOT NULL,
    model_name          text        NOT NULL,
    from_version        text,
    to_version          text        NOT NULL,
    action              text        NOT NULL,  -- canary | rollback | promote
    reason              text        NOT NULL,
    lines               text[]      NOT NULL DEFAULT '{}',
    share               double precision NOT NULL DEFAULT 0,
    evidence            jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX model_switches_model_idx ON model_switches (model_name, at);
