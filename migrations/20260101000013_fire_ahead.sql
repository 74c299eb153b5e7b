-- Fire-ahead claiming (scheduler.fire_ahead): a replica claims a slot a few seconds before
-- its instant. The claim records the slot in agentd.schedule_fires (so no other replica
-- fires it), leases it to the replica until the instant plus lease.ttl, advances next_run,
-- and notes the slot here; the runs row does not exist yet. At the instant the replica
-- removes the note and creates the run, in one statement fenced by its lease.

CREATE TABLE IF NOT EXISTS agentd.ahead_fires (
  run_id UUID PRIMARY KEY,
  schedule_id UUID NOT NULL,
  scheduled_for TIMESTAMPTZ NOT NULL,
  UNIQUE (schedule_id, scheduled_for)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON agentd.ahead_fires TO agentd_worker;

-- Gives slots claimed ahead back, as though they had never been claimed: the note, the
-- slot's record and the lease go, and the schedule's next_run returns to the slot (unless
-- it is already earlier, or the schedule is disabled or gone), so a claim fires it, late
-- by then. Used by the reaper (the replica that claimed them died before the instant) and
-- by a replica that stops before the instant.
CREATE OR REPLACE FUNCTION agentd.return_ahead_fires(run_ids uuid[]) RETURNS integer
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    returned integer;
  BEGIN
    WITH gone AS (
      DELETE FROM agentd.ahead_fires a WHERE a.run_id = ANY(run_ids)
      RETURNING a.run_id, a.schedule_id, a.scheduled_for
    ), unfired AS (
      DELETE FROM agentd.schedule_fires f USING gone g
       WHERE f.schedule_id = g.schedule_id AND f.scheduled_for = g.scheduled_for
         AND f.run_id = g.run_id
    ), unleased AS (
      DELETE FROM agentd.leases l USING gone g WHERE l.run_id = g.run_id
    ), rewound AS (
      -- last_run named the slot when it was claimed: it names the slot fired before again.
      UPDATE public.agent_schedules s
         SET next_run = CASE WHEN s.enabled AND s.next_run > g.scheduled_for
                             THEN g.scheduled_for ELSE s.next_run END,
             last_run = CASE WHEN s.last_run = g.scheduled_for
                             THEN (SELECT max(f.scheduled_for) FROM agentd.schedule_fires f
                                    WHERE f.schedule_id = s.id AND f.scheduled_for < g.scheduled_for)
                             ELSE s.last_run END
        FROM gone g
       WHERE s.id = g.schedule_id
    )
    SELECT count(*) INTO returned FROM gone;
    -- The replicas sleep until the next slot they know of: wake them for these.
    IF returned > 0 THEN
      PERFORM pg_notify('agentd_schedules', '');
    END IF;
    RETURN returned;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.return_ahead_fires(uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentd.return_ahead_fires(uuid[]) TO agentd_worker;

-- A schedule edited, disabled or deleted before the instant of a slot claimed ahead: the
-- slot is not fired with the old definition. Its note, record and lease go, and last_run
-- names the slot fired before again (next_run is the edit's business: an edit or a
-- re-enable plans the schedule anew from its definition); the replica that claimed it
-- finds nothing to start at the instant. Before the update, so it can correct the row
-- itself; after a delete. Runs as its owner: the signed-in user who changed the schedule
-- cannot reach schema agentd.
CREATE OR REPLACE FUNCTION agentd.forget_ahead_fires() RETURNS trigger
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    slots timestamptz[];
  BEGIN
    WITH gone AS (
      DELETE FROM agentd.ahead_fires a WHERE a.schedule_id = OLD.id
      RETURNING a.run_id, a.schedule_id, a.scheduled_for
    ), unfired AS (
      DELETE FROM agentd.schedule_fires f USING gone g
       WHERE f.schedule_id = g.schedule_id AND f.scheduled_for = g.scheduled_for
         AND f.run_id = g.run_id
    ), unleased AS (
      DELETE FROM agentd.leases l USING gone g WHERE l.run_id = g.run_id
    )
    SELECT array_agg(g.scheduled_for) INTO slots FROM gone g;
    IF TG_OP = 'DELETE' THEN
      RETURN OLD;
    END IF;
    IF NEW.last_run = ANY(slots) THEN
      NEW.last_run := (SELECT max(f.scheduled_for) FROM agentd.schedule_fires f
                        WHERE f.schedule_id = OLD.id AND NOT (f.scheduled_for = ANY(slots)));
    END IF;
    RETURN NEW;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.forget_ahead_fires() FROM PUBLIC;

DROP TRIGGER IF EXISTS agentd_schedule_forget_ahead ON public.agent_schedules;
CREATE TRIGGER agentd_schedule_forget_ahead
  BEFORE UPDATE ON public.agent_schedules
  FOR EACH ROW
  WHEN ((NEW.frequency, NEW.interval, NEW.time, NEW.days, NEW.date, NEW.timezone, NEW.created_at,
         NEW.agent_id)
        IS DISTINCT FROM
        (OLD.frequency, OLD.interval, OLD.time, OLD.days, OLD.date, OLD.timezone, OLD.created_at,
         OLD.agent_id)
        OR (OLD.enabled IS TRUE AND NEW.enabled IS NOT TRUE))
  EXECUTE FUNCTION agentd.forget_ahead_fires();
DROP TRIGGER IF EXISTS agentd_schedule_forget_ahead_deleted ON public.agent_schedules;
CREATE TRIGGER agentd_schedule_forget_ahead_deleted
  AFTER DELETE ON public.agent_schedules
  FOR EACH ROW
  EXECUTE FUNCTION agentd.forget_ahead_fires();
