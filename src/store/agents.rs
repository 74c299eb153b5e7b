//! What executors need to know about the target of a run: the agent with its variables.

use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;

/// An agent as an executor sees it.
#[derive(Debug, Clone)]
pub struct AgentDefinition {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub category: String,
    pub instructions: Option<String>,
    pub variables: Vec<Variable>,
}

/// One of an agent's variables. Values are often API keys: never log them.
#[derive(Clone)]
pub struct Variable {
    pub name: String,
    pub value: Option<String>,
}

impl std::fmt::Debug for Variable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variable")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Many agents with their variables in one statement; `None` for ids that do not exist.
/// On a pool, or on a transaction (the claim reads its runs' agents in its own).
pub async fn load_agents<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    agent_ids: &[Uuid],
) -> Result<Vec<Option<AgentDefinition>>, StoreError> {
    let rows = sqlx::query(
        r#"
        SELECT a.id, a.name, a.description, a.category, a.instructions,
               coalesce((SELECT array_agg(v.name ORDER BY v.name) FROM public.agent_variables v
                          WHERE v.agent_id = a.id), '{}') AS variable_names,
               coalesce((SELECT array_agg(v.value ORDER BY v.name) FROM public.agent_variables v
                          WHERE v.agent_id = a.id), '{}') AS variable_values
          FROM public.agents a
         WHERE a.id = ANY($1)
        "#,
    )
    .bind(agent_ids)
    .fetch_all(executor)
    .await?;
    let agents = rows
        .iter()
        .map(|row| agent_from_row(row).map(|agent| (agent.id, agent)))
        .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
    Ok(agent_ids.iter().map(|id| agents.get(id).cloned()).collect())
}

/// A team and its members, in position order.
#[derive(Debug, Clone)]
pub struct TeamDefinition {
    pub id: Uuid,
    pub name: String,
    /// `route`, `coordinate` or `collaborate` (the schema's check).
    pub strategy: String,
    pub members: Vec<AgentDefinition>,
}

/// The team with its members (each with variables), in two round trips; `None` if gone.
pub async fn load_team(pool: &PgPool, team_id: Uuid) -> Result<Option<TeamDefinition>, StoreError> {
    let row = sqlx::query("SELECT id, name, type FROM public.teams WHERE id = $1")
        .bind(team_id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let members = sqlx::query(
        r#"
        SELECT a.id, a.name, a.description, a.category, a.instructions,
               coalesce((SELECT array_agg(v.name ORDER BY v.name) FROM public.agent_variables v
                          WHERE v.agent_id = a.id), '{}') AS variable_names,
               coalesce((SELECT array_agg(v.value ORDER BY v.name) FROM public.agent_variables v
                          WHERE v.agent_id = a.id), '{}') AS variable_values
          FROM public.team_agents m
          JOIN public.agents a ON a.id = m.agent_id
         WHERE m.team_id = $1
         ORDER BY m.position, a.id
        "#,
    )
    .bind(team_id)
    .fetch_all(pool)
    .await?
    .iter()
    .map(agent_from_row)
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(TeamDefinition {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        strategy: row.try_get("type")?,
        members,
    }))
}

fn agent_from_row(row: &sqlx::postgres::PgRow) -> Result<AgentDefinition, sqlx::Error> {
    let names: Vec<String> = row.try_get("variable_names")?;
    let values: Vec<Option<String>> = row.try_get("variable_values")?;
    Ok(AgentDefinition {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        category: row.try_get("category")?,
        instructions: row.try_get("instructions")?,
        variables: names
            .into_iter()
            .zip(values)
            .map(|(name, value)| Variable { name, value })
            .collect(),
    })
}
