//! The deployment files agree with each other and with agentd itself: the Dockerfile,
//! compose.yaml, deploy/kubernetes/*.yaml and deploy/systemd/. Nothing here needs Docker,
//! Kubernetes or systemd; the files are parsed and their facts compared, e.g. that every stop
//! timeout exceeds `shutdown.grace`, that probes hit the port the image listens on, and that
//! every `AGENTD__…` variable names a real setting (an unknown one stops agentd at start-up).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

// ---------------------------------------------------------------------------------------
// Helpers

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|error| panic!("cannot read {relative}: {error}"))
}

fn duration(text: &str, origin: &str) -> Duration {
    let text = text.trim();
    // systemd and Kubernetes also count bare numbers as seconds.
    if let Ok(seconds) = text.parse::<u64>() {
        return Duration::from_secs(seconds);
    }
    humantime::parse_duration(text)
        .unwrap_or_else(|error| panic!("{origin}: {text:?} is not a duration: {error}"))
}

/// `shutdown.grace` as config/default.toml sets it.
fn default_grace() -> Duration {
    let defaults: toml::Table = read("config/default.toml")
        .parse()
        .expect("config/default.toml is not valid TOML");
    let grace = defaults
        .get("shutdown")
        .and_then(|shutdown| shutdown.get("grace"))
        .and_then(toml::Value::as_str)
        .expect("config/default.toml has no string shutdown.grace");
    duration(grace, "config/default.toml shutdown.grace")
}

/// The first override that is set (the highest configuration layer), else the default grace.
fn effective_grace(layers: &[Option<&str>], origin: &str) -> Duration {
    match layers.iter().flatten().next() {
        Some(grace) => duration(grace, &format!("{origin} shutdown.grace")),
        None => default_grace(),
    }
}

fn known_keys() -> BTreeSet<String> {
    agentd::config::default_keys().into_iter().collect()
}

/// The setting an `AGENTD__SECTION__KEY` variable sets, or None for other variables.
fn setting_of(variable: &str) -> Option<String> {
    variable
        .strip_prefix("AGENTD__")
        .map(|rest| rest.to_lowercase().replace("__", "."))
}

/// Every `AGENTD__…` variable must name a setting: agentd refuses unknown keys (exit 2).
fn assert_known_variables<'a>(names: impl IntoIterator<Item = &'a str>, origin: &str) {
    let known = known_keys();
    for name in names {
        if let Some(key) = setting_of(name) {
            assert!(
                known.contains(&key),
                "{origin}: {name} sets {key}, which config/default.toml does not have; agentd \
                 would stop with exit status 2 (unknown key)"
            );
        }
    }
}

fn port_of_listen(listen: &str, origin: &str) -> u16 {
    listen
        .parse::<SocketAddr>()
        .unwrap_or_else(|error| panic!("{origin}: http.listen {listen:?} is not ip:port: {error}"))
        .port()
}

/// The value at a path of mapping keys (and sequence indexes written as numbers).
fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |value, segment| match segment.parse::<usize>() {
            Ok(index) if value.is_sequence() => value.get(index),
            _ => value.get(*segment),
        })
}

fn string_at<'a>(value: &'a Value, path: &[&str], origin: &str) -> &'a str {
    at(value, path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{origin}: no string at {}", path.join(".")))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(text)) => text.split_whitespace().map(str::to_string).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| item.as_str().expect("a list of strings").to_string())
            .collect(),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Dockerfile

struct Dockerfile {
    text: String,
    /// The instructions of the final stage: (keyword in upper case, arguments).
    runtime: Vec<(String, String)>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read("Dockerfile");
        let mut instructions: Vec<(String, String)> = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(head) => {
                    pending.push_str(head);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(trimmed);
                    let (keyword, args) = pending
                        .split_once(char::is_whitespace)
                        .unwrap_or((&pending, ""));
                    instructions.push((keyword.to_uppercase(), args.trim().to_string()));
                    pending.clear();
                }
            }
        }
        let last_from = instructions
            .iter()
            .rposition(|(keyword, _)| keyword == "FROM")
            .expect("Dockerfile: no FROM");
        let runtime = instructions.split_off(last_from);
        Dockerfile { text, runtime }
    }

    fn all(&self, keyword: &str) -> Vec<&str> {
        self.runtime
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, args)| args.as_str())
            .collect()
    }

    fn last(&self, keyword: &str) -> &str {
        self.all(keyword)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("Dockerfile: the runtime stage has no {keyword}"))
    }

    /// The runtime stage's environment (ENV a=1 b=2, or the old ENV a 1).
    fn env(&self) -> HashMap<String, String> {
        let mut env = HashMap::new();
        for args in self.all("ENV") {
            if args
                .split_whitespace()
                .next()
                .is_some_and(|w| w.contains('='))
            {
                for pair in args.split_whitespace() {
                    let (name, value) = pair.split_once('=').expect("ENV name=value");
                    env.insert(name.to_string(), value.trim_matches('"').to_string());
                }
            } else if let Some((name, value)) = args.split_once(char::is_whitespace) {
                env.insert(name.to_string(), value.trim().trim_matches('"').to_string());
            }
        }
        env
    }

    fn env_var(&self, name: &str) -> String {
        self.env()
            .remove(name)
            .unwrap_or_else(|| panic!("Dockerfile: the runtime stage sets no ENV {name}"))
    }

    /// The port of the image's http.listen (AGENTD__HTTP__LISTEN).
    fn http_port(&self) -> u16 {
        port_of_listen(
            &self.env_var("AGENTD__HTTP__LISTEN"),
            "Dockerfile ENV AGENTD__HTTP__LISTEN",
        )
    }

    fn artifacts_dir(&self) -> String {
        self.env_var("AGENTD__ARTIFACTS__DIR")
    }

    /// The exec form of ENTRYPOINT.
    fn entrypoint(&self) -> Vec<String> {
        serde_json::from_str(self.last("ENTRYPOINT"))
            .expect("Dockerfile: ENTRYPOINT is not in exec form [\"…\"]")
    }

    fn user(&self) -> String {
        self.last("USER").to_string()
    }
}

#[test]
fn dockerfile_runs_agentd_as_a_non_root_user_with_a_healthcheck() {
    let docker = Dockerfile::load();

    let user = docker.user();
    let name = user.split(':').next().unwrap_or_default();
    assert!(
        !["root", "0", ""].contains(&name),
        "Dockerfile: the runtime stage must run as a non-root USER, not {user:?}"
    );

    assert_eq!(
        docker.last("STOPSIGNAL"),
        "SIGTERM",
        "Dockerfile: STOPSIGNAL must be SIGTERM, the signal agentd drains on"
    );

    let entrypoint = docker.entrypoint();
    let binary = entrypoint.first().expect("Dockerfile: empty ENTRYPOINT");
    assert!(
        docker
            .all("COPY")
            .iter()
            .any(|args| args.starts_with("--from=") && args.ends_with(binary.as_str())),
        "Dockerfile: ENTRYPOINT runs {binary}, but no COPY --from=… puts the binary there"
    );
    let cmd: Vec<String> =
        serde_json::from_str(docker.last("CMD")).expect("Dockerfile: CMD is not in exec form");
    assert_eq!(
        cmd,
        ["run"],
        "Dockerfile: the default command must be `agentd run`"
    );

    let healthcheck = docker.last("HEALTHCHECK");
    let (_, probe) = healthcheck
        .split_once("CMD ")
        .unwrap_or_else(|| panic!("Dockerfile: HEALTHCHECK without CMD: {healthcheck}"));
    let probe: Vec<String> = serde_json::from_str(probe.trim())
        .expect("Dockerfile: the HEALTHCHECK CMD is not in exec form (there is no shell)");
    assert_eq!(
        probe,
        [binary.as_str(), "healthcheck"],
        "Dockerfile: HEALTHCHECK must run `agentd healthcheck` (the image has no curl)"
    );

    let listen = docker.env_var("AGENTD__HTTP__LISTEN");
    let address: SocketAddr = listen.parse().expect("AGENTD__HTTP__LISTEN is ip:port");
    assert!(
        address.ip().is_unspecified(),
        "Dockerfile: AGENTD__HTTP__LISTEN={listen} must listen on all interfaces, or probes \
         from outside the container cannot reach it"
    );
    // `agentd healthcheck` asks 127.0.0.1:9464 unless given --url.
    assert_eq!(
        address.port(),
        9464,
        "Dockerfile: HEALTHCHECK runs `agentd healthcheck` without --url, which asks port 9464"
    );
    assert!(
        docker.all("EXPOSE").iter().any(|ports| ports
            .split_whitespace()
            .any(|p| p.trim_end_matches("/tcp") == address.port().to_string())),
        "Dockerfile: EXPOSE must include the HTTP port {}",
        address.port()
    );

    let env = docker.env();
    assert_known_variables(env.keys().map(String::as_str), "Dockerfile ENV");

    let artifacts = docker.artifacts_dir();
    assert!(
        docker
            .all("COPY")
            .iter()
            .any(|args| args.contains("--chown=") && args.ends_with(&artifacts)),
        "Dockerfile: {artifacts} (AGENTD__ARTIFACTS__DIR) must be created owned by the \
         non-root user (COPY --chown=…), or a volume mounted there is not writable"
    );
}

#[test]
fn dockerfile_builds_every_target_cargo_needs() {
    let docker = Dockerfile::load();
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml is TOML");
    let package = manifest["package"]["name"].as_str().expect("package.name");

    // The dependency layer builds with empty sources: every target the manifest declares
    // must be created there, or cargo cannot read the manifest.
    let mut paths = vec!["src/lib.rs".to_string(), "src/main.rs".to_string()];
    for (kind, folder) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        let targets = manifest.get(kind).and_then(toml::Value::as_array);
        for target in targets.into_iter().flatten() {
            let name = target["name"].as_str().expect("target name");
            let path = match target.get("path").and_then(toml::Value::as_str) {
                Some(path) => path.to_string(),
                None if kind == "bin" && name == package => "src/main.rs".to_string(),
                None => format!("{folder}/{name}.rs"),
            };
            paths.push(path);
        }
    }
    for path in paths {
        assert!(
            docker.text.contains(&path),
            "Dockerfile: the dependency-caching build must create {path} (declared in \
             Cargo.toml), or cargo cannot parse the manifest"
        );
    }

    assert!(
        docker
            .text
            .contains("cargo build --release --locked --bin agentd"),
        "Dockerfile: build with `cargo build --release --locked --bin agentd`"
    );
    // Compiled in: sqlx::migrate!("./migrations") and include_str!("../config/default.toml").
    for folder in ["src", "migrations", "config"] {
        assert!(
            docker
                .text
                .lines()
                .any(|line| line.trim() == format!("COPY {folder} {folder}")),
            "Dockerfile: the build stage must COPY {folder} {folder}"
        );
    }
    let ignored: Vec<String> = std::fs::read_to_string(root().join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim().trim_matches('/').to_string())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "migrations",
        "config",
        "*",
        "**",
    ] {
        assert!(
            !ignored.iter().any(|line| line == needed),
            ".dockerignore excludes {needed}, which the image build needs"
        );
    }
}

// ---------------------------------------------------------------------------------------
// compose.yaml

fn compose() -> Value {
    let mut compose: Value =
        serde_yaml_ng::from_str(&read("compose.yaml")).expect("compose.yaml is not valid YAML");
    compose
        .apply_merge()
        .expect("compose.yaml: a merge key (<<) does not merge");
    compose
}

/// A service's environment as name → value (from a mapping or a list of NAME=value).
fn compose_env(service: &Value) -> HashMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    Value::String(text) => text.clone(),
                    Value::Null => String::new(),
                    other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
                };
                (name.as_str().expect("variable name").to_string(), value)
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|item| item.split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        _ => HashMap::new(),
    }
}

/// (user, password, host, database) of a postgres:// URL.
fn url_parts(url: &str) -> (String, String, String, String) {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("{url} is not a postgres:// URL"));
    let (userinfo, rest) = rest.rsplit_once('@').expect("user@host in the URL");
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (hostport, database) = rest.split_once('/').expect("a database in the URL");
    let host = hostport.split(':').next().unwrap_or_default();
    let database = database.split('?').next().unwrap_or_default();
    (user.into(), password.into(), host.into(), database.into())
}

#[test]
fn compose_migrates_once_then_runs_two_replicas() {
    let docker = Dockerfile::load();
    let compose = compose();
    let services = compose.get("services").expect("compose.yaml: no services");
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml: no service {name}"))
    };
    let declared_volumes: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|volumes| {
            volumes
                .keys()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();

    // PostgreSQL, healthy before anything connects.
    let postgres = service("postgres");
    assert!(
        string_at(postgres, &["image"], "compose postgres").starts_with("postgres:"),
        "compose.yaml: postgres must use the postgres image"
    );
    assert!(
        strings(at(postgres, &["healthcheck", "test"]))
            .iter()
            .any(|word| word == "pg_isready"),
        "compose.yaml: postgres needs a healthcheck with pg_isready (migrate waits for it)"
    );
    let pg_env = compose_env(postgres);
    let pg = |name: &str| {
        pg_env
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("compose.yaml: postgres sets no {name}"))
    };
    let expected_database = (
        pg("POSTGRES_USER"),
        pg("POSTGRES_PASSWORD"),
        "postgres".to_string(),
        pg("POSTGRES_DB"),
    );

    // The migration: once, after PostgreSQL is healthy.
    let migrate = service("migrate");
    assert_eq!(
        strings(migrate.get("command")),
        ["migrate"],
        "compose.yaml: migrate must run `agentd migrate`"
    );
    assert_eq!(
        at(migrate, &["depends_on", "postgres", "condition"]).and_then(Value::as_str),
        Some("service_healthy"),
        "compose.yaml: migrate must depend on postgres being service_healthy"
    );
    assert_eq!(
        migrate.get("restart").and_then(Value::as_str),
        Some("no"),
        "compose.yaml: migrate is one-shot: restart: \"no\" (quoted)"
    );
    let migrate_env = compose_env(migrate);
    let migrate_url = migrate_env
        .get("DATABASE_URL")
        .expect("compose.yaml: migrate needs DATABASE_URL (else agentd starts an embedded server)");
    assert_eq!(
        url_parts(migrate_url),
        expected_database,
        "compose.yaml: migrate's DATABASE_URL must match the postgres service"
    );
    assert_known_variables(
        migrate_env.keys().map(String::as_str),
        "compose.yaml migrate",
    );
    let image = migrate.get("image");

    // The replicas.
    let mut worker_ids = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    let mut artifact_volumes = BTreeSet::new();
    let image_env = docker.env();
    for name in ["agentd-1", "agentd-2"] {
        let replica = service(name);
        let origin = format!("compose.yaml {name}");
        assert_eq!(
            strings(replica.get("command")),
            ["run"],
            "{origin}: must run `agentd run`"
        );
        assert_eq!(
            replica.get("image"),
            image,
            "{origin}: must use the image migrate uses"
        );
        assert_eq!(
            at(replica, &["depends_on", "migrate", "condition"]).and_then(Value::as_str),
            Some("service_completed_successfully"),
            "{origin}: must wait for migrate to complete (service_completed_successfully)"
        );

        let env = compose_env(replica);
        assert_known_variables(env.keys().map(String::as_str), &origin);
        let url = env.get("DATABASE_URL").unwrap_or_else(|| {
            panic!("{origin}: needs DATABASE_URL (else agentd starts an embedded server)")
        });
        assert_eq!(
            url, migrate_url,
            "{origin}: DATABASE_URL must be the database migrate migrates"
        );
        let worker_id = env
            .get("AGENTD__WORKER__ID")
            .unwrap_or_else(|| panic!("{origin}: needs its own AGENTD__WORKER__ID"));
        assert!(
            worker_ids.insert(worker_id.clone()),
            "{origin}: AGENTD__WORKER__ID {worker_id} is not unique"
        );

        let grace = effective_grace(
            &[
                env.get("AGENTD__SHUTDOWN__GRACE").map(String::as_str),
                image_env.get("AGENTD__SHUTDOWN__GRACE").map(String::as_str),
            ],
            &origin,
        );
        let stop = duration(string_at(replica, &["stop_grace_period"], &origin), &origin);
        assert!(
            stop > grace,
            "{origin}: stop_grace_period {stop:?} must exceed shutdown.grace {grace:?}, or Docker \
             kills agentd while runs are still draining"
        );

        let listen_port = match env.get("AGENTD__HTTP__LISTEN") {
            Some(listen) => port_of_listen(listen, &origin),
            None => docker.http_port(),
        };
        let ports = strings(replica.get("ports"));
        assert_eq!(
            ports.len(),
            1,
            "{origin}: publish exactly the HTTP port, found {ports:?}"
        );
        let mut parts: Vec<&str> = ports[0].split(':').collect();
        let container = parts.pop().unwrap_or_default().trim_end_matches("/tcp");
        let host = parts.pop().unwrap_or_default();
        assert_eq!(
            container,
            listen_port.to_string(),
            "{origin}: publish the container's HTTP port {listen_port}"
        );
        assert!(
            host_ports.insert(host.to_string()),
            "{origin}: host port {host} is used twice"
        );

        let artifacts = env
            .get("AGENTD__ARTIFACTS__DIR")
            .cloned()
            .unwrap_or_else(|| docker.artifacts_dir());
        let volume = strings(replica.get("volumes"))
            .into_iter()
            .find_map(|mount| {
                let mut parts = mount.splitn(3, ':');
                let (source, target) = (parts.next()?, parts.next()?);
                (target == artifacts).then(|| source.to_string())
            })
            .unwrap_or_else(|| {
                panic!("{origin}: mount a volume at the artifacts folder {artifacts}")
            });
        assert!(
            declared_volumes.contains(&volume),
            "{origin}: the artifacts volume {volume} must be a named volume declared under volumes:"
        );
        artifact_volumes.insert(volume);
    }
    assert_eq!(
        artifact_volumes.len(),
        1,
        "compose.yaml: the replicas must share one artifacts volume (an artifact's file:// URL \
         must resolve on either), found {artifact_volumes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// Every YAML document of deploy/kubernetes/*.yaml, as (file name, document).
fn kubernetes_documents() -> Vec<(String, Value)> {
    let folder = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", folder.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/kubernetes has no YAML files");
    let mut documents = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("readable manifest");
        for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document).unwrap_or_else(|error| {
                panic!("{name}: document {index} is not valid YAML: {error}")
            });
            if value.is_null() {
                continue;
            }
            for field in ["apiVersion", "kind"] {
                at(&value, &[field])
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{name}: document {index} has no {field}"));
            }
            string_at(&value, &["metadata", "name"], &name);
            documents.push((name.clone(), value));
        }
    }
    documents
}

fn one_of_kind<'a>(documents: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = documents
        .iter()
        .map(|(_, document)| document)
        .filter(|document| at(document, &["kind"]).and_then(Value::as_str) == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/kubernetes: expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

/// A container's env entry by name.
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container
        .get("env")?
        .as_sequence()?
        .iter()
        .find(|entry| entry.get("name").and_then(Value::as_str) == Some(name))
}

fn env_names(container: &Value) -> Vec<&str> {
    container
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("name").and_then(Value::as_str))
        .collect()
}

/// (Secret name, key) a container reads DATABASE_URL from; checks the Secret exists.
fn database_secret(
    documents: &[(String, Value)],
    container: &Value,
    origin: &str,
) -> (String, String) {
    let reference = env_entry(container, "DATABASE_URL")
        .and_then(|entry| at(entry, &["valueFrom", "secretKeyRef"]))
        .unwrap_or_else(|| panic!("{origin}: DATABASE_URL must come from a Secret (secretKeyRef)"));
    let name = string_at(reference, &["name"], origin).to_string();
    let key = string_at(reference, &["key"], origin).to_string();
    let secret = one_of_kind(documents, "Secret");
    assert_eq!(
        string_at(secret, &["metadata", "name"], "Secret"),
        name,
        "{origin}: reads Secret {name}, which is not the one in deploy/kubernetes"
    );
    assert!(
        ["stringData", "data"]
            .iter()
            .any(|field| at(secret, &[*field, key.as_str()]).is_some()),
        "{origin}: the Secret {name} has no key {key}"
    );
    (name, key)
}

/// The security facts every agentd pod must have, for the image's non-numeric USER.
fn assert_locked_down(pod: &Value, container: &Value, origin: &str) {
    let pod_context = pod.get("securityContext");
    let container_context = container.get("securityContext");
    let setting = |name: &str| {
        container_context
            .and_then(|context| context.get(name))
            .or_else(|| pod_context.and_then(|context| context.get(name)))
    };
    assert_eq!(
        setting("runAsNonRoot").and_then(Value::as_bool),
        Some(true),
        "{origin}: set runAsNonRoot: true"
    );
    let user = Dockerfile::load().user();
    if user.parse::<u64>().is_err() {
        let uid = setting("runAsUser").and_then(Value::as_u64);
        assert!(
            uid.is_some_and(|uid| uid != 0),
            "{origin}: the image's USER {user} is a name, which the kubelet cannot check \
             against runAsNonRoot: set a numeric runAsUser (65532 in distroless)"
        );
    }
    let context = container_context
        .unwrap_or_else(|| panic!("{origin}: the container has no securityContext"));
    assert_eq!(
        context
            .get("readOnlyRootFilesystem")
            .and_then(Value::as_bool),
        Some(true),
        "{origin}: set readOnlyRootFilesystem: true"
    );
    assert_eq!(
        context
            .get("allowPrivilegeEscalation")
            .and_then(Value::as_bool),
        Some(false),
        "{origin}: set allowPrivilegeEscalation: false"
    );
    assert!(
        strings(at(context, &["capabilities", "drop"]))
            .iter()
            .any(|cap| cap == "ALL"),
        "{origin}: drop ALL capabilities"
    );
    for bound in ["requests", "limits"] {
        assert!(
            at(container, &["resources", bound, "memory"]).is_some(),
            "{origin}: set resources.{bound}.memory"
        );
    }
}

#[test]
fn kubernetes_deployment_probes_drains_and_reads_its_config() {
    let docker = Dockerfile::load();
    let documents = kubernetes_documents();
    let deployment = one_of_kind(&documents, "Deployment");
    let origin = "deploy/kubernetes Deployment";

    assert_eq!(
        at(deployment, &["spec", "replicas"]).and_then(Value::as_u64),
        Some(2),
        "{origin}: replicas: 2"
    );
    let template = at(deployment, &["spec", "template"]).expect("Deployment without a template");
    let selector = at(deployment, &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .expect("Deployment without selector.matchLabels");
    for (label, value) in selector {
        assert_eq!(
            at(template, &["metadata", "labels"]).and_then(|labels| labels.get(label)),
            Some(value),
            "{origin}: the pod template lacks the selector's label {label:?}"
        );
    }
    let pod = template.get("spec").expect("Deployment without a pod spec");
    let container = at(pod, &["containers", "0"]).expect("Deployment without a container");
    assert!(
        strings(container.get("args")) == ["run"] || container.get("args").is_none(),
        "{origin}: the container must run `agentd run` (the image's default)"
    );
    assert_known_variables(env_names(container), origin);
    assert_locked_down(pod, container, origin);
    database_secret(&documents, container, origin);

    assert_eq!(
        env_entry(container, "AGENTD__WORKER__ID")
            .and_then(|entry| at(entry, &["valueFrom", "fieldRef", "fieldPath"]))
            .and_then(Value::as_str),
        Some("metadata.name"),
        "{origin}: AGENTD__WORKER__ID must come from the pod's name (fieldRef metadata.name)"
    );

    // The config file: mounted from the ConfigMap where AGENTD_CONFIG says.
    let env_value = |name: &str| {
        env_entry(container, name)
            .and_then(|entry| entry.get("value"))
            .and_then(Value::as_str)
    };
    let mut file_settings = toml::Table::new();
    if let Some(config_path) = env_value("AGENTD_CONFIG") {
        let (folder, file) = config_path
            .rsplit_once('/')
            .expect("AGENTD_CONFIG is an absolute path");
        let mount = container
            .get("volumeMounts")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|mount| mount.get("mountPath").and_then(Value::as_str) == Some(folder))
            .unwrap_or_else(|| {
                panic!("{origin}: AGENTD_CONFIG={config_path}, but nothing is mounted at {folder}")
            });
        let volume_name = string_at(mount, &["name"], origin);
        let volume = pod
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|volume| volume.get("name").and_then(Value::as_str) == Some(volume_name))
            .unwrap_or_else(|| panic!("{origin}: no volume {volume_name}"));
        let config_map_name = string_at(volume, &["configMap", "name"], origin);
        let config_map = one_of_kind(&documents, "ConfigMap");
        assert_eq!(
            string_at(config_map, &["metadata", "name"], "ConfigMap"),
            config_map_name,
            "{origin}: mounts ConfigMap {config_map_name}, which is not the one in \
             deploy/kubernetes"
        );
        let text = string_at(config_map, &["data", file], "ConfigMap");
        file_settings = text.parse().unwrap_or_else(|error| {
            panic!("ConfigMap {config_map_name}: {file} is not valid TOML: {error}")
        });
        let known = known_keys();
        let keys = agentd::config::file_keys(text)
            .unwrap_or_else(|error| panic!("ConfigMap {config_map_name}: {file}: {error}"));
        let image_env = docker.env();
        for key in keys {
            assert!(
                known.contains(&key),
                "ConfigMap {config_map_name}: {file} sets {key}, which config/default.toml does \
                 not have (agentd would exit 2)"
            );
            let variable = format!("AGENTD__{}", key.to_uppercase().replace('.', "__"));
            assert!(
                !image_env.contains_key(&variable) && env_value(&variable).is_none(),
                "ConfigMap {config_map_name}: {file} sets {key}, but the environment variable \
                 {variable} (image or Deployment) wins over the file: set it there instead"
            );
        }
    }

    // Draining: the pod outlives shutdown.grace.
    let grace = effective_grace(
        &[
            env_value("AGENTD__SHUTDOWN__GRACE"),
            docker
                .env()
                .get("AGENTD__SHUTDOWN__GRACE")
                .map(String::as_str),
            file_settings
                .get("shutdown")
                .and_then(|shutdown| shutdown.get("grace"))
                .and_then(toml::Value::as_str),
        ],
        origin,
    );
    let termination = at(pod, &["terminationGracePeriodSeconds"])
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30));
    assert!(
        termination > grace,
        "{origin}: terminationGracePeriodSeconds {termination:?} must exceed shutdown.grace \
         {grace:?}, or the kubelet kills agentd while runs are still draining"
    );

    // Probes and metrics on the port agentd listens on.
    let port = match env_value("AGENTD__HTTP__LISTEN") {
        Some(listen) => port_of_listen(listen, origin),
        None => docker.http_port(),
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            at(container, &[probe, "httpGet", "path"]).and_then(Value::as_str),
            Some(path),
            "{origin}: {probe} must GET {path}"
        );
        assert_eq!(
            at(container, &[probe, "httpGet", "port"]).and_then(Value::as_u64),
            Some(u64::from(port)),
            "{origin}: {probe} must use port {port}, the port of the image's AGENTD__HTTP__LISTEN"
        );
    }
    assert!(
        container
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .any(
                |entry| entry.get("containerPort").and_then(Value::as_u64) == Some(u64::from(port))
            ),
        "{origin}: declare containerPort {port}"
    );
    let annotations =
        at(template, &["metadata", "annotations"]).expect("pod template without annotations");
    assert_eq!(
        annotations
            .get("prometheus.io/scrape")
            .and_then(Value::as_str),
        Some("true"),
        "{origin}: annotate prometheus.io/scrape: \"true\""
    );
    assert_eq!(
        annotations
            .get("prometheus.io/port")
            .and_then(Value::as_str),
        Some(port.to_string().as_str()),
        "{origin}: prometheus.io/port must be \"{port}\""
    );

    // Writable folders under a read-only root: artifacts, and /tmp for the command executor.
    let artifacts = env_value("AGENTD__ARTIFACTS__DIR")
        .map(String::from)
        .unwrap_or_else(|| docker.artifacts_dir());
    let mounts: Vec<&str> = container
        .get("volumeMounts")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|mount| mount.get("mountPath").and_then(Value::as_str))
        .collect();
    for folder in [artifacts.as_str(), "/tmp"] {
        assert!(
            mounts.contains(&folder),
            "{origin}: the root filesystem is read-only: mount a volume at {folder}"
        );
    }
}

#[test]
fn kubernetes_job_migrates_the_same_database_with_the_same_image() {
    let documents = kubernetes_documents();
    let job = one_of_kind(&documents, "Job");
    let deployment = one_of_kind(&documents, "Deployment");
    let origin = "deploy/kubernetes Job";
    let pod = at(job, &["spec", "template", "spec"]).expect("Job without a pod spec");
    let container = at(pod, &["containers", "0"]).expect("Job without a container");
    let worker = at(deployment, &["spec", "template", "spec", "containers", "0"])
        .expect("Deployment without a container");

    let mut command = strings(container.get("command"));
    command.extend(strings(container.get("args")));
    assert_eq!(
        command.last().map(String::as_str),
        Some("migrate"),
        "{origin}: must run `agentd migrate`, runs {command:?}"
    );
    assert_eq!(
        container.get("image"),
        worker.get("image"),
        "{origin}: must use the Deployment's image"
    );
    assert_eq!(
        database_secret(&documents, container, origin),
        database_secret(&documents, worker, "deploy/kubernetes Deployment"),
        "{origin}: must read DATABASE_URL from the Deployment's Secret and key"
    );
    assert!(
        at(job, &["spec", "backoffLimit"])
            .and_then(Value::as_u64)
            .is_some(),
        "{origin}: set spec.backoffLimit"
    );
    assert!(
        matches!(
            pod.get("restartPolicy").and_then(Value::as_str),
            Some("Never" | "OnFailure")
        ),
        "{origin}: restartPolicy must be Never or OnFailure"
    );
    assert_known_variables(env_names(container), origin);
    assert_locked_down(pod, container, origin);
}

// ---------------------------------------------------------------------------------------
// systemd

/// Key=Value lines of a systemd unit, in order.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

#[test]
fn systemd_unit_migrates_runs_and_drains() {
    let origin = "deploy/systemd/agentd.service";
    let settings = unit_settings(&read(origin));
    let get = |key: &str| {
        settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("{origin}: no {key}="))
    };

    assert!(
        get("ExecStart").contains("agentd run"),
        "{origin}: ExecStart must run `agentd run`"
    );
    assert!(
        get("ExecStartPre").contains("agentd migrate"),
        "{origin}: ExecStartPre must run `agentd migrate`"
    );
    assert_eq!(
        get("KillSignal"),
        "SIGTERM",
        "{origin}: KillSignal must be SIGTERM"
    );
    assert_eq!(
        get("KillMode"),
        "mixed",
        "{origin}: KillMode=mixed, so that SIGTERM goes to agentd alone and the command \
         executor's programs are drained rather than killed at once"
    );
    // `agentd migrate` retries an unreachable database for 60 s.
    let start = duration(get("TimeoutStartSec"), origin);
    assert!(
        start > Duration::from_secs(60),
        "{origin}: TimeoutStartSec {start:?} must exceed the 60 s agentd migrate may retry"
    );

    let env_file = get("EnvironmentFile").trim_start_matches('-');
    assert!(
        env_file.ends_with("/agentd.env"),
        "{origin}: EnvironmentFile {env_file} is not the agentd.env that \
         agentd.env.example describes"
    );
    let example_origin = "deploy/systemd/agentd.env.example";
    let example = read(example_origin);
    let mut variables: HashMap<String, Option<String>> = HashMap::new();
    for line in example.lines().map(str::trim) {
        let (active, assignment) = match line.strip_prefix('#') {
            Some(commented) => (false, commented.trim()),
            None => (true, line),
        };
        if let Some((name, value)) = assignment.split_once('=')
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            variables.insert(name.to_string(), active.then(|| value.to_string()));
        }
    }
    // Commented ones too: they are meant to be uncommented.
    assert_known_variables(variables.keys().map(String::as_str), example_origin);
    assert!(
        variables.get("DATABASE_URL").is_some_and(Option::is_some),
        "{example_origin}: must set DATABASE_URL (else agentd starts an embedded server)"
    );

    let grace = effective_grace(
        &[variables
            .get("AGENTD__SHUTDOWN__GRACE")
            .and_then(|value| value.as_deref())],
        example_origin,
    );
    let stop = duration(get("TimeoutStopSec"), origin);
    assert!(
        stop > grace,
        "{origin}: TimeoutStopSec {stop:?} must exceed shutdown.grace {grace:?}, or systemd \
         kills agentd while runs are still draining"
    );

    // ProtectSystem=strict leaves only the StateDirectory writable, and artifacts default to
    // a folder under the working directory.
    assert_eq!(
        get("WorkingDirectory"),
        format!("/var/lib/{}", get("StateDirectory")),
        "{origin}: WorkingDirectory must be the StateDirectory, the only writable place"
    );
}

// ---------------------------------------------------------------------------------------
// Every file

/// The `AGENTD__…` variables a text names anywhere, comments included.
fn named_variables(text: &str) -> BTreeSet<&str> {
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| word.starts_with("AGENTD__"))
        .collect()
}

#[test]
fn every_setting_the_deployment_files_name_exists() {
    // Examples in comments and instructions are meant to be copied: an unknown key stops
    // agentd with exit status 2. AGENTD__SECTION__KEY is the pattern itself.
    let mut files = vec![
        "Dockerfile".to_string(),
        "compose.yaml".to_string(),
        "deploy/README.md".to_string(),
    ];
    for folder in ["deploy/kubernetes", "deploy/systemd"] {
        let mut names: Vec<String> = std::fs::read_dir(root().join(folder))
            .unwrap_or_else(|error| panic!("cannot list {folder}: {error}"))
            .map(|entry| format!("{folder}/{}", entry.unwrap().file_name().to_string_lossy()))
            .collect();
        names.sort();
        files.extend(names);
    }
    let mut seen = BTreeSet::new();
    for file in &files {
        let text = read(file);
        let names: Vec<&str> = named_variables(&text)
            .into_iter()
            .filter(|name| *name != "AGENTD__SECTION__KEY")
            .collect();
        assert_known_variables(names.iter().copied(), file);
        seen.extend(names.into_iter().map(str::to_string));
    }
    // The token's instructions are comments only: they are checked here or nowhere.
    assert!(
        seen.contains("AGENTD__HTTP__TOKEN_ENV"),
        "no deployment file shows how to set http.token_env: {seen:?}"
    );
}
