//! Users, API tokens and console sessions. Secrets are stored as hashes only: argon2id for
//! passwords (computed by the caller), SHA-256 for high-entropy random tokens.

use sqlx::Row;

use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including other users' objects and the fleet.
    Admin,
    /// Their own events, runs and jobs.
    User,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// A user as the rest of the control plane sees it (never with the password hash).
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
}

/// A console session found by its cookie.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    pub csrf_token: String,
}

fn user_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<User> {
    let role: String = row.try_get("role")?;
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
    })
}

impl Store {
    /// Creates a user; `password_hash` is an argon2id PHC string.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> StoreResult<User> {
        let id = new_id();
        let user = User {
            id: id.clone(),
            username: username.to_string(),
            role,
        };
        let (username, password_hash) = (username.to_string(), password_hash.to_string());
        write_op!(self, |conn| async {
            sqlx::query("INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(id)
                .bind(username)
                .bind(password_hash)
                .bind(role.as_str())
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await?;
        Ok(user)
    }

    /// Whether any user exists (first start creates `admin`).
    pub async fn has_users(&self) -> StoreResult<bool> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.reader)
            .await?;
        Ok(count > 0)
    }

    /// A user and their password hash, for login.
    pub async fn user_with_password(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let row =
            sqlx::query("SELECT id, username, role, password_hash FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(&self.reader)
                .await?;
        match row {
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    /// Stores an API token by its SHA-256 for `user_id`.
    pub async fn create_api_token(
        &self,
        user_id: &str,
        token_sha256: &str,
        name: &str,
    ) -> StoreResult<String> {
        let id = new_id();
        let (token_id, user_id, token_sha256, name) = (
            id.clone(),
            user_id.to_string(),
            token_sha256.to_string(),
            name.to_string(),
        );
        write_op!(self, |conn| async {
            sqlx::query("INSERT INTO api_tokens (id, user_id, token_sha256, name, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(token_id)
                .bind(user_id)
                .bind(token_sha256)
                .bind(name)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await?;
        Ok(id)
    }

    /// The user owning a live API token.
    pub async fn user_by_api_token(&self, token_sha256: &str) -> StoreResult<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_sha256 = ? AND t.revoked_at IS NULL",
        )
        .bind(token_sha256)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Starts a console session.
    pub async fn create_session(
        &self,
        user_id: &str,
        token_sha256: &str,
        csrf_token: &str,
        ttl_ms: i64,
    ) -> StoreResult<()> {
        let (user_id, token_sha256, csrf_token) = (
            user_id.to_string(),
            token_sha256.to_string(),
            csrf_token.to_string(),
        );
        write_op!(self, |conn| async {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO sessions (id, user_id, token_sha256, csrf_token, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(new_id())
            .bind(user_id)
            .bind(token_sha256)
            .bind(csrf_token)
            .bind(now)
            .bind(now + ttl_ms)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// A live console session by the SHA-256 of its cookie.
    pub async fn session(&self, token_sha256: &str) -> StoreResult<Option<Session>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, s.csrf_token FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_sha256 = ? AND s.expires_at > ?",
        )
        .bind(token_sha256)
        .bind(now_ms())
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(row) => Ok(Some(Session {
                user: user_from_row(&row)?,
                csrf_token: row.try_get("csrf_token")?,
            })),
            None => Ok(None),
        }
    }

    /// Ends a console session.
    pub async fn delete_session(&self, token_sha256: &str) -> StoreResult<()> {
        let token_sha256 = token_sha256.to_string();
        write_op!(self, |conn| async {
            sqlx::query("DELETE FROM sessions WHERE token_sha256 = ?")
                .bind(token_sha256)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }
}
