-- Durable multi-replica scheduling: agentd's own bookkeeping (schema agentd), the index that
-- keeps the claim cheap, the trigger that recomputes next_run when a schedule's definition
-- changes, and the request/cancel functions the application calls.

-- Replicas, so operators can list the live ones.
CREATE TABLE IF NOT EXISTS agentd.workers (
  id TEXT PRIMARY KEY,
  host TEXT NOT NULL,
  pid INTEGER NOT NULL,
  version TEXT NOT NULL,
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per running run: who runs it and until when that worker may write to it.
CREATE TABLE IF NOT EXISTS agentd.leases (
  run_id UUID PRIMARY KEY REFERENCES public.runs(id) ON DELETE CASCADE,
  worker_id TEXT NOT NULL,
  schedule_id UUID,
  expires_at TIMESTAMPTZ NOT NULL,
  cancel_requested BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS leases_expires_at ON agentd.leases (expires_at);
CREATE INDEX IF NOT EXISTS leases_worker_id ON agentd.leases (worker_id);
CREATE INDEX IF NOT EXISTS leases_schedule_id ON agentd.leases (schedule_id) WHERE schedule_id IS NOT NULL;

-- Every slot that was fired: the primary key is what guarantees one run per
-- (schedule, scheduled_for), whatever the number of replicas, crashes or retries.
CREATE TABLE IF NOT EXISTS agentd.schedule_fires (
  schedule_id UUID NOT NULL,
  scheduled_for TIMESTAMPTZ NOT NULL,
  run_id UUID NOT NULL,
  fired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (schedule_id, scheduled_for)
);

-- Schedules that have nothing to fire for their current definition: invalid (reported once)
-- or exhausted (`once` after firing). Keyed by a hash of the definition, so an edit makes
-- the row count again.
CREATE TABLE IF NOT EXISTS agentd.schedule_states (
  schedule_id UUID PRIMARY KEY,
  definition_hash TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('invalid', 'exhausted')),
  error TEXT,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Runs asked for by the application or the CLI, waiting for a worker. `id` is the id the
-- run will have.
CREATE TABLE IF NOT EXISTS agentd.requests (
  id UUID PRIMARY KEY,
  target_type TEXT NOT NULL CHECK (target_type IN ('agent', 'team')),
  target_id UUID NOT NULL,
  input JSONB,
  requested_by UUID NOT NULL,
  requested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS requests_requested_at ON agentd.requests (requested_at);

-- The definition of a schedule as one comparable value.
CREATE OR REPLACE FUNCTION agentd.schedule_definition_hash(s public.agent_schedules) RETURNS TEXT
  LANGUAGE sql STABLE
  AS $$
    SELECT md5(concat_ws('|', s.frequency, s.interval, s.time, s.days::text, s.date, s.timezone,
                         extract(epoch FROM s.created_at)))
  $$;

-- The claim reads only due, enabled schedules; this index holds nothing else, so its cost
-- follows the number of due rows, not the size of the table.
CREATE INDEX IF NOT EXISTS agentd_agent_schedules_due
  ON public.agent_schedules (next_run) WHERE enabled AND next_run IS NOT NULL;
-- Enabled schedules whose next_run the worker must compute (new or edited).
CREATE INDEX IF NOT EXISTS agentd_agent_schedules_unplanned
  ON public.agent_schedules (id) WHERE enabled AND next_run IS NULL;

-- A changed definition (or enabling a schedule) invalidates next_run, unless the same
-- statement set next_run itself; the worker then computes it afresh.
CREATE OR REPLACE FUNCTION agentd.schedule_changed() RETURNS trigger
  LANGUAGE plpgsql
  AS $$
  BEGIN
    IF (NEW.frequency, NEW.interval, NEW.time, NEW.days, NEW.date, NEW.timezone, NEW.created_at)
         IS DISTINCT FROM
       (OLD.frequency, OLD.interval, OLD.time, OLD.days, OLD.date, OLD.timezone, OLD.created_at)
       OR (NEW.enabled IS TRUE AND OLD.enabled IS NOT TRUE)
    THEN
      IF NEW.next_run IS NOT DISTINCT FROM OLD.next_run THEN
        NEW.next_run := NULL;
      END IF;
    END IF;
    RETURN NEW;
  END
  $$;

DROP TRIGGER IF EXISTS agentd_schedule_changed ON public.agent_schedules;
CREATE TRIGGER agentd_schedule_changed
  BEFORE UPDATE ON public.agent_schedules
  FOR EACH ROW EXECUTE FUNCTION agentd.schedule_changed();

-- Wakes the workers when the application changes schedules. The worker's own updates (it
-- advances next_run on every claim) set agentd.internal and wake nobody.
CREATE OR REPLACE FUNCTION agentd.notify_schedules() RETURNS trigger
  LANGUAGE plpgsql
  AS $$
  BEGIN
    IF coalesce(current_setting('agentd.internal', true), '') <> 'on' THEN
      PERFORM pg_notify('agentd_schedules', '');
    END IF;
    RETURN NULL;
  END
  $$;

DROP TRIGGER IF EXISTS agentd_notify_schedules ON public.agent_schedules;
CREATE TRIGGER agentd_notify_schedules
  AFTER INSERT OR UPDATE OR DELETE ON public.agent_schedules
  FOR EACH STATEMENT EXECUTE FUNCTION agentd.notify_schedules();

-- The caller's identity inside the SECURITY DEFINER functions below: signed-in users (and
-- anon) come through PostgREST's SET ROLE; anything else is the worker or an operator.
CREATE OR REPLACE FUNCTION agentd.caller_is_api_user() RETURNS boolean
  LANGUAGE sql STABLE
  AS $$
    SELECT coalesce(current_setting('role', true), 'none') IN ('authenticated', 'anon')
  $$;

-- Ask for a run now. Returns the id the run will have, so the caller can follow its logs.
CREATE OR REPLACE FUNCTION public.request_run(target_type text, target_id uuid, input jsonb DEFAULT NULL)
  RETURNS uuid
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog, public
  AS $$
  DECLARE
    owner uuid;
    run_id uuid := gen_random_uuid();
  BEGIN
    IF target_type = 'agent' THEN
      SELECT a.user_id INTO owner FROM public.agents a WHERE a.id = request_run.target_id;
    ELSIF target_type = 'team' THEN
      SELECT t.user_id INTO owner FROM public.teams t WHERE t.id = request_run.target_id;
    ELSE
      RAISE EXCEPTION 'request_run: target_type must be ''agent'' or ''team'', not %', quote_nullable(target_type)
        USING ERRCODE = '22023';
    END IF;
    IF owner IS NULL
       OR (agentd.caller_is_api_user() AND owner IS DISTINCT FROM auth.uid()) THEN
      -- The same answer for "missing" and "someone else's": nothing to learn by probing.
      RAISE EXCEPTION 'request_run: no % % that you own', target_type, target_id
        USING ERRCODE = '42501';
    END IF;
    INSERT INTO agentd.requests (id, target_type, target_id, input, requested_by)
      VALUES (run_id, request_run.target_type, request_run.target_id, request_run.input, owner);
    PERFORM pg_notify('agentd_requests', run_id::text);
    RETURN run_id;
  END
  $$;

-- Ask to cancel a run (running, or requested and not started yet). True when the request
-- was taken; false when the run is unknown, someone else's, or already finished.
CREATE OR REPLACE FUNCTION public.cancel_run(run_id uuid)
  RETURNS boolean
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog, public
  AS $$
  DECLARE
    owner uuid;
    request agentd.requests%ROWTYPE;
  BEGIN
    -- Not started yet: the request becomes a failed run at once.
    DELETE FROM agentd.requests r
      WHERE r.id = cancel_run.run_id
        AND (NOT agentd.caller_is_api_user() OR r.requested_by = auth.uid())
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
    IF owner IS NULL OR (agentd.caller_is_api_user() AND owner IS DISTINCT FROM auth.uid()) THEN
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
GRANT EXECUTE ON FUNCTION public.request_run(text, uuid, jsonb) TO authenticated;
GRANT EXECUTE ON FUNCTION public.cancel_run(uuid) TO authenticated;
