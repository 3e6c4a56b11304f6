//! Id rules (docs/protocol.md, "Ids and tokens"): every uid, device, group and room id is one
//! safe NATS subject token. Client message ids are looser (any visible ASCII) but still
//! bounded.

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// The rule [`is_valid_id`] checks, as refusals quote it.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// `^[A-Za-z0-9_-]{1,64}$`: uid, device, group and room ids.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A client message id: 1–64 visible ASCII characters (no space or control character, so it
/// is safe inside a `Nats-Msg-Id` header).
pub fn is_valid_message_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("A-z_09"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a.b"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a*"));
        assert!(!is_valid_id("a>"));
        assert!(!is_valid_id("ü"));
        assert!(is_valid_message_id("c-17:x.y"));
        assert!(!is_valid_message_id("has space"));
        assert!(!is_valid_message_id("line\nbreak"));
        assert!(!is_valid_message_id(""));
    }
}
