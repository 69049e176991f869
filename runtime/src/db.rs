//! The audit database: connection and migrations.

use std::{str::FromStr as _, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};

use crate::config::{PostgresConfig, SecretError, SslMode, resolve_secret};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Why the database could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `postgres.url` does not parse.
    #[error("postgres.url: {0}")]
    Url(sqlx::Error),
    /// The password file cannot be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Connecting, or a migration, failed.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migrating: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Whether `host` is this machine: loopback or a Unix socket directory.
fn is_local(host: &str) -> bool {
    host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The connection options `config` stands for: its URL, then TLS (`verify-full` by default for
/// any host but a local one), the CA file and the password (from the environment or a file).
pub fn options(config: &PostgresConfig) -> Result<PgConnectOptions, DbError> {
    let mut options = PgConnectOptions::from_str(&config.url).map_err(DbError::Url)?;
    let url_mode = config.url.contains("sslmode=");
    let mode = match config.sslmode {
        Some(mode) => Some(mode),
        None if url_mode => None,
        None if is_local(options.get_host()) => Some(SslMode::Prefer),
        None => Some(SslMode::VerifyFull),
    };
    if let Some(mode) = mode {
        options = options.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    }
    if let Some(ca) = &config.ca_file {
        options = options.ssl_root_cert(ca);
    }
    if let Some(password) = resolve_secret(
        config.password.as_ref(),
        config.password_file.as_deref(),
        "postgres.password_file",
    )? {
        options = options.password(&password);
    }
    Ok(options)
}

/// Connects, and applies pending migrations if configured to.
pub async fn connect(config: &PostgresConfig) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options(config)?)
        .await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mode chosen, by name (`PgSslMode` has no `PartialEq`).
    fn mode(url: &str, sslmode: Option<SslMode>) -> String {
        let config = PostgresConfig {
            url: url.into(),
            sslmode,
            ..PostgresConfig::default()
        };
        format!("{:?}", options(&config).unwrap().get_ssl_mode())
    }

    #[test]
    fn verify_full_is_the_default_for_remote_hosts() {
        assert_eq!(mode("postgres://u@db.example.com/f", None), "VerifyFull");
        assert_eq!(mode("postgres://u@10.1.2.3:5432/f", None), "VerifyFull");
        assert_eq!(mode("postgres://u@127.0.0.1/f", None), "Prefer");
        assert_eq!(mode("postgres://u@localhost/f", None), "Prefer");
        assert_eq!(mode("postgres://u@[::1]/f", None), "Prefer");
        // The URL's own mode wins over the default, the key over both.
        assert_eq!(
            mode("postgres://u@db.example.com/f?sslmode=require", None),
            "Require"
        );
        assert_eq!(
            mode(
                "postgres://u@db.example.com/f?sslmode=require",
                Some(SslMode::VerifyCa)
            ),
            "VerifyCa"
        );
    }

    #[test]
    fn the_password_file_wins_and_loses_its_newline() {
        let file = std::env::temp_dir().join(format!("foresight-pw-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").unwrap();
        let inline = crate::config::Secret("from-env".into());
        let got = resolve_secret(Some(&inline), Some(&file), "postgres.password_file");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(got.unwrap().as_deref(), Some("from-file"));
        assert_eq!(
            resolve_secret(Some(&inline), None, "k").unwrap().as_deref(),
            Some("from-env")
        );
        let missing = resolve_secret(None, Some(std::path::Path::new("/nonexistent/pw")), "k");
        assert!(missing.unwrap_err().to_string().contains("/nonexistent/pw"));
        // Never printed by Debug.
        assert_eq!(format!("{inline:?}"), "***");
    }
}
