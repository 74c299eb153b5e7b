-- agentd's own objects (leases, requests, workers) live in schema `agentd`, which
-- Supabase's API does not expose and which signed-in or anonymous users cannot reach.
CREATE SCHEMA IF NOT EXISTS agentd;
REVOKE ALL ON SCHEMA agentd FROM PUBLIC;
REVOKE ALL ON SCHEMA agentd FROM anon, authenticated;
