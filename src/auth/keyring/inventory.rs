//! What `outpost key list` shows: one row per key id, merged from the keys a store knows
//! and the ids that are revoked, as an aligned table for people or JSON for programs.
//!
//! Pure: the caller gathers the records and says what time it is. A row holds claims and
//! times only; there is no key here to show, so no output can leak one.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use crate::storage::KeyRecord;

/// Why a key id is listed as revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Durably revoked at this time (seconds since the epoch).
    At(u64),
    /// In the revocation file, but not yet loaded by a daemon (which records it durably).
    Listed,
}

/// One key id and what is known of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    /// `None` for an id revoked before this store ever saw its key.
    pub record: Option<KeyRecord>,
    pub revoked: Option<Revocation>,
}

/// Every row, plus anything the listing could not take into account.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub rows: Vec<KeyRow>,
    pub warnings: Vec<String>,
}

impl Listing {
    /// Merges known keys with revoked ids. Known keys come first, by subject and then
    /// issue time; ids known only as revoked follow, by id. When an id is revoked twice,
    /// the durable, earliest revocation is the one shown.
    pub fn new(
        known: BTreeMap<String, KeyRecord>,
        revoked: impl IntoIterator<Item = (String, Revocation)>,
    ) -> Listing {
        let mut revocations: BTreeMap<String, Revocation> = BTreeMap::new();
        for (id, r) in revoked {
            let merged = match (revocations.get(&id), r) {
                (Some(Revocation::At(a)), Revocation::At(b)) => Revocation::At((*a).min(b)),
                (Some(Revocation::At(a)), Revocation::Listed) => Revocation::At(*a),
                (_, r) => r,
            };
            revocations.insert(id, merged);
        }
        let mut rows: Vec<KeyRow> = known
            .into_iter()
            .map(|(id, record)| KeyRow {
                revoked: revocations.remove(&id),
                id,
                record: Some(record),
            })
            .collect();
        rows.sort_by(|a, b| {
            let key = |r: &KeyRow| r.record.as_ref().map(|k| (k.subject.clone(), k.issued_at));
            key(a).cmp(&key(b)).then_with(|| a.id.cmp(&b.id))
        });
        rows.extend(revocations.into_iter().map(|(id, r)| KeyRow {
            id,
            record: None,
            revoked: Some(r),
        }));
        Listing {
            rows,
            warnings: Vec::new(),
        }
    }

    /// An aligned table with a header and a summary line; `now` decides what is expired.
    pub fn table(&self, now: u64) -> String {
        let mut out = String::new();
        if self.rows.is_empty() {
            out.push_str(
                "no keys known yet: a key is listed once it authenticates, when it is \
                 revoked, or when it is issued with --config\n",
            );
        } else {
            let header = [
                "ID",
                "SUBJECT",
                "REPOSITORIES",
                "ACTIONS",
                "EXPIRES",
                "LAST USED",
                "REVOKED",
            ]
            .map(str::to_owned);
            let cells: Vec<[String; 7]> = self.rows.iter().map(|r| cells(r, now)).collect();
            let mut widths = header.clone().map(|h| h.chars().count());
            for row in &cells {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            for row in std::iter::once(&header).chain(&cells) {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                out.push_str(line.join("  ").trim_end());
                out.push('\n');
            }
            let revoked = self.rows.iter().filter(|r| r.revoked.is_some()).count();
            let expired = self
                .rows
                .iter()
                .filter(|r| r.record.as_ref().is_some_and(|k| k.expires_at <= now))
                .count();
            out.push_str(&format!(
                "{} key(s): {revoked} revoked, {expired} expired\n",
                self.rows.len()
            ));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// `{"keys": [...], "warnings": [...]}`, one line. Times are RFC 3339 (UTC) or null.
    pub fn json(&self, now: u64) -> String {
        let keys: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let k = r.record.as_ref();
                json!({
                    "id": r.id,
                    "subject": k.map(|k| &k.subject),
                    "issuer": k.map(|k| &k.issuer),
                    "repositories": k.map(|k| &k.repos),
                    "actions": k.map(|k| k.actions.split(',').collect::<Vec<_>>()),
                    "issued_at": k.map(|k| time(k.issued_at)),
                    "expires_at": k.map(|k| time(k.expires_at)),
                    "expired": k.map(|k| k.expires_at <= now),
                    "recorded_at": k.map(|k| time(k.recorded_at)),
                    "last_used": k.and_then(|k| k.last_used).map(time),
                    "revoked": r.revoked.is_some(),
                    "revoked_at": match r.revoked {
                        Some(Revocation::At(t)) => Some(time(t)),
                        _ => None,
                    },
                })
            })
            .collect();
        let mut out = json!({ "keys": keys, "warnings": self.warnings }).to_string();
        out.push('\n');
        out
    }
}

fn cells(row: &KeyRow, now: u64) -> [String; 7] {
    let revoked = match row.revoked {
        None => "no".to_owned(),
        Some(Revocation::At(t)) => time(t),
        Some(Revocation::Listed) => "yes (revocation file)".to_owned(),
    };
    let Some(k) = &row.record else {
        let unknown = || "-".to_owned();
        return [
            row.id.clone(),
            unknown(),
            unknown(),
            unknown(),
            unknown(),
            unknown(),
            revoked,
        ];
    };
    let expires = if k.expires_at <= now {
        format!("{} (expired)", time(k.expires_at))
    } else {
        time(k.expires_at)
    };
    [
        row.id.clone(),
        printable(&k.subject),
        printable(&k.repos.join(",")),
        k.actions.clone(),
        expires,
        k.last_used.map_or_else(|| "never".to_owned(), time),
        revoked,
    ]
}

/// Claims were validated when the key was issued, but a table must stay a table whatever
/// a record holds: control characters become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn id(c: char) -> String {
        c.to_string().repeat(32)
    }

    fn record(subject: &str, expires_at: u64, last_used: Option<u64>) -> KeyRecord {
        KeyRecord {
            subject: subject.to_owned(),
            issuer: "0123456789abcdef".to_owned(),
            repos: vec!["team/**".to_owned(), "ci/*".to_owned()],
            actions: "pull,push".to_owned(),
            issued_at: NOW - 100,
            expires_at,
            recorded_at: NOW - 50,
            last_used,
        }
    }

    fn listing() -> Listing {
        let known = BTreeMap::from([
            (id('c'), record("zed", NOW + 3600, Some(NOW - 10))),
            (id('a'), record("alice", NOW - 1, None)),
        ]);
        Listing::new(
            known,
            [
                (id('c'), Revocation::Listed),
                (id('c'), Revocation::At(NOW - 5)),
                (id('f'), Revocation::At(NOW - 7)),
                (id('e'), Revocation::Listed),
            ],
        )
    }

    #[test]
    fn merges_known_keys_and_revoked_ids() {
        let l = listing();
        let order: Vec<&str> = l.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(order, [id('a'), id('c'), id('e'), id('f')]);
        assert_eq!(l.rows[0].revoked, None);
        assert_eq!(l.rows[1].revoked, Some(Revocation::At(NOW - 5)));
        assert_eq!(l.rows[2].revoked, Some(Revocation::Listed));
        assert!(l.rows[2].record.is_none() && l.rows[3].record.is_none());
    }

    #[test]
    fn table_is_aligned_and_says_what_it_knows() {
        let mut l = listing();
        l.warnings.push("revocation file unreadable".to_owned());
        let table = l.table(NOW);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[0].starts_with("ID  "), "{table}");
        // Every column starts at the same offset on every row.
        let col = lines[0].find("SUBJECT").expect("SUBJECT column");
        assert_eq!(lines[1].find("alice"), Some(col), "{table}");
        assert_eq!(lines[3][col..].split_whitespace().next(), Some("-"));
        let last = lines[0].find("LAST USED").expect("LAST USED column");
        assert_eq!(lines[1][last..].split_whitespace().next(), Some("never"));
        assert_eq!(
            lines[2][last..].split_whitespace().next(),
            Some("2023-11-14T22:13:10Z")
        );
        assert!(lines[1].contains("team/**,ci/*  pull,push"), "{table}");
        assert!(lines[1].contains("(expired)") && !lines[2].contains("(expired)"));
        assert!(lines[1].ends_with(" no"), "{table}");
        assert!(lines[2].ends_with("2023-11-14T22:13:15Z"), "{table}");
        assert!(lines[3].ends_with("yes (revocation file)"), "{table}");
        assert_eq!(lines[5], "4 key(s): 3 revoked, 1 expired");
        assert_eq!(lines[6], "warning: revocation file unreadable");
        assert!(
            table.lines().all(|l| l == l.trim_end()),
            "no trailing blanks"
        );
    }

    #[test]
    fn empty_table_says_how_keys_get_listed() {
        let table = Listing::default().table(NOW);
        assert!(table.starts_with("no keys known yet"), "{table}");
    }

    #[test]
    fn control_characters_cannot_break_the_table() {
        let known = BTreeMap::from([(id('a'), record("evil\nrow\u{1b}[31m", NOW + 1, None))]);
        let table = Listing::new(known, []).table(NOW);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.contains("evil?row?[31m"), "{table}");
    }

    #[test]
    fn json_has_every_field_and_nulls_for_the_unknown() {
        let l = listing();
        let v: serde_json::Value = serde_json::from_str(&l.json(NOW)).expect("valid JSON");
        let keys = v["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 4);
        let alice = &keys[0];
        assert_eq!(alice["id"], id('a'));
        assert_eq!(alice["subject"], "alice");
        assert_eq!(alice["issuer"], "0123456789abcdef");
        assert_eq!(alice["repositories"], json!(["team/**", "ci/*"]));
        assert_eq!(alice["actions"], json!(["pull", "push"]));
        assert_eq!(alice["expired"], true);
        assert_eq!(alice["last_used"], serde_json::Value::Null);
        assert_eq!(alice["revoked"], false);
        assert_eq!(keys[1]["last_used"], "2023-11-14T22:13:10Z");
        assert_eq!(keys[1]["revoked_at"], "2023-11-14T22:13:15Z");
        let unseen = &keys[2];
        assert_eq!(unseen["subject"], serde_json::Value::Null);
        assert_eq!(unseen["revoked"], true);
        assert_eq!(unseen["revoked_at"], serde_json::Value::Null);
        assert_eq!(v["warnings"], json!([]));
    }
}
