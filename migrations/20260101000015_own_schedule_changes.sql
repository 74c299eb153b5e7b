-- The worker marks its own changes of agent_schedules inside their transaction
-- (set_config('agentd.internal', 'on', true)) instead of by the startup option
-- `options=-c agentd.internal=on`, which connection poolers refuse or drop. Giving slots
-- back rewinds schedules: the function marks itself, so its UPDATE neither wakes every
-- replica through agentd.notify_schedules (it notifies once itself, and only when it gave
-- slots back) nor queues planning, whoever calls it. The caller's own mark is restored
-- after it (a function's SET clause would do this, but only a superuser may give one a
-- custom setting). Otherwise as in 20260101000014.
CREATE OR REPLACE FUNCTION agentd.return_ahead_fires(run_ids uuid[]) RETURNS integer
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    returned integer;
    caller_mark text := current_setting('agentd.internal', true);
  BEGIN
    PERFORM set_config('agentd.internal', 'on', true);
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
    PERFORM set_config('agentd.internal', coalesce(caller_mark, ''), true);
    RETURN returned;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.return_ahead_fires(uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentd.return_ahead_fires(uuid[]) TO agentd_worker;
