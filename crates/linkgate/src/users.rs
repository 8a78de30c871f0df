//! `[[user]]` accounts and password checks for proxy logins (SOCKS5
//! username/password, HTTP Basic, FTP USER/PASS).

use std::collections::HashMap;

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::config::{Secret, UserConfig};

enum Credential {
    /// An argon2 PHC string.
    Hash(String),
    /// A password from the file or the environment.
    Plain(Secret),
}

/// The configured users, ready to check logins.
pub struct UserDb {
    users: HashMap<String, Credential>,
    /// Verified against for unknown users, so they cost the same time.
    decoy: String,
}

impl std::fmt::Debug for UserDb {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("UserDb")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a login failed (for the audit record; the client only learns "no").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginFailure {
    /// No `[[user]]` with that name.
    UnknownUser,
    /// The password did not match.
    WrongPassword,
}

impl UserDb {
    /// Builds the table from validated `[[user]]` entries.
    pub fn new(users: &[UserConfig]) -> Self {
        let users = users
            .iter()
            .filter_map(|u| {
                let credential = match (&u.password_hash, &u.password) {
                    (Some(hash), _) => Credential::Hash(hash.expose().to_string()),
                    (None, Some(password)) => Credential::Plain(password.clone()),
                    (None, None) => return None,
                };
                Some((u.name.clone(), credential))
            })
            .collect();
        let decoy =
            crate::passwd::hash_password("decoy password for unknown users").unwrap_or_default();
        UserDb { users, decoy }
    }

    /// Checks `user`/`password`. Argon2 verification (tens of milliseconds)
    /// runs on a blocking thread; unknown users take the same path.
    pub async fn verify(&self, user: &str, password: &str) -> Result<(), LoginFailure> {
        let (hash, known) = match self.users.get(user) {
            Some(Credential::Plain(expected)) => {
                return if constant_time_eq(expected.expose().as_bytes(), password.as_bytes()) {
                    Ok(())
                } else {
                    Err(LoginFailure::WrongPassword)
                };
            }
            Some(Credential::Hash(hash)) => (hash.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let password = password.to_string();
        let matched = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        match (known, matched) {
            (true, true) => Ok(()),
            (true, false) => Err(LoginFailure::WrongPassword),
            (false, _) => Err(LoginFailure::UnknownUser),
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of a
/// password was right (its length may still show).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl std::fmt::Display for LoginFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            LoginFailure::UnknownUser => f.write_str("unknown user"),
            LoginFailure::WrongPassword => f.write_str("wrong password"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> UserDb {
        let text = format!(
            "[[user]]\nname = \"alice\"\npassword_hash = \"{}\"\n[[user]]\nname = \"bob\"\npassword = \"builder\"\n",
            crate::passwd::hash_password("wonderland").unwrap()
        );
        let config: crate::config::Config = toml::from_str(&text).unwrap();
        UserDb::new(&config.user)
    }

    #[tokio::test]
    async fn hashed_plain_and_unknown_users() {
        let db = db();
        assert_eq!(db.verify("alice", "wonderland").await, Ok(()));
        assert_eq!(
            db.verify("alice", "wonder").await,
            Err(LoginFailure::WrongPassword)
        );
        assert_eq!(db.verify("bob", "builder").await, Ok(()));
        assert_eq!(
            db.verify("bob", "Builder").await,
            Err(LoginFailure::WrongPassword)
        );
        assert_eq!(
            db.verify("carol", "x").await,
            Err(LoginFailure::UnknownUser)
        );
        assert!(!format!("{db:?}").contains("builder"));
    }
}
