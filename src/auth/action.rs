//! The actions a principal may be granted on a repository, and sets of them.

use std::fmt;
use std::str::FromStr;

/// One thing a caller can do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Action::Pull => 1,
            Action::Push => 2,
            Action::Delete => 4,
        }
    }
}

/// An action name that is not `pull`, `push` or `delete`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?} (expected pull, push or delete)")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Action, UnknownAction> {
        match s.trim() {
            "pull" => Ok(Action::Pull),
            "push" => Ok(Action::Push),
            // `*` is what docker clients ask for in a token scope when they mean delete.
            "delete" | "*" => Ok(Action::Delete),
            other => Err(UnknownAction(other.to_owned())),
        }
    }
}

/// A set of actions.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const PULL: Actions = Actions(1);

    pub fn contains(self, action: Action) -> bool {
        self.0 & action.bit() != 0
    }

    pub fn with(self, action: Action) -> Actions {
        Actions(self.0 | action.bit())
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }

    /// Parses `pull,push` style lists (also accepts a slice of names via `from_names`).
    pub fn parse_list(s: &str) -> Result<Actions, UnknownAction> {
        Actions::from_names(s.split(',').filter(|p| !p.trim().is_empty()))
    }

    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Actions, UnknownAction> {
        names
            .into_iter()
            .try_fold(Actions::NONE, |acc, n| Ok(acc.with(n.parse()?)))
    }
}

impl FromIterator<Action> for Actions {
    fn from_iter<I: IntoIterator<Item = Action>>(iter: I) -> Actions {
        iter.into_iter().fold(Actions::NONE, Actions::with)
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Action::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Actions({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let a = Actions::parse_list("push, pull").expect("valid");
        assert!(a.contains(Action::Pull) && a.contains(Action::Push));
        assert!(!a.contains(Action::Delete));
        assert_eq!(a.to_string(), "pull,push");
        assert!(Actions::parse_list("pull,admin").is_err());
        assert_eq!(Actions::parse_list("").expect("empty ok"), Actions::NONE);
    }
}
