//! The audit database: connection and migrations.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::config::PostgresConfig;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects, and applies pending migrations if configured to.
pub async fn connect(config: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.url)
        .await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}
