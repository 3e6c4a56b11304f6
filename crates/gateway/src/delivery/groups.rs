//! Groups (docs/protocol.md, "Groups"): persistent membership and the rules for changing it.
//!
//! The rules are pure functions over [`Group`], so every store applies them the same way
//! inside its own compare-and-set; this module never touches a socket or a store format.
//! The endpoints are in `transport::http::groups`.

use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;

use crate::refusal::Refusal;
use crate::store::Group;

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

/// A new group: the creator is owner and member; ids are checked; at most `max` members.
pub fn new_group(owner: &str, members: &[String], max: usize) -> Result<Group, Refusal> {
    check_ids(members)?;
    let mut all = vec![owner.to_owned()];
    add_new(&mut all, members);
    at_most(max, all.len(), "this one would have")?;
    Ok(Group {
        owner: owner.to_owned(),
        members: all,
    })
}

fn check_ids<'a>(ids: impl IntoIterator<Item = &'a String>) -> Result<(), Refusal> {
    match ids.into_iter().find(|id| !is_valid_id(id)) {
        Some(id) => Err(refuse(
            ErrorCode::BadRequest,
            format!("member {id:?} is not a valid uid"),
        )),
        None => Ok(()),
    }
}

/// Appends each of `ids` that `members` does not hold yet, in order.
fn add_new(members: &mut Vec<String>, ids: &[String]) {
    for id in ids {
        if !members.contains(id) {
            members.push(id.clone());
        }
    }
}

fn at_most(max: usize, count: usize, would: &str) -> Result<(), Refusal> {
    if count > max {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("a group has at most {max} members (--max-group); {would} {count}"),
        ));
    }
    Ok(())
}

/// Applies `{"add":[…],"remove":[…]}` asked by `by`: the owner adds and removes anyone but
/// itself; any member may remove itself; nobody else may change anything.
pub fn change(
    g: &Group,
    by: &str,
    add: &[String],
    remove: &[String],
    max: usize,
) -> Result<Group, Refusal> {
    if !g.members.iter().any(|m| m == by) {
        return Err(refuse(
            ErrorCode::NotMember,
            "only members may change a group",
        ));
    }
    let leaving_only = add.is_empty() && remove.iter().all(|r| r == by);
    if by != g.owner && !leaving_only {
        return Err(refuse(
            ErrorCode::NotMember,
            "only the owner adds or removes others; a member may remove itself",
        ));
    }
    if remove.iter().any(|r| r == &g.owner) {
        return Err(refuse(ErrorCode::BadRequest, "the owner cannot be removed"));
    }
    check_ids(add.iter().chain(remove))?;
    let mut members: Vec<String> = g
        .members
        .iter()
        .filter(|m| !remove.contains(m))
        .cloned()
        .collect();
    add_new(&mut members, add);
    at_most(max, members.len(), "this change would make")?;
    Ok(Group {
        owner: g.owner.clone(),
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn creation_and_changes_follow_the_rules() {
        let g = new_group("ann", &ids(&["bob", "cat", "bob"]), 10).unwrap();
        assert_eq!(g.members, ids(&["ann", "bob", "cat"]));
        assert_eq!(
            new_group("ann", &ids(&["b.b"]), 10).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert!(
            new_group("ann", &ids(&["a", "b"]), 2).is_err(),
            "owner counts towards the limit"
        );

        let added = change(&g, "ann", &ids(&["dan"]), &[], 10).unwrap();
        assert_eq!(added.members, ids(&["ann", "bob", "cat", "dan"]));
        let left = change(&g, "bob", &[], &ids(&["bob"]), 10).unwrap();
        assert_eq!(left.members, ids(&["ann", "cat"]));
        assert_eq!(
            change(&g, "bob", &[], &ids(&["cat"]), 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "bob", &ids(&["eve"]), &[], 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "eve", &[], &ids(&["eve"]), 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "ann", &[], &ids(&["ann"]), 10).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            change(&g, "ann", &ids(&["x", "y"]), &[], 4)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }
}
