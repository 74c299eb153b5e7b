-- Every query that names a lease's worker also names its runs, so the primary key finds the
-- rows; the index on worker_id only cost work. It has a few keys with one entry per running
-- run, and every run inserts one and leaves one dead, and the planner chose it over the
-- primary key for ending runs: under `agentd bench` (auto_explain), ending 242 runs scanned
-- 4,500 entries of it. Dropping it made no difference to the benchmark's rate that the
-- machine's drift would show; it is dropped for the work it costs, not for a figure.
DROP INDEX IF EXISTS agentd.leases_worker_id;
