-- Row level security on every application table. The seed gave policies to five tables
-- and forgot six: as given, any signed-in user could read every user's agent_variables
-- (often API keys), agent_schedules, team_agents, run_logs, run_artifacts and messages.
-- Ownership of those rows goes through their parent row.

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE agent_variables ENABLE ROW LEVEL SECURITY;
ALTER TABLE agent_schedules ENABLE ROW LEVEL SECURITY;
ALTER TABLE teams ENABLE ROW LEVEL SECURITY;
ALTER TABLE team_agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE run_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE run_artifacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'agent_variables'
                   AND policyname = 'Users can CRUD variables of own agents') THEN
        CREATE POLICY "Users can CRUD variables of own agents"
          ON agent_variables
          FOR ALL
          TO authenticated
          USING (EXISTS (SELECT 1 FROM agents a WHERE a.id = agent_variables.agent_id AND a.user_id = auth.uid()))
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = agent_variables.agent_id AND a.user_id = auth.uid()));
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'agent_schedules'
                   AND policyname = 'Users can CRUD schedules of own agents') THEN
        CREATE POLICY "Users can CRUD schedules of own agents"
          ON agent_schedules
          FOR ALL
          TO authenticated
          USING (EXISTS (SELECT 1 FROM agents a WHERE a.id = agent_schedules.agent_id AND a.user_id = auth.uid()))
          WITH CHECK (EXISTS (SELECT 1 FROM agents a WHERE a.id = agent_schedules.agent_id AND a.user_id = auth.uid()));
    END IF;

    -- A team may only hold its owner's own agents.
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'team_agents'
                   AND policyname = 'Users can CRUD members of own teams') THEN
        CREATE POLICY "Users can CRUD members of own teams"
          ON team_agents
          FOR ALL
          TO authenticated
          USING (EXISTS (SELECT 1 FROM teams t WHERE t.id = team_agents.team_id AND t.user_id = auth.uid()))
          WITH CHECK (
            EXISTS (SELECT 1 FROM teams t WHERE t.id = team_agents.team_id AND t.user_id = auth.uid())
            AND EXISTS (SELECT 1 FROM agents a WHERE a.id = team_agents.agent_id AND a.user_id = auth.uid())
          );
    END IF;

    -- Logs and artifacts are written only by the worker: signed-in users only read them.
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'run_logs'
                   AND policyname = 'Users can read logs of own runs') THEN
        CREATE POLICY "Users can read logs of own runs"
          ON run_logs
          FOR SELECT
          TO authenticated
          USING (EXISTS (SELECT 1 FROM runs r WHERE r.id = run_logs.run_id AND r.triggered_by_id = auth.uid()));
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'run_artifacts'
                   AND policyname = 'Users can read artifacts of own runs') THEN
        CREATE POLICY "Users can read artifacts of own runs"
          ON run_artifacts
          FOR SELECT
          TO authenticated
          USING (EXISTS (SELECT 1 FROM runs r WHERE r.id = run_artifacts.run_id AND r.triggered_by_id = auth.uid()));
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'messages'
                   AND policyname = 'Users can CRUD messages of own conversations') THEN
        CREATE POLICY "Users can CRUD messages of own conversations"
          ON messages
          FOR ALL
          TO authenticated
          USING (EXISTS (SELECT 1 FROM conversations c WHERE c.id = messages.conversation_id AND c.user_id = auth.uid()))
          WITH CHECK (EXISTS (SELECT 1 FROM conversations c WHERE c.id = messages.conversation_id AND c.user_id = auth.uid()));
    END IF;
END
$$;

-- Table privileges. Policies only filter rows a role may already touch; Supabase grants
-- every privilege on public tables to anon and authenticated and relies on RLS, plain
-- PostgreSQL grants nothing. Here: signed-in users may use the tables they own rows in,
-- runs and their logs and artifacts are read-only for them (the worker writes them), and
-- anon gets nothing at all.
GRANT SELECT, INSERT, UPDATE, DELETE
  ON users, agents, agent_variables, agent_schedules, teams, team_agents, conversations, messages
  TO authenticated;
GRANT SELECT ON runs, run_logs, run_artifacts TO authenticated;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON runs, run_logs, run_artifacts FROM authenticated;
REVOKE ALL
  ON users, agents, agent_variables, agent_schedules, teams, team_agents, runs, run_logs,
     run_artifacts, conversations, messages
  FROM anon;
