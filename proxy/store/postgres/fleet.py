"""Budgets and rate limits shared by replicas: migration 0008_fleet and the SQL that admits
and settles a call.

Every replica checks a call against the same rows, in one statement (`eg_admit`): it locks the
agent's row (so one agent's admissions, settlements and first-use fills are serial, whatever
replica runs them), checks requests and tokens per minute over `rate_buckets` (per agent per
second: the window is the last 61 buckets, so a check costs the same at any rate) and the calls in
flight, locks the three budget keys (session, day, total: `Ledger.keys`), checks
`spent + reserved + cost <= cap` for each cap given, then reserves on all three and commits the
call's intent, marked `held` (its reservation is in `budget_usage`). Concurrent calls spread
over replicas therefore overshoot a budget by at most what one call's real cost exceeds its
reservation, as in one process.

The writer's batch transaction calls `settle(cur, batch)`: each settled call's intent is
deleted, its reservation released and its real cost added to `spent` (every priced row's cost
is, intent or not); the call leaves the agent's in-flight count and the rate bucket it was
admitted in (kept with its intent) gets the real token count instead of the estimate.

A budget key is filled on first use from the spend recorded before (`spend_totals` for session
and total, the day's audit rows for the day), under the agent's lock: a settlement that
commits meanwhile is either in that sum or updates the row after it (it takes the same lock).

Times are the database's (`clock_timestamp()`): replicas' clocks never disagree about a window
or a heartbeat. Never holds a password; nothing here logs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from egress_guard.store.interface import Batch

if TYPE_CHECKING:
    from psycopg import AsyncCursor

STALE_SECONDS = 30  # a replica not seen for this long is gone: its calls are settled at their reservation

SQL = r"""
CREATE FUNCTION eg_num(t text) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$
    -- an amount stored as text, or NULL if it is not a finite number (never stops a commit)
    SELECT CASE WHEN t ~ '^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$' THEN t::numeric END
$$;

CREATE TABLE budget_usage (             -- every budget key's spend and open reservations, all replicas
    scope      TEXT        NOT NULL,    -- session | day | total
    key        TEXT        NOT NULL,    -- <agent>/<session> | <agent>/<budget day> | <agent>
    spent      NUMERIC     NOT NULL DEFAULT 0,
    reserved   NUMERIC     NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX budget_usage_updated ON budget_usage (updated_at);

CREATE TABLE agent_usage (              -- one row per agent: its lock, and its calls in flight
    agent    TEXT PRIMARY KEY,
    inflight INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE rate_buckets (             -- calls and tokens of agents with a rate limit, per second:
    agent    TEXT    NOT NULL,          -- the window is the last 61 (at most 61 rows an agent)
    second   BIGINT  NOT NULL,          -- unix seconds, the database's clock
    requests INTEGER NOT NULL,
    tokens   BIGINT  NOT NULL,          -- estimates, corrected to the real counts as the calls settle
    PRIMARY KEY (agent, second)
);

CREATE TABLE replicas (                 -- heartbeats: a replica unseen for 30 s is gone
    id       TEXT PRIMARY KEY,
    seen_at  TIMESTAMPTZ NOT NULL,
    timezone TEXT        NOT NULL DEFAULT 'UTC'   -- the budget day's time zone (spend.timezone)
);

ALTER TABLE spend_intents ADD COLUMN IF NOT EXISTS replica TEXT;
ALTER TABLE spend_intents ADD COLUMN IF NOT EXISTS held BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE spend_intents ADD COLUMN IF NOT EXISTS rate_second BIGINT;  -- the rate bucket the call counts in
ALTER TABLE spend_intents ADD COLUMN IF NOT EXISTS rate_tokens BIGINT;  -- its token estimate there
CREATE INDEX IF NOT EXISTS spend_intents_replica ON spend_intents (replica);

CREATE FUNCTION eg_keys(p_agent text, p_session text, p_day text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    -- the three budget keys in SCOPES' order, as ledger.Ledger.keys names them
    SELECT ARRAY[p_agent || '/' || coalesce(p_session, ''), p_agent || '/' || p_day, p_agent]
$$;

CREATE FUNCTION eg_spent_before(p_scope text, p_agent text, p_session text, p_day_start text)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT CASE p_scope
        WHEN 'session' THEN (SELECT coalesce(sum(eg_num(usd::text)), 0) FROM spend_totals
                             WHERE agent = p_agent AND session = coalesce(p_session, ''))
        WHEN 'total' THEN (SELECT coalesce(sum(eg_num(usd::text)), 0) FROM spend_totals WHERE agent = p_agent)
        ELSE (SELECT coalesce(sum(eg_num(cost_usd::text)), 0) FROM audit
              WHERE agent = p_agent AND ts >= p_day_start AND cost_usd IS NOT NULL)
    END
$$;

CREATE FUNCTION eg_admit(
    p_replica text, p_agent text, p_session text, p_day text, p_day_start text,
    p_caps numeric[],                   -- session, day, total: NULL = no cap
    p_usd numeric, p_tokens bigint,
    p_rpm integer, p_tpm bigint, p_concurrent integer,
    p_intent jsonb                      -- the call's intent (records.Intent)
) RETURNS TABLE (refused text, limit_ numeric, used numeric, held numeric, wait double precision)
LANGUAGE plpgsql AS $$
DECLARE
    now_     timestamptz := clock_timestamp();
    sec      bigint := floor(extract(epoch FROM now_))::bigint;
    rated    boolean := p_rpm IS NOT NULL OR p_tpm IS NOT NULL;
    scopes   text[] := ARRAY['session', 'day', 'total'];
    keys     text[] := eg_keys(p_agent, p_session, p_day);
    inflight integer;
    n        bigint;
    tok      numeric;
    oldest   bigint;
    stale    bigint;
    v_spent  numeric;
    v_held   numeric;
BEGIN
    SELECT a.inflight INTO inflight FROM agent_usage a WHERE a.agent = p_agent FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO agent_usage (agent) VALUES (p_agent) ON CONFLICT DO NOTHING;
        SELECT a.inflight INTO inflight FROM agent_usage a WHERE a.agent = p_agent FOR UPDATE;
    END IF;
    IF rated THEN
        -- the window: this second's bucket and the 60 before it (a call counts for 60 to 61 s)
        SELECT coalesce(sum(r.requests) FILTER (WHERE r.second >= sec - 60), 0),
               coalesce(sum(r.tokens) FILTER (WHERE r.second >= sec - 60), 0),
               min(r.second) FILTER (WHERE r.second >= sec - 60), min(r.second)
            INTO n, tok, oldest, stale
            FROM rate_buckets r WHERE r.agent = p_agent;
        IF stale < sec - 60 THEN
            DELETE FROM rate_buckets r WHERE r.agent = p_agent AND r.second < sec - 60;
        END IF;
        IF p_rpm IS NOT NULL AND n >= p_rpm THEN
            RETURN QUERY SELECT 'rpm', p_rpm::numeric, n::numeric, NULL::numeric,
                (oldest + 61 - extract(epoch FROM now_))::double precision;
            RETURN;
        END IF;
        IF p_tpm IS NOT NULL AND tok + p_tokens > p_tpm THEN
            RETURN QUERY SELECT 'tpm', p_tpm::numeric, tok, p_tokens::numeric,
                coalesce((oldest + 61 - extract(epoch FROM now_))::double precision, 60);
            RETURN;
        END IF;
    END IF;
    IF p_concurrent IS NOT NULL AND inflight >= p_concurrent THEN
        RETURN QUERY SELECT 'concurrent', p_concurrent::numeric, inflight::numeric, NULL::numeric, 1::double precision;
        RETURN;
    END IF;
    FOR i IN 1..3 LOOP
        SELECT b.spent, b.reserved INTO v_spent, v_held FROM budget_usage b
            WHERE b.scope = scopes[i] AND b.key = keys[i] FOR UPDATE;
        IF NOT FOUND THEN               -- first use: filled from the spend recorded before
            INSERT INTO budget_usage (scope, key, spent)
                VALUES (scopes[i], keys[i], eg_spent_before(scopes[i], p_agent, p_session, p_day_start))
                ON CONFLICT DO NOTHING;
            SELECT b.spent, b.reserved INTO v_spent, v_held FROM budget_usage b
                WHERE b.scope = scopes[i] AND b.key = keys[i] FOR UPDATE;
        END IF;
        IF p_caps[i] IS NOT NULL AND v_spent + v_held + p_usd > p_caps[i] THEN
            RETURN QUERY SELECT scopes[i], p_caps[i], v_spent, v_held, NULL::double precision;
            RETURN;
        END IF;
    END LOOP;
    IF p_usd <> 0 THEN
        UPDATE budget_usage b SET reserved = b.reserved + p_usd, updated_at = now_
            WHERE (b.scope, b.key) IN ((scopes[1], keys[1]), (scopes[2], keys[2]), (scopes[3], keys[3]));
    END IF;
    UPDATE agent_usage a SET inflight = a.inflight + 1 WHERE a.agent = p_agent;
    IF rated THEN
        INSERT INTO rate_buckets AS r VALUES (p_agent, sec, 1, p_tokens)
            ON CONFLICT (agent, second) DO UPDATE SET requests = r.requests + 1, tokens = r.tokens + excluded.tokens;
    END IF;
    INSERT INTO spend_intents SELECT * FROM jsonb_populate_record(
        NULL::spend_intents, p_intent || jsonb_build_object('replica', p_replica, 'held', true,
            'rate_second', CASE WHEN rated THEN sec END, 'rate_tokens', CASE WHEN rated THEN p_tokens END));
    RETURN QUERY SELECT NULL::text, NULL::numeric, NULL::numeric, NULL::numeric, NULL::double precision;
END $$;

CREATE FUNCTION eg_settle(p_rows jsonb) RETURNS void LANGUAGE plpgsql AS $$
-- p_rows: [{request_id, agent, session, ts, cost, tokens, settles}] — the batch's priced rows
-- and the rows that settle an intent. Set-based: each budget key, agent and rate bucket the
-- batch touches is updated once, however many of its calls the batch holds.
DECLARE
    ids    text[];
    agents text[];
    n      integer;
BEGIN
    SELECT coalesce(array_agg(x->>'request_id') FILTER (WHERE (x->>'settles')::boolean), '{}'),
           coalesce(array_agg(x->>'agent') FILTER (WHERE x->>'agent' IS NOT NULL), '{}')
        INTO ids, agents FROM jsonb_array_elements(p_rows) x;
    agents := ARRAY(SELECT DISTINCT a FROM unnest(agents || ARRAY(
        SELECT s.agent FROM spend_intents s WHERE s.request_id = ANY(ids))) a WHERE a IS NOT NULL ORDER BY a);
    -- every agent whose keys this touches is locked first, in one order (see eg_admit)
    SELECT count(*) INTO n FROM (
        SELECT 1 FROM agent_usage a WHERE a.agent = ANY(agents) ORDER BY a.agent FOR UPDATE) q;
    IF n < cardinality(agents) THEN
        INSERT INTO agent_usage (agent) SELECT a FROM unnest(agents) a ORDER BY a ON CONFLICT DO NOTHING;
        PERFORM 1 FROM agent_usage a WHERE a.agent = ANY(agents) ORDER BY a.agent FOR UPDATE;
    END IF;
    WITH rows_ AS (
        SELECT x->>'request_id' AS request_id, x->>'agent' AS agent, x->>'session' AS session,
               x->>'ts' AS ts, coalesce(eg_num(x->>'cost'), 0) AS cost, (x->>'tokens')::bigint AS tokens,
               (x->>'settles')::boolean AS settles
        FROM jsonb_array_elements(p_rows) x
    ), gone AS (
        DELETE FROM spend_intents s WHERE s.request_id = ANY(ids)
        RETURNING s.request_id, s.agent, s.session, s.day, coalesce(eg_num(s.reserved_usd::text), 0) AS reserved,
                  s.held, s.rate_second, s.rate_tokens
    ), calls AS (
        -- a call may have more than one row in a batch: its cost is theirs together
        SELECT g.*, coalesce(c.cost, 0) AS cost, c.tokens
        FROM gone g LEFT JOIN (
            SELECT r.request_id, sum(r.cost) AS cost, max(r.tokens) AS tokens FROM rows_ r GROUP BY r.request_id
        ) c USING (request_id)
    ), deltas AS (
        -- a settled call: its reservation released if held, its cost added
        SELECT k.scope, k.key, CASE WHEN c.held THEN c.reserved ELSE 0 END AS released, c.cost
        FROM calls c, unnest(ARRAY['session', 'day', 'total'], eg_keys(c.agent, c.session, c.day)) k(scope, key)
        WHERE c.held OR c.cost <> 0
        UNION ALL
        -- priced rows no intent held: counted on their agent's keys (a row whose intent is already
        -- gone was billed at its reservation by the replica that settled it: not counted twice)
        SELECT k.scope, k.key, 0, r.cost
        FROM rows_ r, unnest(ARRAY['session', 'day', 'total'], eg_keys(r.agent, coalesce(r.session, ''),
            to_char((r.ts::timestamptz) AT TIME ZONE (SELECT coalesce((
                SELECT p.timezone FROM replicas p ORDER BY p.seen_at DESC LIMIT 1), 'UTC')), 'YYYY-MM-DD')))
            k(scope, key)
        WHERE NOT r.settles AND r.agent IS NOT NULL AND r.cost <> 0
    ), budgets_ AS (
        UPDATE budget_usage b SET reserved = b.reserved - d.released, spent = b.spent + d.cost,
                                  updated_at = clock_timestamp()
        FROM (SELECT scope, key, sum(released) AS released, sum(cost) AS cost FROM deltas GROUP BY scope, key) d
        WHERE b.scope = d.scope AND b.key = d.key
    ), inflight AS (
        UPDATE agent_usage a SET inflight = greatest(a.inflight - d.n, 0)
        FROM (SELECT c.agent, count(*) AS n FROM calls c WHERE c.held GROUP BY c.agent) d
        WHERE a.agent = d.agent
    )
    -- the rate bucket each call was admitted in gets its real token count (gone once out of the window)
    UPDATE rate_buckets e SET tokens = e.tokens + d.delta
    FROM (SELECT c.agent, c.rate_second, sum(c.tokens - c.rate_tokens) AS delta FROM calls c
          WHERE c.tokens IS NOT NULL AND c.rate_second IS NOT NULL GROUP BY c.agent, c.rate_second) d
    WHERE e.agent = d.agent AND e.second = d.rate_second AND d.delta <> 0;
END $$;

CREATE FUNCTION eg_claim(p_me text, p_stale interval, p_own boolean)
RETURNS SETOF spend_intents LANGUAGE plpgsql AS $$
-- Take over the intents of replicas not seen for p_stale (with p_own, this replica's own too,
-- left by its previous run: only before it admits anything). An unmetered call's intent is settled here
-- (it only held a place in flight); a metered call's is returned, for the caller's writer to
-- record at its reservation: the row settles it as any row does.
DECLARE
    it record;
BEGIN
    FOR it IN UPDATE spend_intents s SET replica = p_me
            WHERE s.request_id IN (
                SELECT q.request_id FROM spend_intents q
                WHERE q.replica IS NULL OR (p_own AND q.replica = p_me) OR (q.replica <> p_me AND q.replica NOT IN (
                    SELECT p.id FROM replicas p WHERE p.seen_at >= clock_timestamp() - p_stale))
                FOR UPDATE SKIP LOCKED)
            RETURNING s.* LOOP
        IF it.model IS NULL THEN
            PERFORM eg_settle(jsonb_build_array(jsonb_build_object(
                'request_id', it.request_id, 'agent', it.agent, 'session', it.session,
                'ts', it.ts, 'cost', NULL, 'tokens', NULL, 'settles', true)));
        ELSE
            RETURN NEXT it;
        END IF;
    END LOOP;
    DELETE FROM replicas p WHERE p.seen_at < clock_timestamp() - p_stale
        AND NOT EXISTS (SELECT 1 FROM spend_intents s WHERE s.replica = p.id);
END $$;

-- C2 (revocations): NOTIFY egress_guard on a revocation or a budget change; the listener
-- (store/postgres/listen.py) wakes the kill switch / budget follower at once (polling stays the
-- backstop). Payload "<table>:<id or empty>", a hint only. Sent at COMMIT, never on rollback.
CREATE OR REPLACE FUNCTION eg_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'revocations' AND TG_OP = 'INSERT' THEN
        PERFORM pg_notify('egress_guard', 'revocations:' || NEW.id);
    ELSE
        PERFORM pg_notify('egress_guard', TG_TABLE_NAME || ':');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER eg_notify_revocations AFTER INSERT ON revocations
    FOR EACH ROW EXECUTE FUNCTION eg_notify();
CREATE TRIGGER eg_notify_budgets AFTER INSERT OR UPDATE OR DELETE ON budgets
    FOR EACH STATEMENT EXECUTE FUNCTION eg_notify();
"""

MIGRATION = SQL  # 0008_fleet (schema.MIGRATIONS)

# The open reservations, for `budget show` (queries.SELECT_RESERVED): key "<scope>:<key>", amount
SELECT_RESERVED = "SELECT scope || ':' || key, reserved::text FROM budget_usage WHERE reserved <> 0"


def settle_params(batch: Batch) -> str | None:
    """What `eg_settle` needs of a batch (JSON), or None if nothing in it touches a budget."""
    settles = set(batch.settles)
    rows = [
        {
            "request_id": r.request_id,
            "agent": r.agent,
            "session": r.session or "",
            "ts": r.ts,
            "cost": r.cost_usd,
            "tokens": (
                (r.input_tokens or 0) + (r.output_tokens or 0)
                if r.input_tokens is not None or r.output_tokens is not None
                else (0 if r.cost_usd is None else None)  # None: the estimate stands
            ),
            "settles": r.request_id in settles,
        }
        for r in batch.rows
        if r.request_id in settles or (r.cost_usd is not None and r.agent is not None)
    ]
    return json.dumps(rows) if rows else None


async def settle(cur: AsyncCursor[Any], batch: Batch) -> None:
    """In the writer's batch transaction, after its rows and running totals: settle the calls
    those rows finish, and count every priced row in the shared budgets."""
    params = settle_params(batch)
    if params is not None:
        await cur.execute("SELECT eg_settle(%s::jsonb)", (params,))
