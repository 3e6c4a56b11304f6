//! Every NATS name imgate uses in cluster mode, made in this one place from `--stream-prefix`
//! (default `imgate`): the stream and its inbox subjects, the KV buckets, the room subjects
//! and the control subjects (docs/protocol.md has the layout).
//!
//! Pure string work: nothing here talks to NATS.

/// Names derived from `--stream-prefix`.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    /// `IMGATE`
    pub stream: String,
    /// `imgate_cursors`
    pub cursors: String,
    /// `imgate_groups`
    pub groups: String,
    /// `imgate_revocations`
    pub revocations: String,
    /// `imgate_reads`
    pub reads: String,
    /// `IMGATE_NOTIFY`: offline-notification windows (schedules, and the windows they make
    /// due).
    pub notify_stream: String,
    /// `imgate_notify`: what each user's notifications listed, and the one being sent.
    pub notify_records: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
            stream: prefix.to_uppercase().replace(['.', '-'], "_"),
            cursors: format!("{prefix}_cursors"),
            groups: format!("{prefix}_groups"),
            revocations: format!("{prefix}_revocations"),
            reads: format!("{prefix}_reads"),
            notify_stream: format!("{}_NOTIFY", prefix.to_uppercase().replace(['.', '-'], "_")),
            notify_records: format!("{prefix}_notify"),
        }
    }

    /// `imgate.u.<uid>`: one inbox; the subject a backend publishes to a user on.
    pub fn user_subject(&self, uid: &str) -> String {
        format!("{}.u.{uid}", self.prefix)
    }

    /// `imgate.u.*`: every inbox, the stream's subjects.
    pub fn all_users(&self) -> String {
        format!("{}.u.*", self.prefix)
    }

    /// `imgate.>`: everything under the prefix.
    pub fn everything(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The inbox a stored subject `<prefix>.u.<uid>` belongs to.
    pub fn owner<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.last_token(subject, ".u.")
    }

    /// `imgate.live.>`: where the stream republishes every stored copy of
    /// `<prefix>.u.<uid>` (core NATS, at most once), and what every gateway's tail
    /// subscribes to in broadcast mode.
    pub fn live_all(&self) -> String {
        format!("{}.live.>", self.prefix)
    }

    /// `imgate.live.<uid>`: where the stream republishes `uid`'s stored copies, which a
    /// gateway in interest mode subscribes to while it holds a connection or long poll of
    /// uid.
    pub fn live_subject(&self, uid: &str) -> String {
        format!("{}.live.{uid}", self.prefix)
    }

    /// The republish source of [`Names::live_all`]: every inbox subject.
    pub fn users_source(&self) -> String {
        format!("{}.u.>", self.prefix)
    }

    /// The inbox a republished copy's subject (`<prefix>.live.<uid>`) belongs to.
    pub fn live_owner<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.last_token(subject, ".live.")
    }

    /// `imgate.room.<rid>`: a live room's messages (core NATS, not stored).
    pub fn room(&self, room: &str) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    /// `imgate.room.*`: every room, which each gateway follows.
    pub fn all_rooms(&self) -> String {
        format!("{}.room.*", self.prefix)
    }

    /// The room a subject `<prefix>.room.<rid>` carries.
    pub fn room_of<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.last_token(subject, ".room.")
    }

    /// `imgate.ctl.kick`: kick requests; every gateway closes the named user's
    /// connections and answers.
    pub fn kick(&self) -> String {
        format!("{}.ctl.kick", self.prefix)
    }

    /// `imgate.ctl.presence`: presence queries, answered by every gateway.
    pub fn presence(&self) -> String {
        format!("{}.ctl.presence", self.prefix)
    }

    /// `imgate.nq.>`: the subjects of the notification stream.
    pub fn windows_all(&self) -> String {
        format!("{}.nq.>", self.prefix)
    }

    /// `imgate.nq.sched.<uid>`: `uid`'s pending notification window, a message schedule
    /// (one at most).
    pub fn window_schedule(&self, uid: &str) -> String {
        format!("{}.nq.sched.{uid}", self.prefix)
    }

    /// `imgate.nq.due.<uid>`: where `uid`'s window schedule puts the window once due.
    pub fn window_due(&self, uid: &str) -> String {
        format!("{}.nq.due.{uid}", self.prefix)
    }

    /// `imgate.nq.due.*`: every due window, which the gateways share.
    pub fn windows_due(&self) -> String {
        format!("{}.nq.due.*", self.prefix)
    }

    /// The user a due window's subject (`<prefix>.nq.due.<uid>`) belongs to.
    pub fn window_owner<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.last_token(subject, ".nq.due.")
    }

    /// `imgate.notify.<uid>`: where `--notify-nats` publishes `uid`'s notifications.
    pub fn notice(&self, uid: &str) -> String {
        format!("{}.notify.{uid}", self.prefix)
    }

    /// `KV_imgate_cursors`: the stream behind the cursor bucket.
    pub fn cursors_stream(&self) -> String {
        format!("KV_{}", self.cursors)
    }

    /// The one token after `<prefix><infix>` in `subject`.
    fn last_token<'s>(&self, subject: &'s str, infix: &str) -> Option<&'s str> {
        let token = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(infix)?;
        (!token.is_empty() && !token.contains('.')).then_some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_subjects_name_their_inbox() {
        let n = Names::new("imgate");
        assert_eq!(n.owner("imgate.u.bob"), Some("bob"));
        assert_eq!(n.owner(&n.user_subject("u")), Some("u"));
        assert_eq!(n.owner("imgate.x.bob"), None);
        assert_eq!(n.owner("other.u.bob"), None);
        assert_eq!(n.owner("imgate.u.bob.extra"), None);
    }

    #[test]
    fn republished_subjects_name_their_inbox() {
        let n = Names::new("imgate");
        assert_eq!(n.live_all(), "imgate.live.>");
        assert_eq!(n.users_source(), "imgate.u.>");
        assert_eq!(n.live_owner("imgate.live.bob"), Some("bob"));
        assert_eq!(n.live_owner(&n.live_subject("carol")), Some("carol"));
        assert_eq!(n.live_owner("imgate.u.bob"), None);
        assert_eq!(n.live_owner("imgate.live.a.b"), None);
    }

    #[test]
    fn room_subjects_name_their_room() {
        let n = Names::new("imgate");
        assert_eq!(n.room_of(&n.room("lobby")), Some("lobby"));
        assert_eq!(n.room_of("imgate.u.lobby"), None);
        assert_eq!(n.room_of("imgate.room."), None);
        assert_eq!(Names::new("a-b.c").stream, "A_B_C");
    }

    #[test]
    fn notification_subjects_name_their_user() {
        let n = Names::new("a-b");
        assert_eq!(n.notify_stream, "A_B_NOTIFY");
        assert_eq!(n.window_owner(&n.window_due("bob")), Some("bob"));
        assert_eq!(n.window_owner(&n.window_schedule("bob")), None);
        assert_eq!(n.notice("bob"), "a-b.notify.bob");
    }
}
