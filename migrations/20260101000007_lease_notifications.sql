-- Wakes the other replicas' reapers when leases are taken: an idle reaper sleeps until it
-- hears of a lease (then it follows the earliest expiry), instead of polling the table.
-- One notification per claim statement; identical ones in a transaction are delivered once.
CREATE OR REPLACE FUNCTION agentd.notify_leases() RETURNS trigger
  LANGUAGE plpgsql
  AS $$
  BEGIN
    PERFORM pg_notify('agentd_leases', '');
    RETURN NULL;
  END
  $$;

DROP TRIGGER IF EXISTS agentd_notify_leases ON agentd.leases;
CREATE TRIGGER agentd_notify_leases
  AFTER INSERT ON agentd.leases
  FOR EACH STATEMENT EXECUTE FUNCTION agentd.notify_leases();
