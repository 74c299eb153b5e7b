//! Which of an agent's variables may become environment variables of a `command` program.
//!
//! Variable names are written by tenants. A name that a loader, shell or interpreter reads
//! at start-up (`LD_PRELOAD`, `BASH_ENV`, `NODE_OPTIONS`, `PYTHONPATH`, …) would run the
//! tenant's code inside the operator's program, with whatever the program can reach; so
//! such names are refused, as are names that are not plain identifiers and the names
//! agentd sets itself. The list is documented in docs/security.md and extended by
//! `executors.command.refused_env`. Names are compared without regard to case.

use crate::config::{EnvPattern, is_env_name};

/// Names refused exactly.
pub const REFUSED_NAMES: &[&str] = &[
    // Set by agentd for every program.
    "PATH",
    "HOME",
    "TMPDIR",
    "SHELL",
    // Shells.
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    "CDPATH",
    "GLOBIGNORE",
    // zsh reads $ZDOTDIR/.zshenv at every start, as bash reads BASH_ENV.
    "ZDOTDIR",
    // glibc: the variables it ignores for set-user-id programs (unsecvars.h).
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
    "GLIBC_TUNABLES",
    // Interpreters and runtimes.
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "NODE_REPL_EXTERNAL_MODULE",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "PERLLIB",
    "GEM_PATH",
    "GEM_HOME",
    "BUNDLE_GEMFILE",
    "TCLLIBPATH",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "BROWSER",
    // Trust and traffic: certificates and proxies redirect the program's connections.
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CONFIG_DIRS",
    "XDG_DATA_DIRS",
];

/// Prefixes of refused names.
pub const REFUSED_PREFIXES: &[&str] = &[
    "AGENTD_",
    "LD_",
    "DYLD_",
    "BASH_FUNC_",
    "PYTHON",
    "PERL5",
    "RUBY",
    "LUA_",
    "GIT_",
    "DOTNET_",
    "COMPLUS_",
    "CORECLR_",
    "R_PROFILE",
    "R_ENVIRON",
];

/// Why `name` may not be passed to the program, or `None` when it may. `extra` holds the
/// operator's additions.
pub fn refusal(name: &str, extra: &[EnvPattern]) -> Option<String> {
    if !is_env_name(name) {
        return Some(format!(
            "variable {} not passed to the program: not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            crate::text::quoted(name)
        ));
    }
    let upper = name.to_ascii_uppercase();
    let builtin = REFUSED_NAMES.contains(&upper.as_str())
        || REFUSED_PREFIXES
            .iter()
            .any(|prefix| upper.starts_with(prefix));
    let configured = extra.iter().any(|pattern| pattern.matches(&upper));
    (builtin || configured).then(|| {
        format!(
            "variable {} not passed to the program: it can steer a loader, shell or interpreter (refused names: docs/security.md)",
            crate::text::quoted(name)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_shell_and_interpreter_names_are_refused() {
        for name in [
            "LD_PRELOAD",
            "ld_library_path",
            "BASH_ENV",
            "ENV",
            "BASH_FUNC_ls%%",
            "PATH",
            "Path",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "NODE_OPTIONS",
            "PERL5OPT",
            "RUBYOPT",
            "JAVA_TOOL_OPTIONS",
            "GCONV_PATH",
            "DYLD_INSERT_LIBRARIES",
            "AGENTD_RUN_ID",
            "GIT_SSH_COMMAND",
            "HTTPS_PROXY",
            "ZDOTDIR",
            "NODE_TLS_REJECT_UNAUTHORIZED",
        ] {
            assert!(refusal(name, &[]).is_some(), "{name}");
        }
        for name in ["OPENAI_API_KEY", "CITY", "_private", "a1"] {
            assert_eq!(refusal(name, &[]), None, "{name}");
        }
    }

    #[test]
    fn names_must_be_identifiers() {
        for name in ["", "1A", "A-B", "A B", "A=B", "A\0B", "É", "A.B"] {
            let why = refusal(name, &[]).unwrap();
            assert!(
                why.contains("not a valid environment variable name"),
                "{why}"
            );
        }
        let long = "A".repeat(1 << 20);
        assert_eq!(refusal(&long, &[]), None, "long but valid");
        let bad = format!("{long}-");
        assert!(refusal(&bad, &[]).unwrap().len() < 400);
    }

    #[test]
    fn the_operator_extends_the_list() {
        let extra: Vec<EnvPattern> = ["MY_TOOL_*", "secret_config"]
            .into_iter()
            .map(|text| EnvPattern::parse(text).unwrap())
            .collect();
        assert!(refusal("MY_TOOL_PLUGINS", &extra).is_some());
        assert!(refusal("SECRET_CONFIG", &extra).is_some());
        assert_eq!(refusal("MY_TOOLS", &extra), None);
        assert!(EnvPattern::parse("X").is_some() && EnvPattern::parse("*").is_some());
        for bad in ["A-B*", "", "**", "A*B", "1A"] {
            assert_eq!(EnvPattern::parse(bad), None, "{bad}");
        }
    }
}
