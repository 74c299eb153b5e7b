-- Slots claimed ahead are taken back in the application's lock order. An application's
-- UPDATE or DELETE of schedules locks each schedule's row and then, through
-- agentd_schedule_forget_ahead, that schedule's slots claimed ahead; giving slots back
-- (a stopping replica, the reaper) took the slots first and the schedules' rows after,
-- so the two could wait on each other and PostgreSQL aborted one: the application's
-- statement failed with "deadlock detected". Now the schedules' rows come first, and a
-- schedule the application is changing right now is skipped: its change forgets the slot,
-- or, if the change is rolled back, the slot's lease ends and the reaper gives it back then.
CREATE OR REPLACE FUNCTION agentd.return_ahead_fires(run_ids uuid[]) RETURNS integer
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    returned integer;
  BEGIN
    WITH free AS (
      SELECT s.id FROM public.agent_schedules s
       WHERE s.id IN (SELECT a.schedule_id FROM agentd.ahead_fires a WHERE a.run_id = ANY(run_ids))
       FOR NO KEY UPDATE OF s SKIP LOCKED
    ), gone AS (
      DELETE FROM agentd.ahead_fires a
       WHERE a.run_id = ANY(run_ids) AND a.schedule_id IN (SELECT id FROM free)
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
