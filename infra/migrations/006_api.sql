-- The HTTP API (api/, issue #20): API keys, hashed at rest, and the idempotency keys of uploads.

-- A key is shown once, at creation: "sqis_<key_id>_<secret>". Only SHA-256(secret) is kept (the secret
-- is 256 random bits, so a slow hash adds nothing); scopes: 'ingest' | 'inspect' | 'read'.
CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    name         text        NOT NULL,
    scopes       text[]      NOT NULL CHECK (scopes <@ ARRAY['ingest', 'inspect', 'read']::text[]),
    key_hash     text        NOT NULL,                       -- hex SHA-256 of the secret part
    rate_per_s   real        CHECK (rate_per_s IS NULL OR rate_per_s > 0),  -- NULL: the server default
    burst        integer     CHECK (burst IS NULL OR burst > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- POST /v1/frames with an Idempotency-Key: the first request's frame_id, returned to every retry.
-- state 'pending' while the first request uploads and publishes; 'done' once the broker acknowledged it.
CREATE TABLE api_idempotency (
    key_id          text        NOT NULL,                   -- the API key (a key's namespace)
    idempotency_key text        NOT NULL,
    request_sha256  text        NOT NULL,                   -- image bytes + metadata: a reuse with another body is refused
    frame_id        uuid        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, idempotency_key)
);
CREATE INDEX api_idempotency_time_idx ON api_idempotency (created_at);
