//! Token-level constrained decoding of the grading JSON: a small automaton over the
//! tokenizer's vocabulary that only lets through tokens keeping the reply a prefix of
//!
//! `{"accuracy_to_prompt": {"explanation": "<text>", "score": <n>}, ... "overall_score": {...}}`
//!
//! with the six [`METRICS`] in order, explanation before score, `<text>` printable ASCII without
//! `"` or `\` (so no escaping is ever needed), and `<n>` one of `0`..`9`, `d.d` or `10`/`10.0`.
//! The fixed text between the free parts is forced token by token (its tokenization is computed
//! once). Every explanation is capped at [`GradingGrammar::max_explanation_tokens`] tokens and
//! no token is allowed that would leave too little budget to close the JSON, so a reply always
//! completes within `max_new_tokens` (end-of-turn token included).

use std::collections::HashMap;

use super::METRICS;

/// The bytes each token id stands for (`None`: a special/added token, never emitted inside the
/// JSON).
#[derive(Clone, Debug)]
pub struct Vocabulary {
    bytes: Vec<Option<Vec<u8>>>,
}

/// GPT-2's byte-to-character map, inverted: the character a byte-level BPE vocabulary uses
/// for each byte.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    bs.extend(u32::from('¡')..=u32::from('¬'));
    bs.extend(u32::from('®')..=u32::from('ÿ'));
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter()
        .zip(cs.iter())
        .filter_map(|(&b, &c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

impl Vocabulary {
    /// The vocabulary of a byte-level BPE tokenizer (Qwen's): each token's string mapped back
    /// to bytes; added (special) tokens are `None`. Tokens whose string is not byte-level
    /// encoded keep their UTF-8 bytes.
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer) -> Self {
        let map = byte_level_decoder();
        let size = tok.get_vocab_size(true);
        let added: std::collections::HashSet<u32> =
            tok.get_added_tokens_decoder().keys().copied().collect();
        let bytes = (0..size as u32)
            .map(|id| {
                if added.contains(&id) {
                    return None;
                }
                let s = tok.id_to_token(id)?;
                let decoded: Option<Vec<u8>> = s.chars().map(|c| map.get(&c).copied()).collect();
                Some(decoded.unwrap_or_else(|| s.into_bytes()))
            })
            .collect();
        Self { bytes }
    }

    /// Number of token ids.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes of token `id` (`None` for special tokens and unknown ids).
    pub fn bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).and_then(|b| b.as_deref())
    }
}

/// Why the grammar cannot be built for a tokenizer and budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// `max_new_tokens` cannot hold the JSON's fixed text plus one token per free part.
    #[error(
        "verifier_args.max_new_tokens = {max_new_tokens} is too small for the grading JSON: it \
         needs at least {needed} tokens with this tokenizer (raise max_new_tokens; 800 is the default)"
    )]
    BudgetTooSmall {
        /// The budget given.
        max_new_tokens: usize,
        /// The least budget that works.
        needed: usize,
    },
    /// The tokenizer lacks a token the grammar needs, or cannot encode the fixed text.
    #[error("the tokenizer cannot express the grading JSON: {0}")]
    Tokenizer(String),
    /// A token outside the allowed set was fed to [`GradingGrammar::advance`].
    #[error("token {0} is not allowed here by the grading grammar")]
    NotAllowed(u32),
}

#[derive(Clone, Debug)]
enum Segment {
    Literal(Vec<u32>),
    Explanation,
    Score,
}

/// What the next token may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Exactly this token (fixed text).
    Forced(u32),
    /// One of these tokens (the model chooses).
    OneOf(Vec<u32>),
    /// The reply is complete.
    Done,
}

/// Where a reply is in the grammar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrammarState {
    seg: usize,
    offset: usize,
    explanation_tokens: usize,
    number: String,
    generated: usize,
}

impl GrammarState {
    /// Tokens emitted so far.
    pub fn generated(&self) -> usize {
        self.generated
    }
}

fn is_text_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'
}

/// Whether `s` can still grow into a valid score.
fn number_prefix_ok(s: &str) -> bool {
    let b = s.as_bytes();
    match b {
        [] => true,
        [d] => d.is_ascii_digit(),
        [b'1', b'0'] => true,
        [b'1', b'0', b'.'] | [b'1', b'0', b'.', b'0'] => true,
        [d, b'.'] => d.is_ascii_digit(),
        [d, b'.', e] => d.is_ascii_digit() && e.is_ascii_digit(),
        _ => false,
    }
}

/// Whether `s` is a complete valid score.
fn number_complete(s: &str) -> bool {
    number_prefix_ok(s) && !s.is_empty() && !s.ends_with('.')
}

/// The grading grammar for one tokenizer and budget.
#[derive(Clone, Debug)]
pub struct GradingGrammar {
    segments: Vec<Segment>,
    /// Minimum tokens to finish from the start of segment `i` (one more entry: 0).
    min_from: Vec<usize>,
    text_tokens: Vec<u32>,
    close_tokens: Vec<u32>,
    number_tokens: Vec<(u32, String)>,
    max_explanation_tokens: usize,
    max_new_tokens: usize,
}

/// The fixed text pieces of the JSON, in order, between the free parts.
fn literal_texts() -> Vec<String> {
    let mut out = Vec::new();
    for (i, m) in METRICS.iter().enumerate() {
        let open = if i == 0 { "{" } else { "}, " };
        out.push(format!("{open}\"{m}\": {{\"explanation\": \""));
        out.push(", \"score\": ".to_string());
    }
    out.push("}}".to_string());
    out
}

impl GradingGrammar {
    /// Builds the grammar: `tokenize` gives the ids of a fixed text piece (no special tokens),
    /// `end` is the end-of-turn token that closes the reply, `max_new_tokens` the budget.
    pub fn new(
        vocab: &Vocabulary,
        tokenize: &dyn Fn(&str) -> Result<Vec<u32>, String>,
        end: u32,
        max_new_tokens: usize,
    ) -> Result<Self, GrammarError> {
        let mut text_tokens = Vec::new();
        let mut close_tokens = Vec::new();
        let mut number_tokens = Vec::new();
        for id in 0..vocab.len() as u32 {
            let Some(b) = vocab.bytes(id) else { continue };
            if b.is_empty() {
                continue;
            }
            if b.iter().all(|&c| is_text_byte(c)) {
                text_tokens.push(id);
            }
            if b.last() == Some(&b'"') && b[..b.len() - 1].iter().all(|&c| is_text_byte(c)) {
                close_tokens.push(id);
            }
            if b.iter().all(|c| c.is_ascii_digit() || *c == b'.') {
                number_tokens.push((id, String::from_utf8_lossy(b).into_owned()));
            }
        }
        if close_tokens.is_empty() {
            return Err(GrammarError::Tokenizer("no token ends with '\"'".into()));
        }
        if !number_tokens
            .iter()
            .any(|(_, s)| s.len() == 1 && number_complete(s))
        {
            return Err(GrammarError::Tokenizer("no single-digit token".into()));
        }
        let texts = literal_texts();
        let mut segments = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let mut ids = tokenize(t).map_err(GrammarError::Tokenizer)?;
            let round: Vec<u8> = ids
                .iter()
                .flat_map(|&id| vocab.bytes(id).unwrap_or_default().to_vec())
                .collect();
            if round != t.as_bytes() {
                return Err(GrammarError::Tokenizer(format!(
                    "{t:?} does not survive tokenization (got {:?})",
                    String::from_utf8_lossy(&round)
                )));
            }
            if i == texts.len() - 1 {
                ids.push(end);
            }
            segments.push(Segment::Literal(ids));
            if i < texts.len() - 1 {
                segments.push(if i % 2 == 0 {
                    Segment::Explanation
                } else {
                    Segment::Score
                });
            }
        }
        let mut min_from = vec![0; segments.len() + 1];
        for i in (0..segments.len()).rev() {
            min_from[i] = min_from[i + 1]
                + match &segments[i] {
                    Segment::Literal(ids) => ids.len(),
                    Segment::Explanation | Segment::Score => 1,
                };
        }
        // Each score may take up to 4 tokens ("10.0") where the minimum counts one.
        let reserve = min_from[0] + 3 * METRICS.len();
        let needed = reserve + METRICS.len();
        if max_new_tokens < needed {
            return Err(GrammarError::BudgetTooSmall {
                max_new_tokens,
                needed,
            });
        }
        Ok(Self {
            segments,
            min_from,
            text_tokens,
            close_tokens,
            number_tokens,
            max_explanation_tokens: (max_new_tokens - reserve) / METRICS.len(),
            max_new_tokens,
        })
    }

    /// Content tokens one explanation may take (the closing quote not counted).
    pub fn max_explanation_tokens(&self) -> usize {
        self.max_explanation_tokens
    }

    /// The token budget the grammar was built for.
    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    /// The state before the first token.
    pub fn start(&self) -> GrammarState {
        GrammarState::default()
    }

    /// The tokens allowed next in `st`.
    pub fn allowed(&self, st: &GrammarState) -> Allowed {
        let Some(seg) = self.segments.get(st.seg) else {
            return Allowed::Done;
        };
        let left = self.max_new_tokens.saturating_sub(st.generated);
        let after = self.min_from[st.seg + 1];
        match seg {
            Segment::Literal(ids) => Allowed::Forced(ids[st.offset]),
            Segment::Explanation => {
                let mut v = self.close_tokens.clone();
                if st.explanation_tokens < self.max_explanation_tokens && left > 1 + after {
                    v.extend_from_slice(&self.text_tokens);
                }
                Allowed::OneOf(v)
            }
            Segment::Score => {
                let mut v = Vec::new();
                for (id, s) in &self.number_tokens {
                    let next = format!("{}{s}", st.number);
                    if !number_prefix_ok(&next) {
                        continue;
                    }
                    let rest = if number_complete(&next) {
                        after
                    } else {
                        1 + after
                    };
                    if rest < left {
                        v.push(*id);
                    }
                }
                if number_complete(&st.number) {
                    if let Some(Segment::Literal(ids)) = self.segments.get(st.seg + 1) {
                        v.push(ids[0]);
                    }
                }
                Allowed::OneOf(v)
            }
        }
    }

    /// Moves `st` past `token`, which must be allowed.
    pub fn advance(
        &self,
        vocab: &Vocabulary,
        st: &mut GrammarState,
        token: u32,
    ) -> Result<(), GrammarError> {
        let ok = match self.allowed(st) {
            Allowed::Forced(t) => t == token,
            Allowed::OneOf(v) => v.contains(&token),
            Allowed::Done => false,
        };
        if !ok {
            return Err(GrammarError::NotAllowed(token));
        }
        st.generated += 1;
        match &self.segments[st.seg] {
            Segment::Literal(ids) => {
                st.offset += 1;
                if st.offset == ids.len() {
                    st.seg += 1;
                    st.offset = 0;
                }
            }
            Segment::Explanation => {
                if vocab.bytes(token).is_some_and(|b| b.last() == Some(&b'"')) {
                    st.seg += 1;
                    st.explanation_tokens = 0;
                } else {
                    st.explanation_tokens += 1;
                }
            }
            Segment::Score => {
                let piece = vocab.bytes(token).unwrap_or_default();
                if piece.iter().all(|c| c.is_ascii_digit() || *c == b'.') {
                    st.number.push_str(&String::from_utf8_lossy(piece));
                } else {
                    // The first token of the following fixed text ends the number.
                    st.number.clear();
                    st.seg += 1;
                    st.offset = 0;
                    if let Some(Segment::Literal(ids)) = self.segments.get(st.seg) {
                        st.offset = 1;
                        if ids.len() == 1 {
                            st.seg += 1;
                            st.offset = 0;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the reply is complete.
    pub fn is_done(&self, st: &GrammarState) -> bool {
        st.seg >= self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Printable ASCII one byte per token, a few longer tokens, and one special end token.
    fn toy() -> (Vocabulary, u32) {
        let mut v: Vec<Option<Vec<u8>>> = (0x20u8..0x7f).map(|b| Some(vec![b])).collect();
        for s in ["the ", "image", "\"", "10", ".\"", "5.", "\\n", "é"] {
            v.push(Some(s.as_bytes().to_vec()));
        }
        v.push(None);
        let end = (v.len() - 1) as u32;
        (Vocabulary { bytes: v }, end)
    }

    fn per_byte(t: &str) -> Result<Vec<u32>, String> {
        Ok(t.bytes().map(|b| (b - 0x20) as u32).collect())
    }

    fn walk(g: &GradingGrammar, vocab: &Vocabulary, seed: u64) -> (String, usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut st = g.start();
        let mut out = Vec::new();
        loop {
            let t = match g.allowed(&st) {
                Allowed::Done => break,
                Allowed::Forced(t) => t,
                Allowed::OneOf(v) => v[rng.random_range(0..v.len())],
            };
            g.advance(vocab, &mut st, t).unwrap();
            out.extend_from_slice(vocab.bytes(t).unwrap_or_default());
        }
        (String::from_utf8(out).unwrap(), st.generated())
    }

    #[test]
    fn random_walks_always_parse_and_fit_the_budget() {
        let (vocab, end) = toy();
        for budget in [400usize, 500, 800] {
            let g = GradingGrammar::new(&vocab, &per_byte, end, budget).unwrap();
            for seed in 0..40 {
                let (text, used) = walk(&g, &vocab, seed);
                assert!(used <= budget, "{used} > {budget}");
                crate::verifiers::parse_grading(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            }
        }
    }

    #[test]
    fn the_tightest_budget_still_completes() {
        let (vocab, end) = toy();
        let needed = match GradingGrammar::new(&vocab, &per_byte, end, 1) {
            Err(GrammarError::BudgetTooSmall { needed, .. }) => needed,
            other => panic!("{other:?}"),
        };
        let g = GradingGrammar::new(&vocab, &per_byte, end, needed).unwrap();
        for seed in 0..20 {
            let (text, used) = walk(&g, &vocab, seed);
            assert!(used <= needed);
            assert!(crate::verifiers::parse_grading(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn a_budget_below_the_fixed_text_is_a_config_error() {
        let (vocab, end) = toy();
        let err = GradingGrammar::new(&vocab, &per_byte, end, 50).unwrap_err();
        assert!(err.to_string().contains("max_new_tokens = 50"), "{err}");
    }

    #[test]
    fn scores_are_numbers_from_zero_to_ten() {
        for ok in ["0", "7", "9.5", "10", "10.0"] {
            assert!(number_complete(ok), "{ok}");
        }
        for bad in ["11", "10.5", "1.", "", "01", "7.55"] {
            assert!(!number_complete(bad), "{bad}");
        }
    }

    #[test]
    fn byte_level_vocabularies_map_back_to_bytes() {
        let m = byte_level_decoder();
        assert_eq!(m.get(&'Ġ'), Some(&b' '));
        assert_eq!(m.get(&'a'), Some(&b'a'));
        assert_eq!(m.len(), 256);
    }
}
