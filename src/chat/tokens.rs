//! The special tokens of the V4 chat format.

/// Beginning of sequence.
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of an assistant turn.
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Opens reasoning.
pub const THINK_START: &str = "<think>";
/// Closes reasoning.
pub const THINK_END: &str = "</think>";
/// The DSML markup token of tool calls.
pub const DSML: &str = "｜DSML｜";
/// Starts a user (or developer) turn.
pub const USER: &str = "<｜User｜>";
/// Starts an assistant turn.
pub const ASSISTANT: &str = "<｜Assistant｜>";
/// Starts a latest-reminder turn.
pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";

/// The special token of a quick-instruction task.
pub fn task_token(task: &str) -> Option<&'static str> {
    Some(match task {
        "action" => "<｜action｜>",
        "query" => "<｜query｜>",
        "authority" => "<｜authority｜>",
        "domain" => "<｜domain｜>",
        "title" => "<｜title｜>",
        "read_url" => "<｜read_url｜>",
        _ => return None,
    })
}
