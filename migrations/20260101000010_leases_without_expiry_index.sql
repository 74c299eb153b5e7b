-- The leases table holds one row per run in flight, so the reaper's two statements (the
-- earliest expiry, and the expired leases) read it whole at little cost, and only when a
-- lease is due to expire. The index on expires_at cost every run an entry to insert and one
-- to leave dead, and the planner chose it over the primary key to end runs: under `agentd
-- bench` (auto_explain), ending 304 runs went through 2,000 of its entries (every lease of
-- both replicas) and filtered out all but theirs. Ending runs now finds them by primary key.
DROP INDEX IF EXISTS agentd.leases_expires_at;
