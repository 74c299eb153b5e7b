//! What executors need to know about the target of a run: the agent with its variables, or
//! the team with its members.
//!
//! Every value here was written by a tenant, so each is read within a bound: however large
//! a row is, a run costs the worker at most a few megabytes. What a bound leaves out is
//! said in the run's own logs ([`AgentDefinition::notices`]) or fails the run with a clear
//! error ([`AgentDefinition::defect`]); nothing of it reaches agentd's own logs.

use super::exec;
use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::domain::{AgentDefinition, TeamDefinition, TeamStrategy, Variable};

/// Longest `instructions` a run executes, in bytes; a longer one fails the run.
pub const MAX_INSTRUCTIONS_BYTES: i32 = 1024 * 1024;
/// Most variables of an agent passed to a run (the first ones by name).
pub const MAX_VARIABLES: i32 = 200;
/// Longest variable name passed, in bytes.
pub const MAX_VARIABLE_NAME_BYTES: i32 = 256;
/// Longest variable value passed, in bytes.
pub const MAX_VARIABLE_VALUE_BYTES: i32 = 64 * 1024;
/// Most members of a team a run executes; a larger team fails the run.
pub const MAX_TEAM_MEMBERS: i32 = 100;
/// Characters of an agent's or team's name, an agent's category and description read.
const MAX_NAME_CHARS: i32 = 1000;
const MAX_CATEGORY_CHARS: i32 = 200;
const MAX_DESCRIPTION_CHARS: i32 = 10_000;

/// The columns of an agent, each within its bound, and its variables: the first
/// [`MAX_VARIABLES`] by name whose name and value fit, the names of those that do not, and
/// whether there were more.
macro_rules! agent_columns {
    () => {
        r#"
        a.id, left(a.name, $2) AS name, left(a.description, $3) AS description,
        left(a.category, $4) AS category,
        CASE WHEN octet_length(a.instructions) <= $5 THEN a.instructions END AS instructions,
        coalesce(octet_length(a.instructions), 0)::int8 AS instructions_bytes,
        coalesce(vars.names, '{}') AS variable_names,
        coalesce(vars.vals, '{}') AS variable_values,
        coalesce(vars.refused, '{}') AS refused_variables,
        coalesce(vars.more, false) AS more_variables
        "#
    };
}
macro_rules! agent_variables_join {
    () => {
        r#"
        LEFT JOIN LATERAL (
          SELECT array_agg(x.name ORDER BY x.rn) FILTER (WHERE x.fits AND x.rn <= $6) AS names,
                 array_agg(x.value ORDER BY x.rn) FILTER (WHERE x.fits AND x.rn <= $6) AS vals,
                 array_agg(left(x.name, 100) ORDER BY x.rn) FILTER (WHERE NOT x.fits AND x.rn <= $6) AS refused,
                 bool_or(x.rn > $6) AS more
            FROM (SELECT v.name,
                         CASE WHEN octet_length(v.value) <= $8 THEN v.value END AS value,
                         octet_length(v.name) <= $7 AND coalesce(octet_length(v.value), 0) <= $8 AS fits,
                         row_number() OVER (ORDER BY v.name) AS rn
                    FROM public.agent_variables v
                   WHERE v.agent_id = a.id
                   ORDER BY v.name
                   LIMIT $6 + 1) x
        ) vars ON true
        "#
    };
}

/// Binds the bounds `$2`…`$8` of `agent_columns!` and `agent_variables_join!` (after `$1`).
fn bind_bounds<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(MAX_NAME_CHARS)
        .bind(MAX_DESCRIPTION_CHARS)
        .bind(MAX_CATEGORY_CHARS)
        .bind(MAX_INSTRUCTIONS_BYTES)
        .bind(MAX_VARIABLES)
        .bind(MAX_VARIABLE_NAME_BYTES)
        .bind(MAX_VARIABLE_VALUE_BYTES)
}

/// Many agents with their variables in one statement; `None` for ids that do not exist.
/// On a pool, or on a transaction (the claim reads its runs' agents in its own).
pub async fn load_agents<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    agent_ids: &[Uuid],
) -> Result<Vec<Option<AgentDefinition>>, StoreError> {
    let rows = bind_bounds(
        exec::query(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM public.agents a ",
            agent_variables_join!(),
            " WHERE a.id = ANY($1)"
        ))
        .bind(agent_ids),
    )
    .fetch_all(executor)
    .await?;
    let agents = rows
        .iter()
        .map(|row| agent_from_row(row).map(|agent| (agent.id, agent)))
        .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
    Ok(agent_ids.iter().map(|id| agents.get(id).cloned()).collect())
}

/// The team with its members (each with variables), in position order; `None` if gone. A
/// member agent that the team's owner does not own is skipped, whoever wrote the row.
pub async fn load_team(pool: &PgPool, team_id: Uuid) -> Result<Option<TeamDefinition>, StoreError> {
    let row = exec::query(
        "SELECT id, left(name, $2) AS name, type, user_id FROM public.teams WHERE id = $1",
    )
    .bind(team_id)
    .bind(MAX_NAME_CHARS)
    .fetch_optional(exec::on(pool))
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let owner: Uuid = row.try_get("user_id")?;
    let listed = exec::query(
        r#"
        SELECT m.agent_id, a.user_id = $2 AS own
          FROM public.team_agents m
          JOIN public.agents a ON a.id = m.agent_id
         WHERE m.team_id = $1
         ORDER BY m.position, a.id
         LIMIT $3 + 1
        "#,
    )
    .bind(team_id)
    .bind(owner)
    .bind(MAX_TEAM_MEMBERS)
    .fetch_all(exec::on(pool))
    .await?;
    let mut notices = Vec::new();
    let mut own_ids = Vec::new();
    for member in &listed {
        let agent_id: Uuid = member.try_get("agent_id")?;
        if member.try_get::<bool, _>("own")? {
            own_ids.push(agent_id);
        } else {
            notices.push(format!(
                "team member agent {agent_id} belongs to another user; skipped"
            ));
        }
    }
    let strategy = TeamStrategy::parse(row.try_get("type")?);
    let defect = match &strategy {
        Err(why) => Some(why.clone()),
        Ok(_) => (listed.len() > MAX_TEAM_MEMBERS as usize)
            .then(|| format!("the team has more than {MAX_TEAM_MEMBERS} members")),
    };
    let members = if defect.is_some() || own_ids.is_empty() {
        Vec::new()
    } else {
        load_agents(exec::on(pool), &own_ids)
            .await?
            .into_iter()
            .flatten()
            .collect()
    };
    Ok(Some(TeamDefinition {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        // With an unknown strategy the team never runs (`defect` says why).
        strategy: strategy.unwrap_or(TeamStrategy::Route),
        members,
        notices,
        defect,
    }))
}

fn agent_from_row(row: &sqlx::postgres::PgRow) -> Result<AgentDefinition, sqlx::Error> {
    let names: Vec<String> = row.try_get("variable_names")?;
    let values: Vec<Option<String>> = row.try_get("variable_values")?;
    let refused: Vec<String> = row.try_get("refused_variables")?;
    let instructions_bytes: i64 = row.try_get("instructions_bytes")?;
    let mut notices: Vec<String> = refused
        .iter()
        .map(|name| {
            format!(
                "variable {} not passed: its name is over {MAX_VARIABLE_NAME_BYTES} bytes or its value over {MAX_VARIABLE_VALUE_BYTES} bytes",
                crate::text::quoted(name)
            )
        })
        .collect();
    if row.try_get::<bool, _>("more_variables")? {
        notices.push(format!(
            "the agent has more than {MAX_VARIABLES} variables; only the first {MAX_VARIABLES} by name are passed"
        ));
    }
    let defect = (instructions_bytes > i64::from(MAX_INSTRUCTIONS_BYTES)).then(|| {
        format!(
            "the agent's instructions are {instructions_bytes} bytes, at most {MAX_INSTRUCTIONS_BYTES}"
        )
    });
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
        notices,
        defect,
    })
}
