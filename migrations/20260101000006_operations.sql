-- Operations: coordination of fleet-wide maintenance (retention), and the indexes that keep
-- retention's deletions cheap on large history tables.

-- One row per maintenance task: which replica holds it and until when, and when it last
-- finished, so one replica at a time does it, at most once per interval, whatever the
-- number of replicas.
CREATE TABLE IF NOT EXISTS agentd.maintenance (
  task TEXT PRIMARY KEY,
  holder TEXT,
  held_until TIMESTAMPTZ,
  last_started_at TIMESTAMPTZ,
  last_finished_at TIMESTAMPTZ
);
INSERT INTO agentd.maintenance (task) VALUES ('retention') ON CONFLICT DO NOTHING;

-- Finished runs by end time (retention of runs); running runs are never deleted.
CREATE INDEX IF NOT EXISTS agentd_runs_finished_end_time
  ON public.runs (end_time) WHERE status <> 'running';
-- Artifacts by age (retention of artifacts). run_logs already has idx_run_logs_timestamp.
CREATE INDEX IF NOT EXISTS agentd_run_artifacts_created_at
  ON public.run_artifacts (created_at);
-- Slot records of deleted runs go with them (retention of runs).
CREATE INDEX IF NOT EXISTS schedule_fires_run_id ON agentd.schedule_fires (run_id);
