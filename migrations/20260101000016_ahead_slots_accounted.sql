-- Slots given back are all accounted for. Two faults of 20260101000015's version:
-- - Several slots of one schedule given back together (a replica claims every slot within
--   scheduler.fire_ahead: for an every-second schedule, three or more) rewound next_run to
--   an arbitrary one of them (an UPDATE … FROM with several rows for one target row uses
--   one), so the earlier ones were neither fired nor counted.
-- - A slot given back after later slots of its schedule fired (the replica that claimed it
--   died, and the others went on firing the schedule until its lease ended) was rewound to,
--   then coalesced by the next claim into a later slot that had already fired: lost without
--   a trace.
-- Now next_run returns to the earliest slot given back that no later fired slot overtook,
-- and a slot that was overtaken keeps its record and gets a failed run saying why, so every
-- slot is a run (or a `missed` count of one) as with any claim.
CREATE OR REPLACE FUNCTION agentd.return_ahead_fires(run_ids uuid[]) RETURNS integer
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    rewound integer;
    handled integer;
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
    ), judged AS (
      -- Overtaken: a later slot of the schedule fired (or was claimed) and is not given back.
      SELECT g.run_id, g.schedule_id, g.scheduled_for,
             EXISTS (SELECT 1 FROM agentd.schedule_fires f
                      WHERE f.schedule_id = g.schedule_id AND f.scheduled_for > g.scheduled_for
                        AND f.run_id <> ALL (run_ids)) AS overtaken
        FROM gone g
    ), unfired AS (
      DELETE FROM agentd.schedule_fires f USING judged j
       WHERE NOT j.overtaken AND f.schedule_id = j.schedule_id
         AND f.scheduled_for = j.scheduled_for AND f.run_id = j.run_id
    ), unleased AS (
      DELETE FROM agentd.leases l USING gone g WHERE l.run_id = g.run_id
    ), earliest AS (
      SELECT schedule_id, min(scheduled_for) AS slot FROM judged WHERE NOT overtaken
       GROUP BY schedule_id
    ), back AS (
      -- last_run named a slot given back: it names the slot fired before them again.
      UPDATE public.agent_schedules s
         SET next_run = CASE WHEN s.enabled AND s.next_run > e.slot THEN e.slot ELSE s.next_run END,
             last_run = CASE WHEN s.last_run >= e.slot
                             THEN (SELECT max(f.scheduled_for) FROM agentd.schedule_fires f
                                    WHERE f.schedule_id = s.id AND f.scheduled_for < e.slot)
                             ELSE s.last_run END
        FROM earliest e
       WHERE s.id = e.schedule_id
      RETURNING s.id
    ), recorded AS (
      INSERT INTO public.runs (id, type, target_id, status, start_time, end_time, duration,
                               triggered_by_id, input, error)
      SELECT j.run_id, 'agent', s.agent_id, 'failed', now(), now(), 0, a.user_id,
             jsonb_build_object(
               'trigger', 'schedule',
               'schedule_id', j.schedule_id,
               'scheduled_for',
                 rtrim(rtrim(to_char(j.scheduled_for AT TIME ZONE 'UTC',
                                     'YYYY-MM-DD"T"HH24:MI:SS.US'), '0'), '.') || 'Z',
               'missed', 0,
               'lost', true),
             'not run: the replica that claimed this slot before its instant was lost, and '
               || 'later slots of the schedule fired before the slot was given back'
        FROM judged j
        JOIN public.agent_schedules s ON s.id = j.schedule_id
        JOIN public.agents a ON a.id = s.agent_id
       WHERE j.overtaken
      ON CONFLICT (id) DO NOTHING
    )
    SELECT count(*) FILTER (WHERE NOT overtaken), count(*) INTO rewound, handled FROM judged;
    -- The replicas sleep until the next slot they know of: wake them for these.
    IF rewound > 0 THEN
      PERFORM pg_notify('agentd_schedules', '');
    END IF;
    PERFORM set_config('agentd.internal', coalesce(caller_mark, ''), true);
    RETURN handled;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.return_ahead_fires(uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentd.return_ahead_fires(uuid[]) TO agentd_worker;
