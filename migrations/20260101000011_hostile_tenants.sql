-- Tenants are hostile: what a signed-in user writes must not stop, slow or reveal anything
-- of another tenant (docs/security.md). This migration:
-- - gives the worker a role of its own (agentd_worker) with exactly the privileges it uses,
--   so `agentd run` need not connect as the tables' owner;
-- - authorizes request_run and cancel_run on the caller's JWT claims, never on the role
--   setting, bounds their input and the requests a user may have queued;
-- - replaces the per-look scan for schedules to plan (which hashed every never-planned row
--   on every look) by a queue the triggers fill;
-- - lets conversations and team members name only the user's own agents.

-- Timestamps agentd can compute with: years 1 to 9999. Anything else (±infinity, year
-- 200000) reads as NULL, so no decoder and no date arithmetic ever sees it.
CREATE OR REPLACE FUNCTION agentd.usable_time(t timestamptz) RETURNS timestamptz
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$
    SELECT CASE WHEN t >= '0001-01-01 00:00:00+00' AND t < '10000-01-01 00:00:00+00' THEN t END
  $$;

-- The worker's group role. A login role for `agentd run` is made a member of it (see
-- docs/security.md): it then owns nothing, cannot run DDL and reads every tenant's rows
-- through the policies below, without BYPASSRLS.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentd_worker') THEN
        BEGIN
            CREATE ROLE agentd_worker NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    -- Whoever migrates is an operator too (request_run and cancel_run for any target).
    IF NOT pg_has_role(current_user, 'agentd_worker', 'MEMBER') THEN
        EXECUTE format('GRANT agentd_worker TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public, agentd TO agentd_worker;
GRANT SELECT ON users, agents, agent_variables, teams, team_agents, conversations, messages
  TO agentd_worker;
GRANT SELECT, UPDATE ON agent_schedules TO agentd_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON runs, run_logs, run_artifacts TO agentd_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA agentd TO agentd_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA agentd
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO agentd_worker;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'agents', 'agent_variables', 'agent_schedules', 'teams',
                             'team_agents', 'runs', 'run_logs', 'run_artifacts', 'conversations',
                             'messages']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = t
                       AND policyname = 'agentd worker') THEN
            EXECUTE format('CREATE POLICY "agentd worker" ON public.%I FOR ALL TO agentd_worker '
                           'USING (true) WITH CHECK (true)', t);
        END IF;
    END LOOP;
END
$$;

-- A conversation and a team member may only name the user's own agent. Restrictive, so a
-- looser policy already on the table (an adopted project's) cannot widen it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'conversations'
                   AND policyname = 'Conversations name own agents') THEN
        CREATE POLICY "Conversations name own agents"
          ON conversations AS RESTRICTIVE
          FOR INSERT
          TO authenticated
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = conversations.agent_id AND a.user_id = auth.uid()));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'conversations'
                   AND policyname = 'Conversations keep naming own agents') THEN
        CREATE POLICY "Conversations keep naming own agents"
          ON conversations AS RESTRICTIVE
          FOR UPDATE
          TO authenticated
          USING (true)
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = conversations.agent_id AND a.user_id = auth.uid()));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'team_agents'
                   AND policyname = 'Team members are own agents') THEN
        CREATE POLICY "Team members are own agents"
          ON team_agents AS RESTRICTIVE
          FOR INSERT
          TO authenticated
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = team_agents.agent_id AND a.user_id = auth.uid()));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'team_agents'
                   AND policyname = 'Team members stay own agents') THEN
        CREATE POLICY "Team members stay own agents"
          ON team_agents AS RESTRICTIVE
          FOR UPDATE
          TO authenticated
          USING (true)
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = team_agents.agent_id AND a.user_id = auth.uid()));
    END IF;
END
$$;

-- Schedules waiting for the worker to compute their next_run (new, edited, re-enabled, or
-- next_run cleared by the application). Filled by the trigger below, emptied by the claim;
-- a schedule with nothing to fire for its definition (invalid, or used up) is not queued
-- again until its definition changes, so a flood of invalid rows costs one look each.
CREATE TABLE IF NOT EXISTS agentd.schedules_to_plan (
  schedule_id UUID PRIMARY KEY,
  queued_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON agentd.schedules_to_plan TO agentd_worker;

-- States recorded for an older definition no longer apply.
DELETE FROM agentd.schedule_states st
 USING public.agent_schedules s
 WHERE st.schedule_id = s.id AND st.definition_hash <> agentd.schedule_definition_hash(s);
INSERT INTO agentd.schedules_to_plan (schedule_id)
SELECT s.id FROM public.agent_schedules s
 WHERE s.enabled AND s.next_run IS NULL
   AND NOT EXISTS (SELECT 1 FROM agentd.schedule_states st WHERE st.schedule_id = s.id)
ON CONFLICT DO NOTHING;

-- Both run as their owner (the signed-in user who changed a schedule cannot reach schema
-- agentd), and only when their WHEN clause holds, so the worker's own advance of next_run
-- calls neither.
CREATE OR REPLACE FUNCTION agentd.forget_schedule_state() RETURNS trigger
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  BEGIN
    DELETE FROM agentd.schedule_states WHERE schedule_id = NEW.id;
    RETURN NULL;
  END
  $$;

CREATE OR REPLACE FUNCTION agentd.queue_schedule_plan() RETURNS trigger
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  BEGIN
    IF coalesce(current_setting('agentd.internal', true), '') <> 'on'
       AND NOT EXISTS (SELECT 1 FROM agentd.schedule_states st WHERE st.schedule_id = NEW.id)
    THEN
      INSERT INTO agentd.schedules_to_plan (schedule_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.forget_schedule_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION agentd.queue_schedule_plan() FROM PUBLIC;

-- Fired in name order: a changed definition forgets its state before it is queued.
DROP TRIGGER IF EXISTS agentd_schedule_forget_state ON public.agent_schedules;
CREATE TRIGGER agentd_schedule_forget_state
  AFTER UPDATE ON public.agent_schedules
  FOR EACH ROW
  WHEN ((NEW.frequency, NEW.interval, NEW.time, NEW.days, NEW.date, NEW.timezone, NEW.created_at)
        IS DISTINCT FROM
        (OLD.frequency, OLD.interval, OLD.time, OLD.days, OLD.date, OLD.timezone, OLD.created_at))
  EXECUTE FUNCTION agentd.forget_schedule_state();
DROP TRIGGER IF EXISTS agentd_schedule_queue_plan ON public.agent_schedules;
CREATE TRIGGER agentd_schedule_queue_plan
  AFTER INSERT OR UPDATE ON public.agent_schedules
  FOR EACH ROW
  WHEN (NEW.enabled AND NEW.next_run IS NULL)
  EXECUTE FUNCTION agentd.queue_schedule_plan();

-- Limits the worker publishes from its settings for the SQL functions to apply (one row;
-- each replica writes its settings at start-up).
CREATE TABLE IF NOT EXISTS agentd.limits (
  id BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
  max_pending_per_user INTEGER NOT NULL CHECK (max_pending_per_user > 0),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON agentd.limits TO agentd_worker;

-- Requests of one user, for the per-user limit.
CREATE INDEX IF NOT EXISTS requests_requested_by ON agentd.requests (requested_by, requested_at);
-- Users take turns: a request's turn is its place in its user's queue when it was asked
-- for (1 for a user with nothing queued). The claim takes the lowest turns first, so one
-- user's flood waits behind everyone else's first requests, at the cost of an index scan.
ALTER TABLE agentd.requests ADD COLUMN IF NOT EXISTS turn INTEGER NOT NULL DEFAULT 1;
CREATE INDEX IF NOT EXISTS requests_turn ON agentd.requests (turn, requested_at);

-- Who may act on any target: members of agentd_worker (the worker, operators, the role that
-- migrated). Decided on the caller's role, as the role setting or the login: a signed-in
-- user's SET ROLE to authenticated is not a member, and neither is a login role that is
-- merely a member of authenticated.
CREATE OR REPLACE FUNCTION agentd.caller_is_worker() RETURNS boolean
  LANGUAGE sql STABLE
  AS $$
    SELECT pg_has_role(coalesce(nullif(current_setting('role', true), 'none'), session_user),
                       'agentd_worker', 'MEMBER')
  $$;
GRANT EXECUTE ON FUNCTION agentd.caller_is_worker() TO agentd_worker;

-- Replaced by agentd.caller_is_worker and auth.uid().
DROP FUNCTION IF EXISTS agentd.caller_is_api_user();

-- Ask for a run now. Returns the id the run will have, so the caller can follow its logs.
-- A caller with a JWT `sub` claim acts as that user and may ask only for their own agents
-- and teams; without one, only members of agentd_worker may ask, for any target.
CREATE OR REPLACE FUNCTION public.request_run(target_type text, target_id uuid, input jsonb DEFAULT NULL)
  RETURNS uuid
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog, public
  AS $$
  DECLARE
    caller uuid := auth.uid();
    owner uuid;
    run_id uuid := gen_random_uuid();
    most_pending integer;
    pending integer;
    input_bytes integer;
  BEGIN
    IF target_type = 'agent' THEN
      SELECT a.user_id INTO owner FROM public.agents a WHERE a.id = request_run.target_id;
    ELSIF target_type = 'team' THEN
      SELECT t.user_id INTO owner FROM public.teams t WHERE t.id = request_run.target_id;
    ELSE
      RAISE EXCEPTION 'request_run: target_type must be ''agent'' or ''team'', not %',
        quote_nullable(left(target_type, 40))
        USING ERRCODE = '22023';
    END IF;
    IF owner IS NULL
       OR (caller IS NOT NULL AND owner IS DISTINCT FROM caller)
       OR (caller IS NULL AND NOT agentd.caller_is_worker()) THEN
      -- The same answer for "missing" and "someone else's": nothing to learn by probing.
      RAISE EXCEPTION 'request_run: no % % that you own', target_type, target_id
        USING ERRCODE = '42501';
    END IF;
    IF input IS NOT NULL THEN
      input_bytes := octet_length(input::text);
      IF input_bytes > 1048576 THEN
        RAISE EXCEPTION 'request_run: input is % bytes of JSON, at most 1048576', input_bytes
          USING ERRCODE = '54000';
      END IF;
      IF jsonb_path_exists(input, 'lax $.**{65 to last}') THEN
        RAISE EXCEPTION 'request_run: input is nested more than 64 levels deep'
          USING ERRCODE = '54000';
      END IF;
    END IF;
    most_pending := coalesce((SELECT l.max_pending_per_user FROM agentd.limits l), 1000);
    -- One request at a time per user while counting, so concurrent calls cannot overshoot.
    PERFORM pg_advisory_xact_lock(hashtextextended('agentd.requests ' || owner::text, 0));
    SELECT count(*) INTO pending
      FROM (SELECT 1 FROM agentd.requests r WHERE r.requested_by = owner LIMIT most_pending) queued;
    IF pending >= most_pending THEN
      RAISE EXCEPTION 'request_run: % runs of this user are already queued (requests.max_pending_per_user = %); ask again when some have started',
        pending, most_pending
        USING ERRCODE = '53400';
    END IF;
    INSERT INTO agentd.requests (id, target_type, target_id, input, requested_by, turn)
      VALUES (run_id, request_run.target_type, request_run.target_id, request_run.input, owner,
              pending + 1);
    PERFORM pg_notify('agentd_requests', run_id::text);
    RETURN run_id;
  END
  $$;

-- Ask to cancel a run (running, or requested and not started yet). True when the request
-- was taken; false when the run is unknown, someone else's, or already finished. The same
-- authorization as request_run.
CREATE OR REPLACE FUNCTION public.cancel_run(run_id uuid)
  RETURNS boolean
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog, public
  AS $$
  DECLARE
    caller uuid := auth.uid();
    any_run boolean;
    owner uuid;
    request agentd.requests%ROWTYPE;
  BEGIN
    any_run := caller IS NULL AND agentd.caller_is_worker();
    IF caller IS NULL AND NOT any_run THEN
      RETURN false;
    END IF;
    -- Not started yet: the request becomes a failed run at once.
    DELETE FROM agentd.requests r
      WHERE r.id = cancel_run.run_id AND (any_run OR r.requested_by = caller)
      RETURNING * INTO request;
    IF FOUND THEN
      INSERT INTO public.runs (id, type, target_id, status, start_time, end_time, duration,
                               triggered_by_id, input, error)
        VALUES (request.id, request.target_type, request.target_id, 'failed', now(), now(), 0,
                request.requested_by, request.input, 'cancelled');
      RETURN true;
    END IF;
    SELECT r.triggered_by_id INTO owner FROM public.runs r
      WHERE r.id = cancel_run.run_id AND r.status = 'running';
    IF owner IS NULL OR NOT (any_run OR owner = caller) THEN
      RETURN false;
    END IF;
    UPDATE agentd.leases l SET cancel_requested = true WHERE l.run_id = cancel_run.run_id;
    IF NOT FOUND THEN
      RETURN false;
    END IF;
    PERFORM pg_notify('agentd_cancel', cancel_run.run_id::text);
    RETURN true;
  END
  $$;

REVOKE ALL ON FUNCTION public.request_run(text, uuid, jsonb) FROM PUBLIC, anon;
REVOKE ALL ON FUNCTION public.cancel_run(uuid) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.request_run(text, uuid, jsonb) TO authenticated, agentd_worker;
GRANT EXECUTE ON FUNCTION public.cancel_run(uuid) TO authenticated, agentd_worker;
-- The migrations' own bookkeeping: readiness reads which versions ran.
GRANT SELECT ON agentd._sqlx_migrations TO agentd_worker;
