//! Redis ACL users for the service's four kinds of client, written as an ACL file
//! (`redis-server --aclfile`) from the configured queue names, so the rules follow the
//! configuration instead of being copied by hand.
//!
//! Every user is limited to the service's keys, to the one Pub/Sub channel of deployment
//! progress (workers publish, API processes subscribe; viewers get none) and to no command of
//! `@dangerous` (FLUSHALL, KEYS, CONFIG, DEBUG, MONITOR, ACL, ...). The default user is
//! switched off, so a client without credentials can do nothing but authenticate.

use sha2::{Digest, Sha256};

use crate::config::{QueueSettings, Secret};

/// A kind of client and what it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `run`: every queue and the state keys.
    Worker,
    /// `api`: pushes onto the inbound queue and keeps its records under the state prefix; no
    /// access to processing lists or dead letters.
    Api,
    /// People running `dlq requeue|purge`, `pause`, `resume`, `push`.
    Operator,
    /// Dashboards and on-call reading `queue stats`, `dlq list|show`, `audit tail`: read only.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Worker, Role::Api, Role::Operator, Role::Viewer];

    /// The Redis user name.
    pub fn user(self) -> &'static str {
        match self {
            Role::Worker => "hokusai-worker",
            Role::Api => "hokusai-api",
            Role::Operator => "hokusai-operator",
            Role::Viewer => "hokusai-viewer",
        }
    }

    /// The environment variable holding this user's password for [`acl_file`].
    pub fn password_var(self) -> &'static str {
        match self {
            Role::Worker => "HOKUSAI_ACL_WORKER_PASSWORD",
            Role::Api => "HOKUSAI_ACL_API_PASSWORD",
            Role::Operator => "HOKUSAI_ACL_OPERATOR_PASSWORD",
            Role::Viewer => "HOKUSAI_ACL_VIEWER_PASSWORD",
        }
    }

    /// Command rules. `SELECT` is named because a URL may pick a database; scripts run with
    /// the caller's rights, so `@scripting` grants nothing the key patterns don't.
    fn commands(self) -> &'static str {
        match self {
            Role::Viewer => "-@all +@read +@connection +select -@dangerous",
            _ => {
                "-@all +@read +@write +@transaction +@scripting +@blocking +@connection +select \
                 -@dangerous"
            }
        }
    }

    /// Key patterns, from the configured names.
    fn keys(self, q: &QueueSettings) -> Vec<String> {
        let state = format!("{}:*", glob_escape(&q.state_prefix));
        let exact = |name: &str| glob_escape(name);
        match self {
            Role::Api => vec![exact(&q.inbound), state],
            _ => vec![
                exact(&q.inbound),
                crate::queue::processing_key(&glob_escape(&q.processing), "*"),
                exact(&q.dlq),
                exact(&q.outbound),
                exact(&q.failures),
                state,
            ],
        }
    }
}

/// Escapes Redis glob characters so a queue name matches only itself.
pub(crate) fn glob_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One ACL file line. A role without a password is written switched off: it exists, so the
/// file shows every role, but nobody can log in as it.
pub fn user_line(role: Role, q: &QueueSettings, password: Option<&Secret>) -> String {
    let login = match password {
        Some(p) => format!("on #{}", hex::encode(Sha256::digest(p.expose().as_bytes()))),
        None => "off".to_owned(),
    };
    let keys: Vec<String> = role.keys(q).iter().map(|k| format!("~{k}")).collect();
    let channel = match role {
        Role::Viewer => String::new(),
        _ => format!(
            " &{}",
            glob_escape(&crate::queue::progress_channel(&q.state_prefix))
        ),
    };
    let pubsub = match role {
        Role::Viewer => "",
        _ => " +@pubsub",
    };
    // Rules apply left to right: each reset comes before what it resets.
    format!(
        "user {} resetpass {login} resetkeys resetchannels{channel} {} {}",
        role.user(),
        keys.join(" "),
        role.commands()
            .replace(" -@dangerous", &format!("{pubsub} -@dangerous"))
    )
}

/// The whole ACL file: the default user off, then every role. Passwords are stored as SHA-256
/// hashes, so the file reveals none of them. (ACL files allow no comments.)
pub fn acl_file(q: &QueueSettings, passwords: &dyn Fn(Role) -> Option<Secret>) -> String {
    let mut out = String::from("user default off resetpass resetkeys resetchannels -@all\n");
    for role in Role::ALL {
        out.push_str(&user_line(role, q, passwords(role).as_ref()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Settings, Sources};

    fn queues() -> QueueSettings {
        Settings::load(Sources {
            file: None,
            env: vec![],
        })
        .unwrap()
        .queues
    }

    #[test]
    fn roles_get_the_configured_keys_and_no_dangerous_commands() {
        let file = acl_file(&queues(), &|r| {
            (r != Role::Viewer).then(|| Secret::new(format!("pw-{}", r.user())))
        });
        let lines: Vec<&str> = file.lines().collect();
        assert_eq!(
            lines[0],
            "user default off resetpass resetkeys resetchannels -@all"
        );
        let worker = lines[1];
        assert!(
            worker.starts_with("user hokusai-worker resetpass on #"),
            "{worker}"
        );
        let hash = hex::encode(Sha256::digest(b"pw-hokusai-worker"));
        assert!(worker.contains(&hash), "{worker}");
        assert!(
            !file.contains("pw-hokusai"),
            "no clear-text password: {file}"
        );
        for key in [
            "~hokusai:model_ready_queue ",
            "~hokusai:model_ready_queue:processing:* ",
            "~hokusai:model_ready_queue:dlq ",
            "~hokusai:token_deployed_queue ",
            "~hokusai:deployment_failed_queue ",
            "~hokusai:deployer:* ",
        ] {
            assert!(worker.contains(key), "{key} in {worker}");
        }
        let api = lines[2];
        assert!(
            api.contains("~hokusai:model_ready_queue ~hokusai:deployer:* "),
            "{api}"
        );
        assert!(!api.contains("dlq") && !api.contains("processing"), "{api}");
        let viewer = lines[4];
        assert!(
            viewer.starts_with("user hokusai-viewer resetpass off "),
            "{viewer}"
        );
        assert!(!viewer.contains("+@write"), "{viewer}");
        for line in &lines[1..] {
            assert!(line.ends_with("-@dangerous"), "{line}");
            assert!(line.contains(" resetchannels "), "{line}");
        }
        for line in &lines[1..4] {
            assert!(
                line.contains(" resetchannels &hokusai:deployer:progress ")
                    && line.contains(" +@pubsub "),
                "{line}"
            );
        }
        assert!(
            !viewer.contains('&') && !viewer.contains("@pubsub"),
            "{viewer}"
        );
    }

    #[test]
    fn glob_characters_in_names_match_only_themselves() {
        assert_eq!(glob_escape("q*[1]?\\"), "q\\*\\[1\\]\\?\\\\");
    }
}
