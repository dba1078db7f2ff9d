//! The prompt key for prefix affinity: a hash of how the prompt opens, read from a bounded
//! prefix of the request body (the body itself is relayed whole, byte for byte).
//!
//! - Chat (`messages`): the messages in order up to and including the first `user` one —
//!   the system prompt and the conversation's first question. That opening does not change
//!   as the conversation grows, so every turn of a conversation has the same key, and its
//!   growing history stays on the backend that has it cached.
//! - Completions (`prompt`, a string or the first string of an array): its first
//!   [`PROMPT_KEY_BYTES`] bytes.
//!
//! The prefix may end in the middle of the JSON: only values completed within it count.
//! When the prefix ends before the first user message, the completed messages before it
//! are the key (a system prompt alone is still a good key). No prompt, no completed
//! message, or no JSON object at all: no key, and the request takes the plain policy.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::hash::Hasher;

/// Bytes of a completions `prompt` that make its key.
pub const PROMPT_KEY_BYTES: usize = 1024;

/// Whether a request may carry a prompt: a POST whose Content-Type is JSON or absent (the
/// DAPI sends none). Everything else is not read at all.
pub fn may_have_prompt(method: &http::Method, headers: &http::HeaderMap) -> bool {
    method == http::Method::POST
        && headers.get(http::header::CONTENT_TYPE).is_none_or(|v| {
            let v = v.as_bytes();
            v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/json")
        })
}

/// Reads up to `limit` bytes of a streamed request body (the rest stays unread; all of it
/// is relayed later, the read frames first) and computes the prompt key from them.
pub async fn prefetch_key(
    body: hyper::body::Incoming,
    limit: usize,
    idle: std::time::Duration,
) -> Result<(crate::body::Prefetched, Option<u64>), crate::body::BodyError> {
    let mut pre = crate::body::Prefetched::read(body, limit, idle, |_| false).await?;
    let frames = pre.frames();
    let key = match frames {
        [one] => prompt_key(&one[..one.len().min(limit)]),
        many => {
            let mut joined = Vec::with_capacity(limit);
            for f in many {
                let room = limit - joined.len();
                joined.extend_from_slice(&f[..f.len().min(room)]);
                if joined.len() == limit {
                    break;
                }
            }
            prompt_key(&joined)
        }
    };
    Ok((pre, key))
}

/// The prompt key of a request body prefix, if it has one.
pub fn prompt_key(prefix: &[u8]) -> Option<u64> {
    let mut found = Found::default();
    let mut de = serde_json::Deserializer::from_slice(prefix);
    // The prefix is usually cut mid-JSON, and the visitor stops early on purpose: the
    // result is what was collected, whatever the parser says about the rest.
    let _ = Top(&mut found).deserialize(&mut de);
    found.key()
}

#[derive(Default)]
struct Found {
    messages: Vec<(String, String)>,
    saw_user: bool,
    prompt: Option<String>,
}

impl Found {
    fn key(&self) -> Option<u64> {
        let mut h = std::hash::DefaultHasher::new();
        if !self.messages.is_empty() {
            h.write_u8(b'm');
            for (role, content) in &self.messages {
                h.write(role.as_bytes());
                h.write_u8(0);
                h.write(content.as_bytes());
                h.write_u8(0);
            }
            return Some(h.finish());
        }
        let p = self.prompt.as_deref()?;
        let mut end = p.len().min(PROMPT_KEY_BYTES);
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        h.write_u8(b'p');
        h.write(&p.as_bytes()[..end]);
        Some(h.finish())
    }
}

/// Stops the parse once the key is complete (the first user message was read).
#[derive(Debug)]
struct Done;

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("key complete")
    }
}

struct Top<'a>(&'a mut Found);

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*k {
                "messages" => map.next_value_seed(Messages(self.0))?,
                "prompt" => {
                    if let Prompt::Text(t) | Prompt::List(Some(t)) = map.next_value()? {
                        self.0.prompt = Some(t);
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if self.0.saw_user {
                return Err(de::Error::custom(Done));
            }
        }
        Ok(())
    }
}

struct Messages<'a>(&'a mut Found);

impl<'de> DeserializeSeed<'de> for Messages<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(m) = seq.next_element::<Message>()? {
            let user = m.role.as_deref() == Some("user");
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts.into_iter().filter_map(|p| p.text).collect(),
                _ => String::new(),
            };
            self.0.messages.push((m.role.unwrap_or_default(), content));
            if user {
                self.0.saw_user = true;
                return Err(de::Error::custom(Done));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Message {
    role: Option<String>,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(IgnoredAny),
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

/// `prompt`: a string, an array whose first element may be a string (batch), or token ids.
enum Prompt {
    Text(String),
    List(Option<String>),
    Other,
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a prompt")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let first = match seq.next_element::<serde_json::Value>()? {
                    Some(serde_json::Value::String(s)) => Some(s),
                    _ => None,
                };
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Prompt::List(first))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Prompt, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Prompt::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Prompt, E> {
                Ok(Prompt::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Prompt, E> {
                Ok(Prompt::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Prompt, E> {
                Ok(Prompt::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Prompt, E> {
                Ok(Prompt::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Prompt, E> {
                Ok(Prompt::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(messages: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"model": "m", "stream": true, "messages": messages}))
            .unwrap_or_default()
    }

    #[test]
    fn a_growing_conversation_keeps_its_key() {
        let turn1 = chat(json!([
            {"role": "system", "content": "You are a tax assistant."},
            {"role": "user", "content": "How do I file?"},
        ]));
        let turn2 = chat(json!([
            {"role": "system", "content": "You are a tax assistant."},
            {"role": "user", "content": "How do I file?"},
            {"role": "assistant", "content": "Like this."},
            {"role": "user", "content": "And late?"},
        ]));
        assert!(prompt_key(&turn1).is_some());
        assert_eq!(prompt_key(&turn1), prompt_key(&turn2));
    }

    #[test]
    fn different_openings_have_different_keys() {
        let a = chat(json!([{"role": "system", "content": "A"}, {"role": "user", "content": "q"}]));
        let b = chat(json!([{"role": "system", "content": "B"}, {"role": "user", "content": "q"}]));
        let c = chat(json!([{"role": "system", "content": "A"}, {"role": "user", "content": "r"}]));
        let ka = prompt_key(&a);
        assert_ne!(ka, prompt_key(&b));
        assert_ne!(ka, prompt_key(&c));
    }

    #[test]
    fn a_prefix_cut_mid_json_keys_on_the_completed_messages() {
        let system = "S".repeat(2000);
        let full = chat(json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "x".repeat(5000)},
        ]));
        let cut = &full[..2100];
        let only_system = chat(json!([{"role": "system", "content": system}]));
        assert!(prompt_key(cut).is_some());
        assert_eq!(prompt_key(cut), prompt_key(&only_system));
        // Cut before any message completed: no key.
        assert_eq!(prompt_key(&full[..500]), None);
    }

    #[test]
    fn content_parts_are_joined() {
        let parts = chat(
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]}]),
        );
        let text = chat(json!([{"role": "user", "content": "hi there"}]));
        assert_eq!(prompt_key(&parts), prompt_key(&text));
    }

    #[test]
    fn completions_key_on_the_first_kilobyte_of_the_prompt() {
        let head = "H".repeat(PROMPT_KEY_BYTES);
        let a = serde_json::to_vec(&json!({"prompt": format!("{head} first")})).unwrap_or_default();
        let b = serde_json::to_vec(&json!({"prompt": [format!("{head} second")], "max_tokens": 3}))
            .unwrap_or_default();
        assert!(prompt_key(&a).is_some());
        assert_eq!(prompt_key(&a), prompt_key(&b));
        let short = serde_json::to_vec(&json!({"prompt": "é".repeat(600)})).unwrap_or_default();
        assert!(prompt_key(&short).is_some(), "cut on a char boundary");
    }

    #[test]
    fn only_json_or_untyped_posts_are_read() {
        use http::{header, HeaderMap, HeaderValue, Method};
        let mut h = HeaderMap::new();
        assert!(may_have_prompt(&Method::POST, &h));
        assert!(!may_have_prompt(&Method::GET, &h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(may_have_prompt(&Method::POST, &h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data"),
        );
        assert!(!may_have_prompt(&Method::POST, &h));
    }

    #[test]
    fn non_json_and_promptless_bodies_have_no_key() {
        for body in [
            &b""[..],
            b"not json",
            b"[1,2,3]",
            b"{\"model\":\"m\"}",
            b"{\"prompt\":[1,2,3]}",
            b"{\"messages\":[]}",
            b"{\"messages\":\"nope\"}",
            b"\xff\xfe{",
        ] {
            assert_eq!(
                prompt_key(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn any_bytes_are_safe() {
        // Deterministic pseudo-random bodies and every cut of a real one: never a panic.
        let full = chat(
            json!([{"role": "system", "content": "s\u{e9}\"\\"}, {"role": "user", "content": "u"}]),
        );
        for end in 0..=full.len() {
            let _ = prompt_key(&full[..end]);
        }
        let alphabet = b"{}[]\":,\\ amessagesprompt0";
        let mut x = 1u64;
        for _ in 0..2000 {
            let mut body = Vec::new();
            for _ in 0..64 {
                x = super::super::score::mix(x);
                body.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = prompt_key(&body);
        }
    }
}
