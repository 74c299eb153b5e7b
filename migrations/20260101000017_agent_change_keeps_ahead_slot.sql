-- A schedule given another agent before the instant of a slot claimed ahead: the slot is
-- taken back (its run would have been the old agent's) and, as of 20260101000013, lost:
-- next_run had already moved past it at the claim, and an agent is not part of the
-- definition, so nothing planned the schedule again. Claimed at its instant instead, the
-- slot would have fired for the new agent. Now next_run returns to the earliest slot taken
-- back when the schedule stays enabled and the statement left next_run alone (a changed
-- definition plans afresh, a disable fires nothing, and a next_run the application writes
-- wins), so a claim fires it for the new agent. Otherwise as in 20260101000013.
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
    IF NEW.enabled IS TRUE AND NEW.next_run IS NOT NULL
       AND NEW.next_run IS NOT DISTINCT FROM OLD.next_run
       AND NEW.next_run > (SELECT min(slot) FROM unnest(slots) slot) THEN
      NEW.next_run := (SELECT min(slot) FROM unnest(slots) slot);
    END IF;
    RETURN NEW;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.forget_ahead_fires() FROM PUBLIC;
