//! `foresight init`: a commented starter configuration and the policy of a chosen scenario.

use std::path::{Path, PathBuf};

/// The scenarios a starter can be made for: the example policies, by name.
pub const SCENARIOS: [(&str, &str, &str); 5] = [
    (
        "instances",
        "instances (nodes, VMs) with risk scores: migrate work off high-risk ones, reserve a buffer for moderate ones",
        include_str!("../../examples/policies/instances.yaml"),
    ),
    (
        "inventory-items",
        "inventory items (disks, pumps, controllers): replace or service by failure probability",
        include_str!("../../examples/policies/inventory-items.yaml"),
    ),
    (
        "standby",
        "pre-provision a component and its dependencies in a secondary environment, switch on failure",
        include_str!("../../examples/policies/standby.yaml"),
    ),
    (
        "code-executions",
        "code executions (functions, jobs) by code id: route new executions away from failing code",
        include_str!("../../examples/policies/code-executions.yaml"),
    ),
    (
        "distributed",
        "distributed system components ranked by probability and impact",
        include_str!("../../examples/policies/distributed.yaml"),
    ),
];

/// The example configuration: every key, commented, at its default.
const CONFIG: &str = include_str!("../../examples/foresight.toml");

/// The line of the example configuration that names the policy file.
const POLICY_LINE: &str = "# policy_file = \"examples/policies/instances.yaml\"";

/// Why a starter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// No such scenario.
    #[error("unknown scenario {0:?}; choose one of {names}", names = SCENARIOS.map(|s| s.0).join(", "))]
    UnknownScenario(String),
    /// A file exists and `force` was not given.
    #[error("{} exists; pass --force to overwrite it, or choose another directory", .0.display())]
    Exists(PathBuf),
    /// Writing failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The configuration file.
    pub config: PathBuf,
    /// The policy file.
    pub policy: PathBuf,
}

/// Writes `<dir>/foresight.toml` (the commented example configuration, its allocator using the
/// scenario's policy) and `<dir>/policies/<scenario>.yaml`. Refuses to overwrite either unless
/// `force`.
pub fn init(dir: &Path, scenario: &str, force: bool) -> Result<Written, InitError> {
    let (name, description, policy) = SCENARIOS
        .iter()
        .find(|s| s.0 == scenario)
        .ok_or_else(|| InitError::UnknownScenario(scenario.to_owned()))?;
    let config_path = dir.join("foresight.toml");
    let policy_path = dir.join("policies").join(format!("{name}.yaml"));
    for p in [&config_path, &policy_path] {
        if p.exists() && !force {
            return Err(InitError::Exists(p.clone()));
        }
    }
    // The policy path as written in the file: relative to the directory `foresight` is run from
    // when `dir` is relative.
    let shown = if dir == Path::new(".") {
        Path::new("policies").join(format!("{name}.yaml"))
    } else {
        policy_path.clone()
    };
    let quoted = serde_json::to_string(&shown.to_string_lossy()).expect("a string serialises");
    let header = format!(
        "# Starter configuration for the {name:?} scenario: {description}.\n\
         # Written by `foresight init`. Check it with `foresight config check {}`; try the policy\n\
         # on scores with `foresight policy check {}`.\n\n",
        config_path.display(),
        policy_path.display()
    );
    let config = CONFIG.replacen(
        POLICY_LINE,
        &format!(
            "# The {name} scenario's policy (paths are relative to where foresight runs).\npolicy_file = {quoted}"
        ),
        1,
    );
    let write = |path: &Path, text: &str| {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| InitError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(path, text).map_err(|source| InitError::Write {
            path: path.to_owned(),
            source,
        })
    };
    write(&config_path, &(header + &config))?;
    write(&policy_path, policy)?;
    Ok(Written {
        config: config_path,
        policy: policy_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_names_its_policy_on_the_line_init_replaces() {
        assert!(CONFIG.contains(POLICY_LINE));
    }

    #[test]
    fn every_scenario_is_named_as_its_policy() {
        for (name, _, policy) in SCENARIOS {
            assert!(policy.contains(&format!("\nname: {name}\n")), "{name}");
        }
    }
}
