-- Conversations: agentd answers the users' chat messages (docs/conversations.md).
--
-- A user message is queued by the trigger below when it is committed; a turn takes every
-- queued message of one conversation, one turn at a time per conversation, and answers it
-- with one reply. Messages committed before this migration were never queued: adopting a
-- database with years of chat history answers none of it (the trigger is the watermark;
-- `agentd.conversation_support.installed_at` records when it was installed).

CREATE TABLE IF NOT EXISTS agentd.conversation_support (
  id BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
  installed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO agentd.conversation_support DEFAULT VALUES ON CONFLICT DO NOTHING;

-- User messages no turn has covered yet.
CREATE TABLE IF NOT EXISTS agentd.unanswered (
  message_id UUID PRIMARY KEY REFERENCES public.messages(id) ON DELETE CASCADE,
  conversation_id UUID NOT NULL,
  arrived_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS unanswered_conversation ON agentd.unanswered (conversation_id, arrived_at);

-- Conversations with unanswered messages, one row each: what the claim locks. `first_at`
-- and `last_at` are when the first and the latest of them arrived (the debounce's clock);
-- `rank` is the conversation's place among its user's waiting conversations when it was
-- queued, so one user's flood of conversations waits behind everyone else's first ones.
CREATE TABLE IF NOT EXISTS agentd.waiting_conversations (
  conversation_id UUID PRIMARY KEY REFERENCES public.conversations(id) ON DELETE CASCADE,
  user_id UUID NOT NULL,
  rank INTEGER NOT NULL,
  first_at TIMESTAMPTZ NOT NULL,
  last_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS waiting_conversations_order ON agentd.waiting_conversations (rank, first_at);
CREATE INDEX IF NOT EXISTS waiting_conversations_user ON agentd.waiting_conversations (user_id);

-- One row per turn (its run). At most one turn per conversation has not ended: the unique
-- index is what makes "one turn at a time" hold across replicas.
CREATE TABLE IF NOT EXISTS agentd.turns (
  run_id UUID PRIMARY KEY,
  conversation_id UUID NOT NULL,
  reply_id UUID NOT NULL UNIQUE,
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  ended BOOLEAN NOT NULL DEFAULT false,
  -- A newer message interrupted it (conversations.multitask = "interrupt").
  interrupted BOOLEAN NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX IF NOT EXISTS turns_one_at_a_time ON agentd.turns (conversation_id) WHERE NOT ended;

-- The turn that covered each user message. The primary key makes a second turn, and so a
-- second reply, for the same message impossible.
CREATE TABLE IF NOT EXISTS agentd.turn_messages (
  message_id UUID PRIMARY KEY REFERENCES public.messages(id) ON DELETE CASCADE,
  run_id UUID NOT NULL
);
CREATE INDEX IF NOT EXISTS turn_messages_run ON agentd.turn_messages (run_id);

GRANT SELECT, INSERT, UPDATE, DELETE
  ON agentd.conversation_support, agentd.unanswered, agentd.waiting_conversations,
     agentd.turns, agentd.turn_messages
  TO agentd_worker;
-- The worker writes the replies and the conversations' last_message.
GRANT INSERT, UPDATE ON public.messages TO agentd_worker;
GRANT UPDATE ON public.conversations TO agentd_worker;

-- A conversation's history, newest first, read by index.
CREATE INDEX IF NOT EXISTS agentd_messages_history ON public.messages (conversation_id, created_at, id);

-- Runs as its owner: the signed-in user who wrote the message cannot reach schema agentd.
CREATE OR REPLACE FUNCTION agentd.message_arrived() RETURNS trigger
  LANGUAGE plpgsql
  SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
  DECLARE
    owner uuid;
    waiting integer;
  BEGIN
    INSERT INTO agentd.unanswered (message_id, conversation_id)
      VALUES (NEW.id, NEW.conversation_id) ON CONFLICT DO NOTHING;
    UPDATE agentd.waiting_conversations w SET last_at = clock_timestamp()
     WHERE w.conversation_id = NEW.conversation_id;
    IF NOT FOUND THEN
      SELECT c.user_id INTO owner FROM public.conversations c WHERE c.id = NEW.conversation_id;
      SELECT count(*) INTO waiting
        FROM (SELECT 1 FROM agentd.waiting_conversations w WHERE w.user_id = owner LIMIT 1000) q;
      INSERT INTO agentd.waiting_conversations (conversation_id, user_id, rank, first_at, last_at)
        VALUES (NEW.conversation_id, owner, waiting + 1, clock_timestamp(), clock_timestamp())
        ON CONFLICT (conversation_id) DO UPDATE SET last_at = EXCLUDED.last_at;
    END IF;
    -- The same payload for every message: a transaction's many messages send one.
    PERFORM pg_notify('agentd_messages', '');
    RETURN NULL;
  END
  $$;
REVOKE ALL ON FUNCTION agentd.message_arrived() FROM PUBLIC;

DROP TRIGGER IF EXISTS agentd_message_arrived ON public.messages;
CREATE TRIGGER agentd_message_arrived
  AFTER INSERT ON public.messages
  FOR EACH ROW
  WHEN (NEW.sender_type = 'user')
  EXECUTE FUNCTION agentd.message_arrived();

-- Agent messages are agentd's alone: a signed-in user writes only user messages, and
-- cannot change or forge a reply. Restrictive, so a looser policy already on the table (an
-- adopted project's) cannot widen it. Deleting messages of one's own conversation stays
-- allowed (the permissive policy decides).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'messages'
                   AND policyname = 'Users write only user messages') THEN
        CREATE POLICY "Users write only user messages"
          ON messages AS RESTRICTIVE
          FOR INSERT
          TO authenticated
          WITH CHECK (sender_type = 'user');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'messages'
                   AND policyname = 'Users change only user messages') THEN
        CREATE POLICY "Users change only user messages"
          ON messages AS RESTRICTIVE
          FOR UPDATE
          TO authenticated
          USING (sender_type = 'user')
          WITH CHECK (sender_type = 'user');
    END IF;
END
$$;
